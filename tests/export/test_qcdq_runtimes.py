"""QCDQ files compute the trained model in the runtimes users run, on CPUs with and without VNNI.

Without VNNI, onnxruntime's and OpenVINO's int8 kernels sum pairs of u8 x s8 products in a
saturating int16. This host's CPU may have VNNI, so the non-VNNI path is reached twice, for real:
onnxruntime under ``qemu-x86_64 -cpu Haswell`` (AVX2, no VNNI: its CPU dispatch picks the AVX2
kernel) and OpenVINO with ``ONEDNN_MAX_CPU_ISA=AVX2`` (oneDNN's ISA cap). A file bitfold writes
must pass the float gate in both; a full-range W8/A8 file - which bitfold refuses - does not.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from bitfold.core.errors import BitfoldError
from bitfold.export.onnx_export import export_run
from bitfold.export.verify import compare, output_step_of
from bitfold.toolchain.data import load_dataset
from bitfold.toolchain.runs import TrainConfig, load_run
from bitfold.toolchain.train import train

RUNNER = r"""
import sys, numpy as np
path, x = sys.argv[2], np.load(sys.argv[3])
if sys.argv[1] == "ort":
    import onnxruntime as ort
    so = ort.SessionOptions(); so.log_severity_level = 3
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    out = s.run(None, {s.get_inputs()[0].name: x})[0]
else:
    import openvino as ov
    c = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    out = np.concatenate([c(x[i:i + 1])[0] for i in range(len(x))])
np.save(sys.argv[4], out)
"""


def _qemu():
    q = shutil.which("qemu-x86_64-static") or shutil.which("qemu-x86_64")
    if q is None:
        pytest.skip("qemu-x86_64 (Debian package qemu-user-static) is not installed")
    return q


def _openvino():
    pytest.importorskip("openvino", reason="openvino (the test extra) is not installed")


def _without_vnni(runtime: str, onnx_path, x, tmp_path) -> np.ndarray:
    """The file's outputs in ``runtime`` (ort | openvino) on an x86 CPU without VNNI."""
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "runner.py").write_text(RUNNER)
    cmd = [sys.executable, str(tmp_path / "runner.py"), runtime, str(onnx_path), str(tmp_path / "x.npy"),
           str(tmp_path / "out.npy")]
    env = dict(os.environ)
    if runtime == "ort":
        cmd = [_qemu(), "-cpu", "Haswell"] + cmd
    else:
        env["ONEDNN_MAX_CPU_ISA"] = "AVX2"
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return np.load(tmp_path / "out.npy")


@pytest.fixture(scope="module")
def mlp_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qcdq_rt")
    for name, bits in (("w4a4", "w4a4"), ("w8a8_all", "w8a8:all")):
        train(TrainConfig(model="mlp", bits=bits, epochs=2), root / name, progress=False)
    return root


def _held_out(run_dir):
    cfg, model, _ = load_run(run_dir)
    ds = load_dataset(cfg.data)
    with torch.no_grad():
        ref = model.eval()(ds.x_test).numpy()
    return ds.x_test.numpy(), ref


def test_shorthand_export_passes_default_runtimes_with_and_without_vnni(mlp_runs, tmp_path):
    _openvino()
    run = mlp_runs / "w4a4"
    res = export_run(run, "qcdq", tmp_path / "m.onnx")
    names = [r["executor"] for r in res.report.runtimes]
    assert names == ["onnxruntime default session", "OpenVINO CPU"] and res.report.passed
    report = json.loads((tmp_path / "m.onnx.verify.json").read_text())
    assert report["int8_pair_sums"] and all(b["safe"] for b in report["int8_pair_sums"])
    x, ref = _held_out(run)
    step = output_step_of(tmp_path / "m.onnx")
    for runtime in ("ort", "openvino"):
        out = _without_vnni(runtime, tmp_path / "m.onnx", x, tmp_path)
        rep = compare("qcdq", f"{runtime} without VNNI", ref, out, step)
        assert rep.passed and rep.argmax_agreement == 1.0, rep.summary()


def test_full_range_w8a8_is_refused_and_would_saturate_without_vnni(mlp_runs, tmp_path):
    _openvino()
    run = mlp_runs / "w8a8_all"
    with pytest.raises(BitfoldError, match="int16 pair sums") as e:
        export_run(run, "qcdq", tmp_path / "m.onnx")
    assert "at most 7-bit weights" in e.value.hint and not (tmp_path / "m.onnx").exists()
    # what the refusal protects against: the same file, forced out, is wrong on a CPU without VNNI
    res = export_run(run, "qcdq", tmp_path / "m.onnx", allow_saturation=True)
    assert not all(b["safe"] for b in json.loads((tmp_path / "m.onnx.verify.json").read_text())["int8_pair_sums"])
    x, ref = _held_out(run)
    step = output_step_of(res.path)
    for runtime in ("ort", "openvino"):
        rep = compare("qcdq", f"{runtime} without VNNI", ref, _without_vnni(runtime, res.path, x, tmp_path), step)
        assert not rep.passed, rep.summary()
