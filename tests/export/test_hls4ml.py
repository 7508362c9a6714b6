"""hls4ml takes bitfold's QONNX as it is: a run trained with power-of-two scales, exported with
``--for hls4ml``, converted by hls4ml 1.3 with the configuration written beside the file, compiled
(the C++ emulation) and held to the float gate against qonnx on the held-out digits split."""
import json

import pytest

from bitfold.core.errors import BitfoldError
from bitfold.toolchain.runs import TrainConfig
from bitfold.toolchain.train import train

pytest.importorskip("hls4ml", reason="hls4ml is not installed (pip install 'bitfold[hls4ml]')")


@pytest.fixture(scope="module")
def pot_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hls4ml") / "mlp_pot"
    train(TrainConfig(model="mlp", bits="w4a4", method_options={"scales": "pot"}, epochs=2), out, progress=False)
    return out


def test_export_for_hls4ml_converts_compiles_and_passes_the_gate(pot_run, tmp_path):
    from bitfold.export import hls4ml_form
    from bitfold.export.onnx_export import export_run
    from bitfold.export.verify import compare, output_step_of, run_qonnx
    from bitfold.toolchain.data import load_digits_split
    r = export_run(pot_run, "qonnx", tmp_path / "m.onnx", for_="hls4ml")
    emu = [x for x in r.report.runtimes if x["executor"] == "hls4ml C++ emulation"]
    assert emu and emu[0]["passed"] and "skipped" not in emu[0]
    cfg = json.loads(hls4ml_form.config_path(r.path).read_text())
    assert cfg["default_precision"].startswith("fixed<")
    # the recipe as a user runs it, from the files alone, on every held-out sample (359 >= 256)
    x = load_digits_split().x_test.numpy()
    hm = hls4ml_form.convert(r.path, tmp_path / "prj")
    rep = compare("qonnx", "hls4ml", run_qonnx(str(r.path), x).reshape(len(x), -1), hls4ml_form.predict(hm, x),
                  output_step_of(r.path))
    assert rep.passed and rep.samples == len(x) >= 256 and rep.argmax_agreement == 1.0, rep.summary()
    # and the gate can fail: hls4ml's default fixed<16,6> for BatchNorm and the bias is not enough
    narrow = hls4ml_form.convert(r.path, tmp_path / "prj16", cfg={**cfg, "default_precision": "fixed<16,6>"})
    bad = compare("qonnx", "hls4ml", run_qonnx(str(r.path), x).reshape(len(x), -1), hls4ml_form.predict(narrow, x),
                  output_step_of(r.path))
    assert not bad.passed and bad.max_abs_diff > 10 * rep.max_abs_diff


def test_float_scales_are_refused_for_hls4ml_and_nothing_is_written(trained_run, tmp_path):
    from bitfold.export.onnx_export import export_run
    out, _ = trained_run
    with pytest.raises(BitfoldError, match="power-of-two scale") as e:
        export_run(out, "qonnx", tmp_path / "m.onnx", for_="hls4ml")
    assert "scales=pot" in str(e.value)
    assert not list(tmp_path.iterdir())
    with pytest.raises(BitfoldError, match="--format qonnx"):
        export_run(out, "qcdq", tmp_path / "m.onnx", for_="hls4ml")
