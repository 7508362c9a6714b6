"""bitfold sweep: a grid trained, exported, built and measured through a local Dask cluster; resumes; a
failing point is reported by name and never becomes a number."""
import csv
import json

import pytest

pytest.importorskip("tvm", reason="apache-tvm is not installed")
pytest.importorskip("distributed", reason="dask distributed is not installed (the dist extra)")

GRID = """
[sweep]
board = "host-cpu"
model = "mlp"
epochs = 1
subset = [600, 200]

[[grid]]
method = ["fixed"]
bits = ["w2a2:all", "w0a0:all"]

[[grid]]
method = ["adaqat"]
bits = ["w8a8:all"]
cost = ["board", "bitops"]
"""


def test_sweep_through_two_workers_writes_table_plot_and_resumes(tmp_path, capsys):
    from bitfold.cli import main
    from bitfold.hw_models.store import MeasurementStore
    (tmp_path / "g.toml").write_text(GRID)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:       # one point cannot train: the sweep says so and exits 1
        main(["sweep", str(tmp_path / "g.toml"), "-o", str(out), "--workers", "2"])
    assert e.value.code == 2
    said = capsys.readouterr()
    assert "failed: method=fixed bits=w0a0:all seed=0: BitfoldError: bit map: w = 0 is outside" in said.out
    assert "1 point(s) of the sweep failed" in said.err
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert sorted((r["method"], r["bits"], r["cost"]) for r in rows) == [
        ("adaqat", "w8a8:all", "bitops"), ("adaqat", "w8a8:all", "board"), ("fixed", "w2a2:all", "")]
    for r in rows:       # every point trained, built and timed; the table's prediction next to it
        assert float(r["accuracy"]) > 0.2 and float(r["measured"]) > 0 and float(r["predicted"]) > 0
        assert r["unit"] == "s" and r["trained_bits"].startswith("W")
    assert any(r["front"] == "True" for r in rows)
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((out / "sweep.json").read_text())
    assert [f["point"] for f in doc["failed"]] == ["method=fixed bits=w0a0:all seed=0"]
    assert len(doc["configurations"]) == 3
    # only this process wrote the database: one whole-model timing per finished point
    models = [m for m in MeasurementStore(out / "measurements.sqlite").query("host-cpu", "latency") if m.kind == "model"]
    assert sorted(m.extra["sweep_point"] for m in models) == sorted(r["key"] for r in rows)
    # a re-run skips the finished points (the failing one runs again and fails again)
    before = (out / "sweep.csv").read_text()
    with pytest.raises(SystemExit):
        main(["sweep", str(tmp_path / "g.toml"), "-o", str(out), "--scheduler", "inprocess"])
    assert "0 point(s) run, 3 already done" in capsys.readouterr().out
    assert (out / "sweep.csv").read_text() == before
    assert len([m for m in MeasurementStore(out / "measurements.sqlite").query("host-cpu", "latency")
                if m.kind == "model"]) == 3
