"""TVM backend (Relax ONNX frontend) for ARM / host CPUs.

``build(model.qcdq.onnx, board, out_dir)``:

1. imports the QCDQ export with ``tvm.relax.frontend.onnx.from_onnx`` at batch 1;
2. compiles for the board's target: ``llvm`` with the board's triple / CPU / ``mattr``
   (the host's CPU is asked from LLVM); a foreign triple is cross-compiled and linked with
   ``<triple>-g++`` (Debian: ``g++-aarch64-linux-gnu``);
3. writes ``model.so`` and ``build.json`` (target, versions, input, source hash, bit map);
4. verifies: the same Relax module compiled for the host runs on seeded random inputs and is
   compared with onnxruntime (QDQ fusions off) under the export gate. For a cross build this checks
   the import and lowering, not the ARM code generator (that needs the board or qemu).

Known limits (apache-tvm 0.27): QuantizeLinear/DequantizeLinear are computed as fake-quant (float
conv/matmul on dequantized weights); MetaSchedule tuning is not used here (it crashes in the
0.27.0.post1 wheel, see STACK.md).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np

from bitfold.toolchain.errors import BitfoldError, ToolMissingError

from .backends import BuildResult, staged_dir
from .onnx_io import describe_onnx, load_onnx
from .verify import compare, run_ort


def _import_tvm():
    try:
        import tvm
        from tvm import relax  # noqa: F401
    except ImportError as e:
        raise ToolMissingError("the TVM backend needs apache-tvm, which is not installed",
                               "pip install apache-tvm") from e
    return tvm


def target_for(board, host: bool):
    """A TVM target dict for the board (or for this host when ``host``)."""
    tvm = _import_tvm()
    if host:
        from tvm.target import codegen
        return tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
    spec = {"kind": "llvm", "mtriple": board.triple}
    if board.cpu and board.cpu not in ("native", "generic", "detect"):
        spec["mcpu"] = board.cpu
    if board.mattr:
        spec["mattr"] = list(board.mattr)
    return tvm.target.Target(spec)


def is_host(board) -> bool:
    import platform
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    return board.name == "host-cpu" or (board.triple or "").split("-")[0] == arch


def _input_spec(model):
    inp = model.graph.input[0]
    dims = [d.dim_value if d.dim_value > 0 else 1 for d in inp.type.tensor_type.shape.dim]
    return inp.name, tuple(dims)


def import_relax(model, name, shape):
    _import_tvm()
    from tvm.relax.frontend.onnx import from_onnx
    try:
        return from_onnx(model, shape_dict={name: shape})
    except Exception as e:  # noqa: BLE001
        raise BitfoldError(f"TVM's ONNX frontend cannot import this model ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]})",
                           "export with `bitfold export RUN --format qcdq`") from e


def run_vm(lib_path: Path, x: np.ndarray) -> np.ndarray:
    tvm = _import_tvm()
    from tvm import relax
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib_path)), tvm.cpu())
    outs = []
    for i in range(len(x)):
        o = vm["main"](tvm.runtime.tensor(x[i:i + 1], tvm.cpu()))
        outs.append((o if hasattr(o, "numpy") else o[0]).numpy())
    return np.concatenate(outs)


def build(onnx_path: Path, board, out_dir: Path, samples: int = 32) -> BuildResult:
    tvm = _import_tvm()
    model = load_onnx(onnx_path)
    info = describe_onnx(model)
    if info["format"] == "qonnx":
        raise BitfoldError(f"{onnx_path} is a QONNX file; the TVM backend takes standard ONNX",
                           "export with `bitfold export RUN --format qcdq`")
    if board.kind != "cpu":
        raise BitfoldError(f"board {board.name} is an FPGA board; the TVM backend builds for CPU boards")
    name, shape = _input_spec(model)
    mod = import_relax(model, name, shape)
    host = is_host(board)
    target = target_for(board, host)
    cross = None
    if not host:
        cross = f"{board.triple}-g++"
        if shutil.which(cross) is None:
            raise ToolMissingError(f"cross-compiling for {board.name} needs {cross}, which is not installed",
                                   f"Debian/Ubuntu: apt-get install g++-{board.triple.split('-')[0]}-linux-gnu")
    t0 = time.perf_counter()
    ex = tvm.compile(mod, target)
    compile_s = time.perf_counter() - t0
    x = np.random.default_rng(0).standard_normal((samples, *shape[1:])).astype(np.float32)
    with staged_dir(out_dir) as tmp:
        lib = tmp / "model.so"
        if cross:
            from tvm.support import cc
            ex.export_library(str(lib), fcompile=cc.cross_compiler(cross))
            host_lib = tmp / "host_check.so"
            tvm.compile(mod, target_for(board, True)).export_library(str(host_lib))
        else:
            ex.export_library(str(lib))
            host_lib = lib
        ref = run_ort(str(onnx_path), x, exact=True)
        report = compare("tvm", "tvm relax VM (host)", ref, run_vm(host_lib, x))
        if host_lib != lib:
            host_lib.unlink()
        if not report.passed:
            raise BitfoldError(f"TVM output does not match onnxruntime - {report.summary()}",
                               "nothing was written; please report this model as a bitfold bug")
        notes = []
        if cross:
            notes.append(f"{lib.name} is {board.triple} code: the host check ran the same Relax module compiled "
                         f"for the host; run it on the board (or under qemu) to check the ARM code")
        meta = {"board": board.name, "backend": "tvm", "target": str(target), "tvm": tvm.__version__,
                "input": {"name": name, "shape": list(shape)},
                "source": {"path": str(onnx_path), "sha256": hashlib.sha256(Path(onnx_path).read_bytes()).hexdigest()},
                "bit_map": info["bit_map"], "compile_seconds": compile_s, "artefacts": {"library": lib.name},
                "verification": report.as_dict(), "notes": notes}
        (tmp / "build.json").write_text(json.dumps(meta, indent=2) + "\n")
    return BuildResult(Path(out_dir), board.name, "tvm", {"library": str(Path(out_dir) / "model.so")},
                       verified=True, verification=report.as_dict(), notes=notes)


def measure_local(build_dir: Path, number: int = 20, repeat: int = 7) -> dict:
    """Time a host build's whole model with TVM's time_evaluator: median / p10 / p90 seconds."""
    tvm = _import_tvm()
    from tvm import relax
    build_dir = Path(build_dir)
    meta = json.loads((build_dir / "build.json").read_text())
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(build_dir / "model.so")), tvm.cpu())
    x = tvm.runtime.tensor(np.random.default_rng(0).standard_normal(meta["input"]["shape"]).astype("float32"), tvm.cpu())
    res = np.array(vm.time_evaluator("main", tvm.cpu(), number=number, repeat=repeat)(x).results)
    return {"median": float(np.median(res)), "p10": float(np.percentile(res, 10)), "p90": float(np.percentile(res, 90)),
            "std": float(np.std(res)), "number": number, "repeat": repeat, "tvm": tvm.__version__}
