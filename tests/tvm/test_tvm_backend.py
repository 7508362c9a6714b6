"""TVM backend: real Relax import + LLVM compile, verified against onnxruntime."""
import json
import shutil

import pytest

from bitfold.export.backends import build
from bitfold.core.errors import BitfoldError

pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install -e '.[tvm]')")


@pytest.fixture(scope="module")
def qcdq(trained_run, tmp_path_factory):
    from bitfold.export.onnx_export import export_run
    d = tmp_path_factory.mktemp("tvm")
    export_run(trained_run[0], "qcdq", d / "m.qcdq.onnx")
    export_run(trained_run[0], "qonnx", d / "m.qonnx.onnx")
    return d


def test_host_build_runs_and_matches_onnxruntime(qcdq, tmp_path):
    r = build(qcdq / "m.qcdq.onnx", "host-cpu", tmp_path / "b")
    assert r.verified and r.verification["argmax_agreement"] == 1.0
    meta = json.loads((tmp_path / "b" / "build.json").read_text())
    assert meta["input"]["shape"] == [1, 1, 8, 8] and meta["bit_map"]["convs.1"] == {"w": 2, "a": 4}
    # the library loads and runs standalone
    import numpy as np

    from bitfold.export.tvm.backend import run_vm
    from bitfold.export.verify import run_ort
    x = np.random.default_rng(1).random((4, 1, 8, 8), dtype=np.float32)
    assert np.abs(run_vm(tmp_path / "b" / "model.so", x) - run_ort(str(qcdq / "m.qcdq.onnx"), x)).max() < 1e-4


def test_rpi4_cross_build_is_aarch64(qcdq, tmp_path):
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64-linux-gnu-g++ is not installed (Debian: g++-aarch64-linux-gnu)")
    r = build(qcdq / "m.qcdq.onnx", "rpi4", tmp_path / "b")
    head = (tmp_path / "b" / "model.so").read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64
    assert r.notes and "aarch64" in r.notes[0]


