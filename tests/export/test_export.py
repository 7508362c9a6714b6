import json

import numpy as np
import onnx
import pytest
import torch

from bitfold.export import onnx_export
from bitfold.export.onnx_export import check_exportable, export_model, export_run
from bitfold.export.onnx_io import describe_onnx
from bitfold.export.verify import compare, compare_exact, run_ort, run_qonnx
from bitfold.toolchain.data import load_digits_split
from bitfold.core.errors import BitfoldError
from bitfold.toolchain.runs import TrainConfig, load_run
from bitfold.toolchain.train import train

FORMATS = ["qonnx", "qcdq"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, trained_run):
    """Three more bit maps: residual net at 2 bit, per-channel mixed MLP, 1-bit MLP (QONNX only)."""
    root = tmp_path_factory.mktemp("export_runs")
    cases = {
        "cnn_mixed": trained_run[0],
        "resnet20_w2a2": ("resnet20", "w2a2", {}),
        "mlp_perchannel": ("mlp", {"*": {"w": 4, "a": 3}, "fcs.1": {"w": 2, "a": 5}, "fcs.2": {"w": 6, "a": 2}},
                           {"per_channel": True}),
        "mlp_w1a1": ("mlp", "w1a1", {}),
    }
    out = {}
    for name, spec in cases.items():
        if not isinstance(spec, tuple):
            out[name] = spec
            continue
        model, bits, opts = spec
        train(TrainConfig(model=model, bits=bits, epochs=1, method_options=opts), root / name, progress=False)
        out[name] = root / name
    return out


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", ["cnn_mixed", "resnet20_w2a2", "mlp_perchannel"])
def test_export_agrees_with_torch_on_the_whole_test_set(runs, case, fmt, tmp_path):
    path = tmp_path / f"{case}.{fmt}.onnx"
    res = export_run(runs[case], fmt, path)
    assert res.report.passed and res.report.argmax_agreement == 1.0
    # independent re-check of the written file, outside the exporter
    cfg, model, _ = load_run(runs[case])
    ds = load_digits_split()
    with torch.no_grad():
        ref = model(ds.x_test).numpy()
    out = run_qonnx(str(path), ds.x_test.numpy()) if fmt == "qonnx" else run_ort(str(path), ds.x_test.numpy())
    assert (out.argmax(1) == ref.argmax(1)).all()
    assert np.abs(out - ref).max() < 1e-3
    info = describe_onnx(onnx.load(str(path)))
    assert info["format"] == fmt
    assert info["bit_map"] == json.loads((runs[case] / "bitmap.json").read_text())
    assert not list(tmp_path.glob("*.data")) and not list(tmp_path.glob("*.tmp"))


def test_qonnx_carries_each_layers_width(runs, tmp_path):
    path = tmp_path / "m.onnx"
    export_run(runs["cnn_mixed"], "qonnx", path)
    widths = sorted(describe_onnx(onnx.load(str(path)))["quant_widths"])
    # weights 7,2,3,5 and activation sites 8,4,2,6 (one Quant node each)
    assert widths == sorted([7, 2, 3, 5, 8, 4, 2, 6])


def test_qcdq_subbyte_uses_clip(runs, tmp_path):
    path = tmp_path / "m.onnx"
    export_run(runs["resnet20_w2a2"], "qcdq", path)
    ops = describe_onnx(onnx.load(str(path)))["ops"]
    assert ops.get("Clip", 0) > 0 and ops.get("QuantizeLinear", 0) > 0 and ops.get("Add", 0) >= 9


def test_one_bit_exports_as_bipolar_qonnx_and_is_refused_by_qcdq(runs, tmp_path):
    res = export_run(runs["mlp_w1a1"], "qonnx", tmp_path / "b.onnx")
    assert res.report.passed
    assert describe_onnx(onnx.load(str(tmp_path / "b.onnx")))["ops"].get("BipolarQuant", 0) > 0
    with pytest.raises(BitfoldError, match="QCDQ cannot represent 1-bit"):
        export_run(runs["mlp_w1a1"], "qcdq", tmp_path / "b2.onnx")
    assert not (tmp_path / "b2.onnx").exists()


def test_mismatch_is_refused_and_leaves_existing_file_intact(runs, tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    export_run(runs["cnn_mixed"], "qcdq", path)
    before = path.read_bytes()
    real_finish = onnx_export._finish

    def corrupt(fmt, p, bit_map, step=0.0):  # flip the sign of one weight tensor after export
        real_finish(fmt, p, bit_map, step)
        m = onnx.load(str(p))
        init = max(m.graph.initializer, key=lambda t: np.prod(t.dims))
        arr = -onnx.numpy_helper.to_array(init)
        init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
        onnx.save(m, str(p))

    monkeypatch.setattr(onnx_export, "_finish", corrupt)
    with pytest.raises(BitfoldError, match="does not match the torch model"):
        export_run(runs["cnn_mixed"], "qcdq", path)
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".*tmp"))


def test_fractional_bit_width_is_refused(runs, monkeypatch):
    _, model, _ = load_run(runs["cnn_mixed"])
    wq = model.convs[1].weight_quant
    monkeypatch.setattr(type(wq), "bit_width", lambda self: torch.tensor(2.58))
    with pytest.raises(BitfoldError, match="non-integer bit-widths"):
        check_exportable(model, "qonnx")


