"""bitfold <-> FINN subprocess contract, version 1. Runs INSIDE the FINN environment.

    <finn-env>/bin/python worker.py request.json      # build
    <finn-env>/bin/python worker.py --check           # print versions as JSON

This file imports nothing from bitfold (the FINN environment has no bitfold, and bitfold's
process never imports FINN). Request (JSON):

    {"contract": 1, "onnx": "...qonnx file", "out_dir": "...", "part": "xc7z020clg400-1",
     "board": "Pynq-Z2" | null, "clock_mhz": 100.0, "target_fps": 1000000 | null,
     "folding": "folding.json" | null, "stage": "estimate" | "bitstream",
     "verify_input": "in.npy", "verify_output": "out.npy", "verify_samples": "samples.npz" | null}

Result: ``<out_dir>/bitfold_result.json`` with ``status`` "ok" | "error" | "tool_missing", the
steps that ran, verification outcomes per step, FINN's estimate reports, the final folding and,
on failure, the failing step, the message and the nodes FINN could not convert to hardware.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from pathlib import Path

CONTRACT = 1
XILINX_TOOLS = ("vivado", "vitis_hls")


def _versions() -> dict:
    from importlib.metadata import version
    out = {"contract": CONTRACT, "python": sys.version.split()[0]}
    for p in ("finn-plus", "qonnx", "onnx", "onnxruntime", "numpy", "torch", "brevitas"):
        try:
            out[p] = version(p)
        except Exception:  # noqa: BLE001 - absent package
            out[p] = None
    return out


#: the build steps after which the model is executed in Python and compared with the export
#: (through partitioning, specialisation and folding); the tag names the check
STEP_CHECKS = {"step_qonnx_to_finn": "qonnx_to_finn", "step_tidy_up": "tidy_up", "step_streamline": "streamlined",
               "step_convert_to_hw": "hw_generic", "step_minimize_bit_width_initial": "hw_minimized",
               "step_create_dataflow_partition": "partitioned", "step_specialize_layers": "specialized",
               "step_apply_folding_config": "folded", "step_minimize_bit_width": "final"}


def _xilinx_missing() -> list[str]:
    missing = [t for t in XILINX_TOOLS if shutil.which(t) is None]
    if not os.environ.get("XILINX_VIVADO"):
        missing.append("XILINX_VIVADO (environment variable)")
    return missing


def _disable_xsi():
    """finn.xsi demands XILINX_VIVADO at import; the estimate flow never simulates with it."""
    import finn.xsi as xsi
    for name in getattr(xsi, "_LAZY_NAMES", ()):
        setattr(xsi, name, None)


def _non_hw_nodes(model_path: Path) -> list[str]:
    import onnx
    m = onnx.load(str(model_path))
    return [f"{n.op_type} ({n.name})" for n in m.graph.node if "fpgadataflow" not in (n.domain or "")]


def _python_view(model, work: Path):
    """A copy of ``model`` that executes in Python at every stage of the flow: the child models of
    StreamingDataflowPartition nodes are loaded, and their specialised layers (``X_hls`` /
    ``X_rtl``, which only cppsim/rtlsim can run) are put back to their HW-abstraction parent ``X``
    with every attribute the parent knows (folding, data types, weights and thresholds kept), so
    Python execution checks the numbers each step produced."""
    import copy

    import onnx
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.custom_op.registry import getCustomOp
    def generic(graph):
        for n in graph.node:
            if n.domain.endswith((".hls", ".rtl")) and n.op_type.endswith(("_hls", "_rtl")):
                n.domain, n.op_type = n.domain.rsplit(".", 1)[0], n.op_type[:-4]
                known = set(getCustomOp(n).get_nodeattr_types())
                keep = [a for a in n.attribute if a.name in known and a.name != "exec_mode"]
                del n.attribute[:]
                n.attribute.extend(keep)

    m = ModelWrapper(copy.deepcopy(model.model))
    generic(m.graph)
    for i, node in enumerate(m.graph.node):
        if node.op_type != "StreamingDataflowPartition":
            continue
        inst = getCustomOp(node)
        child = ModelWrapper(inst.get_nodeattr("model"))
        generic(child.graph)
        path = work / f"python_view_{i}.onnx"
        onnx.save(child.model, str(path))
        inst.set_nodeattr("model", str(path))
    return m


def _verify_python(samples_path, tag: str):
    """A custom build step: execute the current model in Python (:func:`_python_view`) on every
    verification sample and save its outputs (bitfold compares them with the export's outputs
    under its own gate)."""
    def step(model, cfg):
        import numpy as np
        from finn.core.onnx_exec import execute_onnx
        data = np.load(samples_path)
        x, ref = data["x"], data["y"]
        work = Path(cfg.output_dir) / "bitfold_python_view" / tag
        work.mkdir(parents=True, exist_ok=True)
        view = _python_view(model, work)
        iname, oname = model.graph.input[0].name, model.graph.output[0].name
        ishape = model.get_tensor_shape(iname)
        outs = []
        for i in range(len(x)):
            xi = x[i:i + 1]
            if list(xi.shape) != list(ishape) and int(np.prod(ishape)) == xi.size:
                xi = xi.transpose(0, 2, 3, 1) if len(ishape) == 4 and ishape[-1] == xi.shape[1] else xi
                xi = xi.reshape(ishape)
            outs.append(execute_onnx(view, {iname: xi})[oname].reshape(ref[i:i + 1].shape))
        np.save(Path(cfg.output_dir) / f"bitfold_verify_{tag}.npy", np.concatenate(outs))
        return model
    step.__name__ = f"step_bitfold_verify_{tag}"
    return step


def run(req: dict) -> dict:
    out_dir = Path(req["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FINN_BUILD_DIR", str(out_dir / "finn_tmp"))
    Path(os.environ["FINN_BUILD_DIR"]).mkdir(parents=True, exist_ok=True)
    res = {"contract": CONTRACT, "versions": _versions(), "stage": req.get("stage", "estimate")}
    missing = _xilinx_missing()
    want_hw = req.get("stage") == "bitstream"
    if missing:
        _disable_xsi()
        # FINN writes the Vivado version into its final metadata file even for estimate-only
        # builds; a placeholder path (never executed) lets that last write succeed
        os.environ.setdefault("XILINX_VIVADO", "/opt/Xilinx/not-installed")
    import finn.builder.build_dataflow as build
    import finn.builder.build_dataflow_config as bc

    def with_checks(steps):
        if not req.get("verify_samples"):
            return steps
        out = []
        for st in steps:
            out.append(st)
            tag = STEP_CHECKS.get(st)
            if tag:
                out.append(_verify_python(req["verify_samples"], tag))
        return out

    steps = with_checks(list(bc.estimate_only_dataflow_steps))
    if req.get("codegen"):
        steps.append("step_hw_codegen")      # HLS C++ / RTL sources; no Xilinx tool runs
    outputs = [bc.DataflowOutputType.ESTIMATE_REPORTS]
    verify = [bc.VerificationStepType.QONNX_TO_FINN_PYTHON, bc.VerificationStepType.TIDY_UP_PYTHON,
              bc.VerificationStepType.STREAMLINED_PYTHON]
    if want_hw and not missing:
        steps = with_checks(list(bc.default_build_dataflow_steps))
        outputs += [bc.DataflowOutputType.STITCHED_IP, bc.DataflowOutputType.RTLSIM_PERFORMANCE,
                    bc.DataflowOutputType.OOC_SYNTH, bc.DataflowOutputType.BITFILE,
                    bc.DataflowOutputType.PYNQ_DRIVER, bc.DataflowOutputType.DEPLOYMENT_PACKAGE]
        verify += [bc.VerificationStepType.FOLDED_HLS_CPPSIM, bc.VerificationStepType.STITCHED_IP_RTLSIM]
    cfg = bc.DataflowBuildConfig(
        output_dir=str(out_dir), synth_clk_period_ns=1000.0 / float(req["clock_mhz"]),
        fpga_part=req.get("part"), board=req.get("board"),
        shell_flow_type=bc.ShellFlowType.VIVADO_ZYNQ if want_hw else None,
        target_fps=req.get("target_fps"), folding_config_file=req.get("folding"),
        specialize_layers_config_file=req.get("specialize"),
        generate_outputs=outputs, steps=steps, verify_steps=verify,
        verify_input_npy=req["verify_input"], verify_expected_output_npy=req["verify_output"],
        save_intermediate_models=True, auto_fifo_depths=False)
    rc = build.build_dataflow_cfg(req["onnx"], cfg)
    log = (out_dir / "build_dataflow.log")
    text = log.read_text(errors="replace") if log.exists() else ""
    ran = [ln.split("Running step: ", 1)[1].split(" [")[0] for ln in text.splitlines() if "Running step: " in ln]
    res["steps"] = ran
    vdir = out_dir / "verification_output"
    res["verification"] = {}
    if vdir.exists():
        for f in sorted(vdir.glob("verify_*.npy")):
            name = f.stem[len("verify_"):]
            ok = name.endswith("_SUCCESS")
            res["verification"][name.rsplit("_", 1)[0]] = ok
    res["bitfold_verify"] = {f.stem[len("bitfold_verify_"):]: str(f) for f in sorted(out_dir.glob("bitfold_verify_*.npy"))}
    rep = out_dir / "report"
    res["estimates"] = {f.stem: json.loads(f.read_text()) for f in sorted(rep.glob("*.json"))} if rep.exists() else {}
    res["folding"] = _applied_folding(out_dir)
    if rc != 0:
        step = ran[-1] if ran else "start"
        tb = [ln for ln in text.splitlines() if ln.strip()]
        err = next((ln for ln in reversed(tb) if "Error" in ln or "Exception" in ln or "assert" in ln.lower()),
                   tb[-1] if tb else "unknown error")
        res.update(status="error", error={"step": step, "message": err.strip()[:600]})
        inter = sorted((out_dir / "intermediate_models").glob("*.onnx"), key=lambda p: p.stat().st_mtime)
        if inter and step in ("step_create_dataflow_partition", "step_specialize_layers", "step_convert_to_hw"):
            res["error"]["non_hw_nodes"] = _non_hw_nodes(inter[-1])
        return res
    if want_hw and missing:
        res.update(status="tool_missing", missing_tool=", ".join(missing))
        return res
    res["rtl_sources"] = _rtl_sources(out_dir) if req.get("codegen") else {}
    res["rtl_vectors"] = _rtl_vectors(out_dir, req.get("verify_samples")) if req.get("codegen") else {}
    import finn
    res["finn_rtllib"] = str(Path(finn.__file__).parent / "finn-rtllib")
    res["status"] = "ok"
    return res


#: RTL layers whose generated HDL instantiates Xilinx primitives (DSP48E1/E2, DSP58): simulating
#: them needs Vivado's unisim library, so they are linted, not simulated
XILINX_PRIMITIVE_OPS = {"MVAU_rtl": "DSP48/DSP58 primitives", "VVAU_rtl": "DSP48/DSP58 primitives"}


def _stream_order(inst, op_type: str, y):
    """A node's output tensor in the order its RTL streams it. Python execution of a depthwise
    sliding window (SIMD < channels) yields im2col order (kernel position, then channel); the
    hardware streams channel folds outside kernel positions (FINN's own SWG tests reorder their
    golden output the same way)."""
    if op_type.startswith("ConvolutionInputGenerator") and inst.get_nodeattr("depthwise"):
        simd, ch = inst.get_nodeattr("SIMD"), inst.get_nodeattr("IFMChannels")
        kh, kw = inst.get_nodeattr("ConvKernelDim")
        if simd < ch:
            shape = y.shape
            y = y.reshape(*shape[:-1], kh * kw, ch // simd, simd).swapaxes(-3, -2).reshape(shape)
    return y


def _rtl_vectors(out_dir: Path, samples_path) -> dict:
    """Stimulus and expected responses for simulating FINN's generated RTL layers outside FINN.

    For every ``*_rtl`` node of the code-generated model, the node's input and output tensors come
    from Python (HW-abstraction) execution of the whole model on every verification sample; they
    are packed into stream words the way FINN's own rtlsim packs them
    (``npy_to_rtlsim_input``, the node's folded shapes and padded stream widths). Written to
    ``<out_dir>/bitfold_rtlsim/<node>/`` as ``in.mem`` / ``expected.mem`` (hex, one word a line)
    and ``meta.json`` (top module, sources, widths, words per sample). Returns node -> meta (or
    ``{"skipped": reason}``); paths inside ``out_dir`` are written ``@/relative``."""
    import numpy as np
    from finn.core.onnx_exec import execute_onnx
    from finn.util.data_packing import npy_to_rtlsim_input
    from qonnx.core.datatype import DataType
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.custom_op.registry import getCustomOp
    models = sorted((out_dir / "intermediate_models").glob("*hw_codegen*.onnx"))
    if not models or not samples_path:
        return {}
    model = ModelWrapper(str(models[-1]))
    nodes = [n for n in model.graph.node if n.op_type.endswith("_rtl")]
    if not nodes:
        return {}
    root = out_dir / "bitfold_rtlsim"
    base = out_dir.resolve()

    def rel(p):      # paths inside the build as "@/..." (bitfold renames the build directory)
        p = Path(p).resolve()
        return f"@/{p.relative_to(base)}" if p.is_relative_to(base) else str(p)
    view = _python_view(model, root / "view")
    data = np.load(samples_path)
    iname = model.graph.input[0].name
    ishape = model.get_tensor_shape(iname)
    ctxs = []
    for i in range(len(data["x"])):
        xi = data["x"][i:i + 1]
        if list(xi.shape) != list(ishape) and int(np.prod(ishape)) == xi.size:
            xi = xi.transpose(0, 2, 3, 1) if len(ishape) == 4 and ishape[-1] == xi.shape[1] else xi
            xi = xi.reshape(ishape)
        ctxs.append(execute_onnx(view, {iname: xi.astype(np.float32)}, return_full_exec_context=True))
    out = {}
    for n in nodes:
        if n.op_type in XILINX_PRIMITIVE_OPS:
            out[n.name] = {"skipped": f"{n.op_type} uses {XILINX_PRIMITIVE_OPS[n.op_type]}: simulating it "
                                      "needs Vivado's unisim library"}
            continue
        inst = getCustomOp(n)
        idt, odt = inst.get_input_datatype(0), inst.get_output_datatype(0)
        if idt == DataType["BIPOLAR"] or odt == DataType["BIPOLAR"]:
            out[n.name] = {"skipped": "bipolar streams are not packed by this harness"}
            continue
        iw, ow = inst.get_instream_width_padded(0), inst.get_outstream_width_padded(0)
        words_in, words_out = [], []
        for c in ctxs:
            words_in += npy_to_rtlsim_input(c[n.input[0]].reshape(inst.get_folded_input_shape(0)), idt, iw)
            y = _stream_order(inst, n.op_type, c[n.output[0]])
            words_out += npy_to_rtlsim_input(y.reshape(inst.get_folded_output_shape(0)), odt, ow)
        d = root / n.name
        d.mkdir(parents=True, exist_ok=True)
        (d / "in.mem").write_text("\n".join(format(w, "x") for w in words_in) + "\n")
        (d / "expected.mem").write_text("\n".join(format(w, "x") for w in words_out) + "\n")
        meta = {"op": n.op_type, "top": inst.get_nodeattr("gen_top_module") or n.name,
                "code_gen_dir": rel(inst.get_nodeattr("code_gen_dir_ipgen")),
                "files": [rel(f) for f in inst.get_rtl_file_list(abspath=True)],
                "in_width": int(iw), "out_width": int(ow), "samples": len(ctxs),
                "in_words": len(words_in), "out_words": len(words_out),
                "out_elem_bits": int(odt.bitwidth()), "out_elems_per_word": int(inst.get_folded_output_shape(0)[-1]),
                "in_dtype": idt.get_canonical_name(), "out_dtype": odt.get_canonical_name()}
        (d / "meta.json").write_text(json.dumps(meta, indent=1))
        out[n.name] = {**meta, "dir": rel(d)}
    return out


def _applied_folding(out_dir: Path) -> dict:
    """PE/SIMD as applied, read from the last HW model (auto or from a folding file)."""
    import onnx
    m = out_dir / "intermediate_models" / "step_generate_estimate_reports.onnx"
    if not m.exists():
        return {}
    out = {}
    for n in onnx.load(str(m)).graph.node:
        attrs = {a.name: a.i for a in n.attribute if a.name in ("PE", "SIMD")}
        if attrs:
            out[n.name] = attrs
    return out


def _rtl_sources(out_dir: Path) -> dict:
    """Generated HDL of the RTL-style layers (``*_rtl``) after step_hw_codegen: node -> files."""
    import onnx
    models = sorted((out_dir / "intermediate_models").glob("*hw_codegen*.onnx"))
    if not models:
        return {}
    found = {}
    m = onnx.load(str(models[-1]))
    for n in m.graph.node:
        if n.op_type.endswith("_rtl") or n.op_type == "StreamingDataflowPartition":
            for a in n.attribute:
                if a.name == "code_gen_dir_ipgen":
                    d = Path(a.s.decode())
                    found[n.name] = sorted(str(p) for p in d.glob("*") if p.suffix in (".v", ".sv"))
                if a.name == "model" and n.op_type == "StreamingDataflowPartition":
                    found.update(_rtl_in(Path(a.s.decode())))
    return found


def _rtl_in(model_path: Path) -> dict:
    import onnx
    found = {}
    for n in onnx.load(str(model_path)).graph.node:
        if n.op_type.endswith("_rtl"):
            for a in n.attribute:
                if a.name == "code_gen_dir_ipgen":
                    d = Path(a.s.decode())
                    found[n.name] = sorted(str(p) for p in d.glob("*") if p.suffix in (".v", ".sv"))
    return found


def main(argv):
    if argv[1:] == ["--check"]:
        _disable_xsi()
        import finn.builder.build_dataflow  # noqa: F401 - the import is the check
        print(json.dumps(_versions()))
        return 0
    req = json.loads(Path(argv[1]).read_text())
    if req.get("contract") != CONTRACT:
        print(json.dumps({"status": "error", "error": {"step": "contract",
                                                       "message": f"contract {req.get('contract')} != {CONTRACT}"}}))
        return 2
    try:
        res = run(req)
    except Exception as e:  # noqa: BLE001 - reported through the contract, not a traceback
        res = {"contract": CONTRACT, "status": "error",
               "error": {"step": "worker", "message": f"{type(e).__name__}: {e}"[:600],
                         "traceback": traceback.format_exc()[-3000:]}}
    out = Path(req["out_dir"]) / "bitfold_result.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
