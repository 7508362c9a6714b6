"""Bring your own model: plain torch models -> bitfold.quantize -> train -> export, verified."""
from pathlib import Path

import pytest
import torch

import bitfold
from bitfold.toolchain.data import load_digits_split
from bitfold.core.errors import BitfoldError
from bitfold.toolchain.runs import TrainConfig
from bitfold.toolchain.train import init_activation_stats, evaluate, train

HERE = Path(__file__).parents[1]   # tests/, where the helper models live
RESNET = f"{HERE / 'user_models.py'}:resnet"
MOBILENET = f"{HERE / 'user_models.py'}:mobilenet"


def test_quantize_places_sites_by_bitfold_rules():
    from user_models import TinyResNet
    q = bitfold.quantize(TinyResNet(), "fixed", "w4a4", example_input=torch.zeros(1, 1, 8, 8))
    from bitfold.toolchain.describe import describe_layers
    d = {x.name: x for x in describe_layers(q, (1, 8, 8))}
    assert list(d)[0] == "conv1" and list(d)[-1] == "fc"
    # a downsampling block's conv1 and its projection read the same (quantized) tensor
    assert d["layer2.0.conv1"].site == d["layer2.0.downsample.0"].site
    assert q.bit_map["conv1"].w == 7 and q.bit_map["layer1.0.conv1"].w == 4


def test_depthwise_macs():
    from user_models import TinyMobileNet
    q = bitfold.quantize(TinyMobileNet(), "fixed", "w4a4", example_input=torch.zeros(1, 1, 8, 8))
    from bitfold.toolchain.describe import describe_layers
    d = {x.name: x for x in describe_layers(q, (1, 8, 8))}
    assert d["blocks.0.dw"].groups == 16 and d["blocks.0.dw"].macs == 16 * 9 * 8 * 8


@pytest.mark.parametrize("spec", [RESNET, MOBILENET])
# adaqat starts at W6A6 inside (edges W7/A8): a full-range W8/A8 layer would be refused for QCDQ
# (tests/export/test_qcdq_runtimes.py)
@pytest.mark.parametrize("method, bits", [("fixed", "w4a4"), ("adaqat", "w6a6")])
def test_user_models_train_export_verify(tmp_path, spec, method, bits):
    opts = {"finetune_epochs": 1} if method == "adaqat" else {}
    cfg = TrainConfig(model=spec, bits=bits, method=method, epochs=2, method_options=opts)
    m = train(cfg, tmp_path / "run", progress=False)
    assert m["accuracy"] > 0.3  # two short epochs; chance is 0.1
    for fmt in ("qonnx", "qcdq"):
        res = bitfold.export_run(tmp_path / "run", fmt, tmp_path / f"m.{fmt}.onnx")
        assert res.report.passed and res.report.argmax_agreement >= 0.99
    if method == "fixed":  # and on to a backend build (TVM, host CPU)
        pytest.importorskip("tvm", reason="apache-tvm is not installed")
        from bitfold.export.backends import build
        assert build(tmp_path / "m.qcdq.onnx", "host-cpu", tmp_path / "build").verified


def test_unsupported_layers_are_listed_in_one_error():
    from user_models import WithLSTM
    with pytest.raises(BitfoldError) as e:
        bitfold.quantize(WithLSTM(), "fixed", "w4a4", example_input=torch.zeros(1, 1, 8, 8))
    msg = str(e.value)
    assert "gelu (GELU)" in msg and "sigmoid" in msg and "keep_float" in msg
    q = bitfold.quantize(WithLSTM(), "fixed", "w4a4", example_input=torch.zeros(1, 1, 8, 8), keep_float=True)
    assert q.has_float_layers


def test_float_checkpoint_and_calibration_start_near_float_accuracy(tmp_path):
    ds = load_digits_split()
    fp = train(TrainConfig(model=MOBILENET, method="float", epochs=6), tmp_path / "fp", progress=False)
    from bitfold.toolchain.runs import load_checkpoint
    torch.save(load_checkpoint(tmp_path / "fp" / "checkpoint.pt")["model"], tmp_path / "float.pt")
    from bitfold.toolchain.models import build_model
    q = build_model(MOBILENET, (1, 8, 8), 10, bits="w8a8", weights=str(tmp_path / "float.pt"))
    init_activation_stats(q, ds.x_train, 64)
    acc = evaluate(q, ds.x_test, ds.y_test)
    assert acc >= fp["accuracy"] - 0.03, (acc, fp["accuracy"])
    # and the CLI path: --weights starts QAT from them
    from bitfold.cli import main
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", MOBILENET, "--weights", str(tmp_path / "float.pt"), "--bits", "w8a8",
              "--epochs", "1", "--lr", "1e-4", "--quiet", "-o", str(tmp_path / "ft")])
        raise SystemExit(0)
    assert e.value.code == 0


def test_any_brevitas_model_exports(tmp_path):
    import brevitas.nn as qnn
    from brevitas.quant.scaled_int import Int8WeightPerTensorFloat
    net = torch.nn.Sequential(qnn.QuantIdentity(bit_width=8), qnn.QuantLinear(64, 32, bias=True, weight_bit_width=3,
                                                                             weight_quant=Int8WeightPerTensorFloat),
                              qnn.QuantReLU(bit_width=4), qnn.QuantLinear(32, 10, bias=True, weight_bit_width=5))
    net.eval()
    x = torch.rand(1, 64)
    for fmt in ("qonnx", "qcdq"):
        res = bitfold.export(net, x, fmt, tmp_path / f"n.{fmt}.onnx")
        assert res.report.passed
    assert res.bit_map["1.w"] == 3 and res.bit_map["2.a"] == 4


def test_bad_user_model_specs(tmp_path):
    from bitfold.toolchain.models import build_model
    with pytest.raises(BitfoldError, match="does not exist"):
        build_model(str(tmp_path / "nope.py") + ":f", (1, 8, 8), 10)
    with pytest.raises(BitfoldError, match="no callable"):
        build_model(f"{HERE / 'user_models.py'}:nothing", (1, 8, 8), 10)
    bad = tmp_path / "w.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(BitfoldError, match="cannot be read safely"):
        build_model(RESNET, (1, 8, 8), 10, weights=str(bad))


@pytest.mark.parametrize("method, bits", [("mebqat", "w8a8"), ("adq", "w3a4"), ("asq", "w4a4")])
def test_user_resnet_with_the_other_methods(tmp_path, method, bits):
    m = train(TrainConfig(model=RESNET, bits=bits, method=method, epochs=1), tmp_path / "run", progress=False)
    assert m["accuracy"] > 0.2
    # mebqat exports at a chosen width (its trained maximum, full-range W8/A8, is refused for QCDQ:
    # it could saturate int8 kernels of CPUs without VNNI - tests/export/test_qcdq_runtimes.py)
    res = bitfold.export_run(tmp_path / "run", "qcdq", tmp_path / "m.onnx",
                             bits_map="w4a4" if method == "mebqat" else None)
    assert res.report.passed
