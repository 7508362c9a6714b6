"""TVM backend (Relax ONNX frontend) for ARM / host CPUs.

``build(model.qcdq.onnx, board, out_dir)``:

1. imports the QCDQ export with ``tvm.relax.frontend.onnx.from_onnx`` at batch 1;
2. lowers every quantized conv/matmul (``dequantize -> conv/matmul``) to int8 x int8 -> int32 kernels
   (:mod:`.int_lowering`; ``integer=False`` keeps TVM's float fake-quant), or - for layers of <= 4 bits
   with unsigned inputs - to bit-serial kernels (:mod:`.bitserial`), each such layer timed both ways
   on the host and the faster kept; then legalizes and fuses;
3. tunes the conv/matmul kernels with MetaSchedule (``tune_trials`` per kernel; the board's tuning
   database is applied on every build and only kernels without a record are tuned, :mod:`.tune`);
   kernels without a record get the default schedules of :mod:`.schedules`;
4. adds one entry function per fused kernel (:mod:`.kernels`) so each layer can be timed alone;
5. compiles for the board's target: ``llvm`` with the board's triple / CPU / ``mattr`` (the host's CPU is
   asked from LLVM); a foreign triple is cross-compiled and linked with ``<triple>-g++``;
6. verifies before anything is written: the module compiled for the host runs on seeded random inputs
   and is compared with onnxruntime (QDQ fusions off) under the export gate; an aarch64 library is also
   run under qemu-user when the arm64 sysroot exists (:mod:`.qemu`, ``bitfold setup arm64``);
7. times a host build next to onnxruntime's default session on the same file (batch 1, alternating
   rounds) and says both;
8. writes ``model.so`` and ``build.json`` (target, versions, input, source hash, bit map, per-layer
   int/float report and kernel (int8 / bit-serial, with the timings that chose it), kernels, tuning
   summary, verification, latency next to onnxruntime).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np

from bitfold.core.events import events_of
from bitfold.core.errors import BitfoldError, ToolMissingError

from bitfold.export.backends import BuildResult, staged_dir
from bitfold.export.onnx_io import describe_onnx, load_onnx
from bitfold.export.verify import compare, output_step_of, run_ort


def import_tvm():
    try:
        import tvm
        from tvm import relax  # noqa: F401
    except ImportError as e:
        raise ToolMissingError("the TVM backend needs apache-tvm, which is not installed",
                               "pip install apache-tvm") from e
    return tvm


def target_for(board, host: bool):
    """A TVM target dict for the board (or for this host when ``host``)."""
    tvm = import_tvm()
    if host:
        import os

        from tvm.target import codegen
        return tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(),
                                  "num-cores": int(os.cpu_count() or 1)})
    spec = {"kind": "llvm", "mtriple": board.triple, "num-cores": int(board.cores or 1)}
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
    import_tvm()
    from tvm.relax.frontend.onnx import from_onnx
    try:
        return from_onnx(model, shape_dict={name: shape})
    except Exception as e:  # noqa: BLE001
        raise BitfoldError(f"TVM's ONNX frontend cannot import this model ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]})",
                           "export with `bitfold export RUN --format qcdq`") from e


def run_vm(lib_path: Path, x: np.ndarray) -> np.ndarray:
    tvm = import_tvm()
    from tvm import relax
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib_path)), tvm.cpu())
    outs = []
    for i in range(len(x)):
        o = vm["main"](tvm.runtime.tensor(x[i:i + 1], tvm.cpu()))
        outs.append((o if hasattr(o, "numpy") else o[0]).numpy())
    return np.concatenate(outs)


KERNEL_MODES = ("auto", "int8", "bitserial")


def check_kernel_mode(mode: str) -> None:
    if mode not in KERNEL_MODES:
        raise BitfoldError(f"unknown kernel choice {mode!r}", f"use one of: {', '.join(KERNEL_MODES)}")


def compile_module(model, board, *, integer: bool = True, tune_trials: int = 0, retune: bool = False,
                   tracker: str | None = None, key: str | None = None, events=None, for_host: bool = False,
                   bitserial=(), operands=None):
    """ONNX model -> (prepared Relax module with kernel entries, info dict).

    Imports with the Relax ONNX frontend, lowers quantized conv/matmul to integer kernels (``integer``),
    legalizes and fuses, tunes with MetaSchedule (``tune_trials``; per-board database, reused) and
    applies the database; kernels without a record get the default schedules (:mod:`.schedules`). The
    module is ready for ``tvm.compile``. ``for_host`` compiles a foreign board's model for this host
    instead (the host-side check of a cross build). ``bitserial``: indices of the layers to run as
    bit-serial kernels where they qualify (:mod:`.bitserial`), ``operands`` the model's
    :func:`.bitserial.operands` when the caller has them.
    """
    from bitfold.export.tvm import bitserial as tvm_bs, int_lowering as tvm_int, kernels as tvm_kernels, \
        schedules as tvm_sched, tune as tvm_tune
    name, shape = _input_spec(model)
    mod = import_relax(model, name, shape)
    layers = []
    if integer:
        mod, layers = tvm_int.lower_to_integer(mod, tvm_int.onnx_compute_layers(model),
                                               tvm_bs.operands(model) if operands is None else operands, bitserial)
    mod = tvm_tune.prepare(mod)
    host = for_host or is_host(board)
    target = target_for(board, host)
    cross = None if host else f"{board.triple}-g++"
    work = tvm_tune.db_dir(board.name, target)
    tuning = {"database": str(work), "trials": 0}
    if tune_trials > 0:
        if not host and tracker is None:
            raise BitfoldError(f"tuning for {board.name} runs the candidates on the board",
                               f"pass --tracker HOST:PORT [--key {board.rpc_key or board.name}] "
                               f"(see `bitfold rpc-server`), or --tune-trials 0")
        tuning = tvm_tune.tune(mod, target, work, tune_trials, retune=retune, tracker=tracker,
                               key=key or board.rpc_key or board.name, cross=cross, events=events)
    mod, applied = tvm_tune.apply(mod, target, work)
    tuning["kernels_scheduled"] = applied
    mod, tuning["default_scheduled"] = tvm_sched.apply_default(mod)
    mod, kernels = tvm_kernels.add_kernel_entries(mod, layers)
    return mod, {"target": target, "host": host, "cross": cross, "layers": [la.as_dict() for la in layers],
                 "kernels": kernels, "tuning": tuning, "input": (name, shape)}


def choose_kernels(model, board, mode: str, *, events=None, **compile_kw) -> tuple[dict, dict]:
    """Which layers run bit-serial, in which variant: ``({index: variant}, record)``.

    ``int8``: none; ``bitserial``: every layer that qualifies; ``auto``: on this host, each qualifying
    layer's fused kernel is timed as int8 and as bit-serial kernel variants (same requantize chain) and
    the fastest is kept; for a foreign board (nothing to time it on here) every layer stays int8.
    """
    from bitfold.export.tvm import bitserial as tvm_bs
    check_kernel_mode(mode)
    ops = tvm_bs.operands(model)
    able = {i for i, o in enumerate(ops) if o.why_not() is None}
    record = {"mode": mode, "eligible": [ops[i].layer for i in sorted(able)]}
    if mode == "bitserial" and not able:
        why = "; ".join(f"{o.layer}: {o.why_not()}" for o in ops) or "it has no Conv/Gemm/MatMul layer"
        raise BitfoldError(f"--kernels bitserial: no layer of this model can run bit-serial ({why})",
                           "the bit-serial kernels take <= 4-bit signed or bipolar (+-1) weights and <= 4-bit "
                           "unsigned inputs (zero point 0), groups 1, dilation 1; build with --kernels auto or int8")
    if mode == "int8" or not able:
        return {}, record
    if mode == "bitserial":
        return {i: "" for i in able}, record
    if not is_host(board):
        record["note"] = (f"not timed: {board.name} is not this host; every layer runs int8 "
                          f"(--kernels bitserial forces the bit-serial kernels)")
        return {}, record
    tvm = import_tvm()
    from tvm import relax

    from bitfold.export.tvm.kernels import time_kernels
    # the int8 kernel, and the bit-serial kernel in its variants: convolutions vary in packing word and loop
    # nest, and no one variant was fastest on every shape (measured 3x3 convs: 2.8-165 us for one layer)
    convs = any(ops[i].op == "conv2d" for i in able)
    variants = [("int8", None), ("bitserial", "")] + \
        ([("bitserial", "x"), ("bitserial", "k32"), ("bitserial", "k32n")] if convs else [])
    events_of(events).say(f"timing {len(able)} layer(s) as int8 and {len(variants) - 1} bit-serial kernel "
                          f"variant(s) on this host")
    per_layer = {}
    for kind, variant in variants:
        sel = {} if variant is None else {i: variant for i in able}
        mod, info = compile_module(model, board, bitserial=sel, operands=ops, **compile_kw)
        vm = relax.VirtualMachine(tvm.compile(mod, info["target"]), tvm.cpu())
        ks = [k for k in info["kernels"] if "layer" in k]
        for row in time_kernels(vm, tvm.cpu(), ks, number=50, repeat=7):
            per_layer.setdefault(row["layer"], {})[(kind, variant)] = row["median"]
    chosen, rows = {}, []
    for i in sorted(able):
        t = per_layer.get(ops[i].layer, {})
        if ops[i].op != "conv2d":
            t = {k: v for k, v in t.items() if k[1] in (None, "")}
        best = min(t, key=t.get) if t else ("int8", None)
        if best[0] == "bitserial":
            chosen[i] = best[1]
        serial = {k[1]: v for k, v in t.items() if k[0] == "bitserial"}
        rows.append({"layer": ops[i].layer, "bits": ops[i].label, "int8_s": t.get(("int8", None)),
                     "bitserial_s": min(serial.values()) if serial else None,
                     "bitserial_variants_s": {v or "default": s for v, s in serial.items()},
                     "chosen": "bitserial" if i in chosen else "int8",
                     "variant": (chosen.get(i) or "default") if i in chosen else None})
    record["measured"] = rows
    return chosen, record


def build(onnx_path: Path, board, out_dir: Path, samples: int = 32, integer: bool = True, tune_trials: int = 0,
          retune: bool = False, tracker: str | None = None, key: str | None = None, events=None,
          qemu: bool | None = None, kernels: str = "auto") -> BuildResult:
    """Compile a QCDQ export for a CPU board into ``out_dir`` (``model.so`` + ``build.json``), verified.

    ``qemu``: run a cross-compiled (aarch64) library under qemu-user and compare it with onnxruntime
    (None: when the arm64 sysroot of ``bitfold setup arm64`` is there; True: required).
    ``kernels``: ``auto`` (sub-8-bit layers timed as int8 and bit-serial on this host, the faster kept),
    ``int8`` or ``bitserial`` (every layer that qualifies) - see :func:`choose_kernels`.
    """
    tvm = import_tvm()
    model = load_onnx(onnx_path)
    info = describe_onnx(model)
    if info["format"] == "qonnx":
        raise BitfoldError(f"{onnx_path} is a QONNX file; the TVM backend takes standard ONNX",
                           "export with `bitfold export RUN --format qcdq`")
    if board.kind != "cpu":
        raise BitfoldError(f"board {board.name} is an FPGA board; the TVM backend builds for CPU boards")
    if not is_host(board):
        cross = f"{board.triple}-g++"
        if shutil.which(cross) is None:
            raise ToolMissingError(f"cross-compiling for {board.name} needs {cross}, which is not installed",
                                   f"Debian/Ubuntu: apt-get install g++-{board.triple.split('-')[0]}-linux-gnu")
    if tune_trials < 0:
        raise BitfoldError(f"--tune-trials must be >= 0, got {tune_trials}")
    check_kernel_mode(kernels)
    t0 = time.perf_counter()
    serial, choice = (choose_kernels(model, board, kernels, events=events) if integer
                      else ({}, {"mode": "float"}))
    mod, cinfo = compile_module(model, board, integer=integer, tune_trials=tune_trials, retune=retune,
                                tracker=tracker, key=key, events=events, bitserial=serial)
    tune_s = time.perf_counter() - t0
    target, cross = cinfo["target"], cinfo["cross"]
    name, shape = cinfo["input"]
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
            hmod, _ = compile_module(model, board, integer=integer, for_host=True, bitserial=serial)
            tvm.compile(hmod, target_for(board, True)).export_library(str(host_lib))
        else:
            ex.export_library(str(lib))
            host_lib = lib
        ref = run_ort(str(onnx_path), x, exact=True)
        step = output_step_of(onnx_path)
        report = compare("tvm", "tvm relax VM (host)", ref, run_vm(host_lib, x), step)
        if host_lib != lib:
            host_lib.unlink()
        if not report.passed:
            raise BitfoldError(f"TVM output does not match onnxruntime - {report.summary()}",
                               "nothing was written; please report this model as a bitfold bug")
        notes, emulated = [], None
        if cross and board.triple.startswith("aarch64"):
            import bitfold.export.tvm.qemu as qemu_mod
            if qemu or (qemu is None and qemu_mod.is_ready()):
                events_of(events).say("running the aarch64 library under qemu")
                y, line = qemu_mod.run(lib, x)
                erep = compare("tvm-aarch64", "tvm aarch64 under qemu-user", ref, y, step)
                if not erep.passed:
                    raise BitfoldError(f"the aarch64 library does not match onnxruntime under qemu - {erep.summary()}",
                                       "nothing was written; please report this model as a bitfold bug")
                emulated = {**erep.as_dict(), "runner": line}
                notes.append(f"aarch64 library checked under qemu-user: {line}")
        elif cross and qemu:
            raise BitfoldError(f"--qemu runs aarch64 builds; {board.name} is {board.triple}")
        if cross and emulated is None:
            notes.append(f"{lib.name} is {board.triple} code: the host check ran the same Relax module compiled "
                         f"for the host; run it on the board, or set up qemu (bitfold setup arm64) to check the ARM code")
        latency = None
        if not cross:
            latency = latency_vs_ort(lib, onnx_path, x[:1])
            notes.append(f"latency on this host, batch 1: TVM {latency['tvm_s'] * 1e3:.4f} ms, onnxruntime "
                         f"(default session) {latency['onnxruntime_s'] * 1e3:.4f} ms ({latency['ratio']:.2f}x)")
        n_int = sum(1 for la in cinfo["layers"] if la["arith"] == "int")
        meta = {"board": board.name, "backend": "tvm", "target": str(target), "tvm": tvm.__version__,
                "input": {"name": name, "shape": list(shape)},
                "source": {"path": str(onnx_path), "sha256": hashlib.sha256(Path(onnx_path).read_bytes()).hexdigest()},
                "bit_map": info["bit_map"], "compile_seconds": compile_s, "tune_seconds": tune_s,
                "integer_lowering": integer, "layers": cinfo["layers"], "kernel_choice": choice,
                "kernels": cinfo["kernels"],
                "tuning": cinfo["tuning"], "artefacts": {"library": lib.name},
                "verification": report.as_dict(), "verification_emulated": emulated,
                "latency_vs_onnxruntime": latency, "notes": notes}
        (tmp / "build.json").write_text(json.dumps(meta, indent=2) + "\n")
    notes = notes + [f"{n_int}/{len(cinfo['layers'])} conv/matmul layers run in integer arithmetic"
                     if integer else "integer lowering off: layers run as float fake-quant"]
    n_bs = sum(1 for la in cinfo["layers"] if la.get("kernel", "").startswith("bitserial"))
    if integer and choice.get("eligible"):
        notes.append(f"{n_bs}/{len(choice['eligible'])} sub-8-bit layer(s) run bit-serial ({choice['mode']})"
                     + (f"; {choice['note']}" if choice.get("note") else ""))
    return BuildResult(Path(out_dir), board.name, "tvm", {"library": str(Path(out_dir) / "model.so")},
                       verified=True, verification=report.as_dict(), notes=notes)


def latency_vs_ort(lib_path: Path, onnx_path: Path, x1: np.ndarray, rounds: int = 7, steps: int = 30) -> dict:
    """Median seconds per batch-1 inference of the build and of onnxruntime's default session (what a user
    of the same file gets), timed in alternating rounds on this host with each runtime's default threads."""
    import onnxruntime as ort

    from bitfold.core.timing import interleaved
    tvm = import_tvm()
    from tvm import relax
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib_path)), tvm.cpu())
    xt = tvm.runtime.tensor(x1, tvm.cpu())
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x1}
    med = interleaved({"tvm": lambda: vm["main"](xt), "onnxruntime": lambda: sess.run(None, feed)},
                      rounds=rounds, steps=steps, warmup=1)
    return {"tvm_s": med["tvm"], "onnxruntime_s": med["onnxruntime"], "ratio": med["tvm"] / med["onnxruntime"],
            "rounds": rounds, "steps": steps}


