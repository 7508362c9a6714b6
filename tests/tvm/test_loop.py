"""bitfold run: the closed loop on the host CPU, and its resumability."""
import json

import pytest

from bitfold.app.loop import run_loop
from bitfold.core.events import Events

pytest.importorskip("tvm", reason="apache-tvm is not installed")


def test_closed_loop_runs_records_and_resumes(tmp_path):
    logs = []
    r = run_loop(tmp_path / "exp", "host-cpu", "adaqat", "latency<=5ms", rounds=1, model="mlp", epochs=2,
                 events=Events(on_say=logs.append), subset=(1000, 300))
    h = r["history"][0]
    cfg = json.loads((tmp_path / "exp" / "round1" / "train" / "run" / "config.json").read_text())
    assert cfg["subset"] == [1000, 300]     # `bitfold run --subset` reaches the training
    assert h["accuracy"] > 0.5 and h["measured"] > 0 and h["predicted"] > 0
    assert (tmp_path / "exp" / "report.md").read_text().count("| 1 |") == 1
    assert (tmp_path / "exp" / "report.png").stat().st_size > 1000
    from bitfold.hw_models.store import MeasurementStore
    rows = MeasurementStore(tmp_path / "exp" / "measurements.sqlite").query("host-cpu", "latency")
    assert any(x.kind == "model" for x in rows) and sum(x.kind != "model" for x in rows) >= 8
    table = json.loads((tmp_path / "exp" / "round1" / "recalibrate" / "table.json").read_text())
    assert table["provenance"]["rows"] > 16  # refitted with the model's own layer measurements
    logs.clear()
    run_loop(tmp_path / "exp", "host-cpu", "adaqat", "latency<=5ms", rounds=1, model="mlp", epochs=2,
             events=Events(on_say=logs.append), subset=(1000, 300))
    assert sum("skipped" in x for x in logs) == 6  # nothing changed: every stage skipped
