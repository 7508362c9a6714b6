"""TVM backend: real Relax import + LLVM compile, verified against onnxruntime."""
import json
import shutil

import pytest

from bitfold.export.backends import build
from bitfold.toolchain.errors import BitfoldError

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

    from bitfold.export.tvm_backend import run_vm
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