def _summary(res) -> dict:
    res = np.asarray(res)
    return {"median": float(np.median(res)), "p10": float(np.percentile(res, 10)),
            "p90": float(np.percentile(res, 90)), "std": float(np.std(res))}


def time_build(vm, dev, meta: dict, number: int, repeat: int, layers: bool = True) -> dict:
    """Whole-model and per-kernel timing of a loaded build on ``dev`` (local or remote)."""
    tvm = import_tvm()
    from bitfold.export.tvm.kernels import time_kernels
    x = tvm.runtime.tensor(np.random.default_rng(0).standard_normal(meta["input"]["shape"]).astype("float32"), dev)
    out = _summary(vm.time_evaluator("main", dev, number=number, repeat=repeat)(x).results)
    out.update({"number": number, "repeat": repeat, "tvm": tvm.__version__})
    if layers and meta.get("kernels"):
        out["kernels"] = time_kernels(vm, dev, meta["kernels"], number, repeat)
    return out


def load_build_meta(build_dir: Path) -> dict:
    """A TVM build directory's ``build.json``; one clear error for anything else."""
    try:
        meta = json.loads((Path(build_dir) / "build.json").read_text())
    except (OSError, ValueError):
        raise BitfoldError(f"{build_dir} is not a TVM build directory (no readable build.json)",
                           "make one with: bitfold build model.qcdq.onnx --board host-cpu -o DIR") from None
    if not isinstance(meta, dict) or meta.get("backend", "tvm") != "tvm" or not (Path(build_dir) / "model.so").is_file():
        raise BitfoldError(f"{build_dir} is not a TVM build (backend {meta.get('backend') if isinstance(meta, dict) else '?'!r}"
                           f", model.so {'present' if (Path(build_dir) / 'model.so').is_file() else 'missing'})",
                           "bitfold measure times TVM builds of CPU boards")
    return meta


def measure_local(build_dir: Path, number: int = 20, repeat: int = 7, layers: bool = True) -> dict:
    """Time a host build with TVM's time_evaluator: whole model and each kernel, median / p10 / p90 seconds."""
    tvm = import_tvm()
    from tvm import relax
    build_dir = Path(build_dir)
    meta = load_build_meta(build_dir)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(build_dir / "model.so")), tvm.cpu())
    return time_build(vm, tvm.cpu(), meta, number, repeat, layers)