def test_float_model_and_unknown_format_are_refused(runs, tmp_path):
    from bitfold.toolchain.models import build_model
    fm = build_model("cnn", (1, 8, 8), 10, method="float")
    with pytest.raises(BitfoldError, match="float model"):
        export_model(fm, "qonnx", tmp_path / "f.onnx", torch.zeros(2, 1, 8, 8))
    with pytest.raises(BitfoldError, match="unknown export format"):
        export_run(runs["cnn_mixed"], "tflite", tmp_path / "x.onnx")


def test_compare_gate():
    """Float mode: rounding-boundary flips of at most one output step on at most 2 % of samples."""
    ref = np.array([[0.0, 1.0], [1.0, 0.0]])
    assert compare("qcdq", "x", ref, ref + 1e-6).passed
    assert not compare("qcdq", "x", ref, ref[:, ::-1]).passed
    many = np.tile(np.array([[0.0, 5.0]]), (100, 1))
    flipped = many.copy()
    flipped[:2, 1] += 0.1  # 2 % one-step flips: accepted with a step of 0.1
    rep = compare("qcdq", "x", many, flipped, step=0.1)
    assert rep.passed and rep.flips == 2 and rep.max_flips == 2 and rep.worst_sample in (0, 1)
    assert not compare("qcdq", "x", many, flipped).passed                 # no step known: no flip allowed
    assert not compare("qcdq", "x", many, flipped, step=0.05).passed      # a flip larger than one step
    flipped[2, 1] += 0.1  # 3 % : refused (the old gate accepted up to 5 %)
    assert not compare("qcdq", "x", many, flipped, step=0.1).passed
    assert not compare("qcdq", "x", many, many[:50]).passed


def test_gate_refuses_what_the_old_gate_let_through():
    """Seen with the old gate (<= 5 % of samples beyond tolerance by any amount, argmax >= 99 %):
    17 of 359 samples off by 36 with 3 flipped predictions passed, and with 20 samples one sample
    off by 1000 passed."""
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(359, 10))
    out = ref.copy()
    top = ref.argmax(1)
    out[np.arange(14), top[:14]] += 36.0                 # 14 samples off by 36, argmax kept
    out[np.arange(14, 17), (top[14:17] + 1) % 10] += 36.0  # 3 flipped predictions (argmax 99.2 %)
    assert not compare("qonnx", "x", ref, out, step=0.5).passed
    small = rng.normal(size=(20, 10))
    bad = small.copy()
    bad[0, 3] += 1000.0
    rep = compare("tvm", "x", small, bad, step=0.5)
    assert not rep.passed and rep.worst_sample == 0 and "worst sample #0" in rep.summary()


def test_exact_gate_is_exact():
    a = np.arange(60).reshape(20, 3)
    assert compare_exact("rtl", "verilator", a, a.copy()).passed
    b = a.copy()
    b[7, 1] += 1
    rep = compare_exact("rtl", "verilator", a, b)
    assert not rep.passed and rep.flips == 1 and rep.worst_sample == 7 and "19/20 equal" in rep.summary()


@pytest.mark.parametrize("unsafe,allow,written", [(True, True, True), (False, True, False), (True, False, False)])
def test_a_runtime_that_saturates_is_accepted_only_where_saturation_was_allowed(tmp_path, monkeypatch, unsafe,
                                                                                  allow, written):
    """OpenVINO's fused u8 x s8 kernels can saturate int16 pair sums on 8-bit layers (seen on this project's
    VM, depending on the machine's state: 64 flips on a W8A8 MLP that the reference executor computes
    exactly). With --allow-int16-saturation and a layer that can saturate, that difference is recorded as
    accepted; without the flag, or when no layer can saturate, the file is refused as before."""
    from bitfold.export.verify import VerifyReport
    from bitfold.toolchain.models import build_model
    from bitfold.toolchain.train import init_activation_stats

    def fake_verify(fmt, path, x, ref, step, **tol):
        rep = VerifyReport(format=fmt, executor="onnxruntime", samples=len(x), max_abs_diff=1e-6,
                           median_abs_diff=0.0, tolerance=1e-3, outlier_fraction=0.0, argmax_agreement=1.0,
                           passed=False, step=float(step), flips=0, max_flips=1)
        rep.runtimes = [{"executor": "OpenVINO CPU", "passed": False, "max_abs_diff": 1e-6, "flips": 40,
                         "argmax_agreement": 1.0}]
        return rep
    monkeypatch.setattr(onnx_export, "verify_file", fake_verify)
    bounds = [{"node": "MatMul_0", "safe": not unsafe}]
    monkeypatch.setattr(onnx_export, "check_int8_kernels", lambda path, allow_saturation: bounds)
    torch.manual_seed(0)
    m = build_model("mlp", (1, 8, 8), 10, bits="w4a4")
    init_activation_stats(m, torch.rand(32, 1, 8, 8), 16)
    out = tmp_path / "m.qcdq.onnx"
    if written:
        res = export_model(m.eval(), "qcdq", out, torch.rand(8, 1, 8, 8), allow_saturation=allow)
        rt = json.loads((tmp_path / "m.qcdq.onnx.verify.json").read_text())["runtimes"][0]
        assert res.report.passed and "int16 pair-sum saturation allowed" in rt["accepted"] and out.is_file()
        assert "differs, accepted" in res.report.summary()
    else:
        with pytest.raises(BitfoldError, match="OpenVINO CPU computes this QCDQ file differently"):
            export_model(m.eval(), "qcdq", out, torch.rand(8, 1, 8, 8), allow_saturation=allow)
        assert not out.exists()