def test_missing_cross_compiler_is_named(qcdq, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(BitfoldError, match="aarch64-linux-gnu-g\\+\\+"):
        build(qcdq / "m.qcdq.onnx", "rpi4", tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_bad_inputs_leave_an_existing_build_intact(qcdq, tmp_path):
    out = tmp_path / "b"
    build(qcdq / "m.qcdq.onnx", "host-cpu", out)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(BitfoldError, match="QONNX file"):
        build(qcdq / "m.qonnx.onnx", "host-cpu", out)
    with pytest.raises(BitfoldError, match="unknown board"):
        build(qcdq / "m.qcdq.onnx", "raspberry", out)
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(BitfoldError, match="not a valid ONNX"):
        build(tmp_path / "junk.onnx", "host-cpu", out)
    assert sorted(p.name for p in out.iterdir()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".b.")]


def test_qcdq_file_on_fpga_boards_is_refused(qcdq, tmp_path):
    # FPGA backends take QONNX; a QCDQ file gets one clear error on every FPGA board
    for board in ("pynq-z2", "ulx3s-85f"):
        with pytest.raises(BitfoldError, match="QCDQ"):
            build(qcdq / "m.qcdq.onnx", board, tmp_path / "b")
        assert not (tmp_path / "b").exists()


def test_fixed_batch_float_onnx_builds(tmp_path):
    import torch

    from bitfold.toolchain.models import build_model
    m = build_model("cnn", (1, 8, 8), 10, method="float").eval()
    torch.onnx.export(m, torch.zeros(1, 1, 8, 8), str(tmp_path / "fp.onnx"), input_names=["input"], dynamo=False)
    assert build(tmp_path / "fp.onnx", "host-cpu", tmp_path / "b").verified
    # nothing is quantized: every layer is reported as float, with the reason
    layers = json.loads((tmp_path / "b" / "build.json").read_text())["layers"]
    assert len(layers) == 4 and {la["arith"] for la in layers} == {"float"}
    assert all("not a dequantized integer tensor" in la["detail"] for la in layers)


def test_integer_lowering_runs_every_quantized_layer_in_int(qcdq, tmp_path):
    """The Relax pass rewrites dequantize -> conv/matmul into int8 x int8 -> int32 kernels; the build says
    so per ONNX layer, its kernels carry the layer names, and the result still matches onnxruntime."""
    import onnx

    from bitfold.export.tvm.int_lowering import lower_to_integer, onnx_compute_layers
    from bitfold.export.tvm.backend import import_relax
    r = build(qcdq / "m.qcdq.onnx", "host-cpu", tmp_path / "b")
    meta = json.loads((tmp_path / "b" / "build.json").read_text())
    assert meta["integer_lowering"] and r.verification["argmax_agreement"] == 1.0
    names = onnx_compute_layers(onnx.load(str(qcdq / "m.qcdq.onnx")))
    assert [la["layer"] for la in meta["layers"]] == names == ["/convs.0/Conv", "/convs.1/Conv", "/convs.2/Conv",
                                                                "/head/Gemm"]
    assert [la["arith"] for la in meta["layers"]] == ["int"] * 4
    assert meta["layers"][0]["detail"] == "int8 x int8 -> int32"       # signed 8-bit input quantizer
    assert meta["layers"][1]["detail"] == "uint8 x int8 -> int32"      # after ReLU: unsigned codes
    assert [k.get("layer") for k in meta["kernels"] if "layer" in k] == names
    # the rewritten module holds integer convolutions / matmuls and no float one
    model = onnx.load(str(qcdq / "m.qcdq.onnx"))
    mod, _ = lower_to_integer(import_relax(model, "input", (1, 1, 8, 8)))
    text = mod["main"].script(show_meta=False)
    assert text.count('out_dtype="int32"') == 4 and 'out_dtype="float32", axis=1)\n' not in text
    # --no-int keeps fake-quant float layers, still verified
    r2 = build(qcdq / "m.qcdq.onnx", "host-cpu", tmp_path / "f", integer=False)
    assert r2.verified and json.loads((tmp_path / "f" / "build.json").read_text())["layers"] == []


def _one_gemm_qcdq(path):
    """A one-layer QCDQ model written by hand: Q/DQ input, int8 weight -> DequantizeLinear -> Gemm."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "sx"),
             numpy_helper.from_array(np.array(0, np.int8), "zx"),
             numpy_helper.from_array(rng.integers(-7, 8, size=(16, 64)).astype(np.int8), "w"),
             numpy_helper.from_array(np.array(0.02, np.float32), "sw"),
             numpy_helper.from_array(np.array(0, np.int8), "zw"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"]),
             helper.make_node("Gemm", ["xd", "wd", "b"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "one_gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_tuning_database_is_per_board_and_reused(tmp_path):
    """MetaSchedule tunes (a tiny budget), the records land in the board's database, and a rebuild tunes
    nothing and applies them."""
    pytest.importorskip("xgboost", reason="MetaSchedule's cost model needs xgboost (pip install xgboost-cpu)")
    onnx_path = _one_gemm_qcdq(tmp_path / "fc.onnx")
    build(onnx_path, "host-cpu", tmp_path / "b1", tune_trials=4)
    t1 = json.loads((tmp_path / "b1" / "build.json").read_text())["tuning"]
    assert t1["tuned_now"] == t1["kernels"] == 1 and t1["trials"] > 0 and t1["kernels_scheduled"] == 1
    assert "host-cpu-" in t1["database"]
    r = build(onnx_path, "host-cpu", tmp_path / "b2", tune_trials=4)
    t2 = json.loads((tmp_path / "b2" / "build.json").read_text())["tuning"]
    assert r.verified and t2["tuned_now"] == 0 and t2["reused"] == t1["kernels"]
    assert t2["kernels_scheduled"] == t1["kernels_scheduled"] and t2["database"] == t1["database"]


def test_tuning_a_remote_board_needs_its_tracker(qcdq, tmp_path):
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64-linux-gnu-g++ is not installed (Debian: g++-aarch64-linux-gnu)")
    with pytest.raises(BitfoldError, match="runs the candidates on the board.*--tracker"):
        build(qcdq / "m.qcdq.onnx", "rpi4", tmp_path / "b", tune_trials=4)
    with pytest.raises(BitfoldError, match="--tune-trials must be >= 0"):
        build(qcdq / "m.qcdq.onnx", "host-cpu", tmp_path / "b", tune_trials=-1)
    assert not (tmp_path / "b").exists()


def test_rpi4_build_runs_correctly_under_qemu(arm64_sysroot, qcdq, tmp_path):
    r = build(qcdq / "m.qcdq.onnx", "rpi4", tmp_path / "b", qemu=True)
    meta = json.loads((tmp_path / "b" / "build.json").read_text())
    em = meta["verification_emulated"]
    assert em["passed"] and em["argmax_agreement"] == 1.0 and em["samples"] == 32
    assert em["runner"].startswith("machine=aarch64")
    assert any("checked under qemu-user" in n for n in r.notes)
    assert [la["arith"] for la in meta["layers"]] == ["int"] * 4


def test_qemu_check_without_sysroot_is_named(qcdq, tmp_path, monkeypatch):
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64-linux-gnu-g++ is not installed (Debian: g++-aarch64-linux-gnu)")
    from bitfold.core.errors import ToolMissingError
    monkeypatch.setenv("BITFOLD_ARM64_SYSROOT", str(tmp_path / "nowhere"))
    with pytest.raises(ToolMissingError, match="bitfold setup arm64"):
        build(qcdq / "m.qcdq.onnx", "rpi4", tmp_path / "b", qemu=True)
    assert not (tmp_path / "b").exists()
    # without --qemu the build goes on, saying the ARM code was not run
    r = build(qcdq / "m.qcdq.onnx", "rpi4", tmp_path / "b")
    assert json.loads((tmp_path / "b" / "build.json").read_text())["verification_emulated"] is None
    assert "bitfold setup arm64" in r.notes[0]
