"""Mixed-precision export of Brevitas models to QONNX and to standard ONNX QCDQ, verified.

QONNX (``Quant`` / ``BipolarQuant`` nodes, any width 1..8 per layer, batch size 1 as FINN
expects) is the input of the FPGA backends. QCDQ (QuantizeLinear -> Clip -> DequantizeLinear,
opset 13, dynamic batch) runs in onnxruntime and TVM. Both are produced by Brevitas' exporters
(TorchScript path: one self-contained file, no ``.onnx.data`` side file), post-processed with
qonnx's cleanup (QONNX) or initializer hygiene (QCDQ), annotated with the bit map in
``metadata_props``, and *verified* (:mod:`bitfold.export.verify`) before they are moved onto
the output path. A file that fails verification is never left behind.
"""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from bitfold.core.atomic import atomic_path, write_json
from bitfold.core.errors import BitfoldError
from bitfold.toolchain.quant import act_sites, compute_layers

from bitfold.export.verify import VerifyReport, prepare_qonnx, verify_file

FORMATS = ("qonnx", "qcdq")


@dataclass
class ExportResult:
    path: Path
    format: str
    report: VerifyReport
    bit_map: dict
    accuracy: dict | None = None  # torch test accuracy: as trained / as exported (e.g. ADQ grid snapping)


def quant_bit_widths(model: nn.Module) -> dict[str, float]:
    """Every enabled quantizer's bit-width: ``layer.w`` for weights, ``site.a`` for activations.

    bitfold models are read through their layer/site tags; any other Brevitas model by a walk
    over modules that own a ``weight_quant`` / ``act_quant`` proxy.
    """
    out = {}
    tagged = compute_layers(model)
    if tagged:
        for name, layer in tagged.items():
            wq = getattr(layer, "weight_quant", None)
            if wq is not None and wq.is_quant_enabled:
                out[f"{name}.w"] = float(wq.bit_width())
        for feeds, site in act_sites(model).items():
            aq = getattr(site, "act_quant", None)
            if aq is not None and aq.is_quant_enabled:
                out[f"{'+'.join(feeds)}.a"] = float(aq.bit_width())
        return out
    for name, mod in model.named_modules():
        for attr, suffix in (("weight_quant", "w"), ("act_quant", "a")):
            q = getattr(mod, attr, None)
            if q is not None and getattr(q, "is_quant_enabled", False):
                out[f"{name}.{suffix}"] = float(q.bit_width())
    return out


def check_exportable(model: nn.Module, fmt: str) -> None:
    if fmt not in FORMATS:
        raise BitfoldError(f"unknown export format {fmt!r}", f"choose one of: {', '.join(FORMATS)}")
    widths = quant_bit_widths(model)
    if not widths:
        raise BitfoldError("this is a float model (no enabled Brevitas quantizer); only quantized models are exported",
                           "train with --method fixed (or another quantization method), or bitfold.quantize() it")
    frac = {k: v for k, v in widths.items() if not float(v).is_integer()}
    if frac:
        raise BitfoldError("non-integer bit-widths cannot be exported (they export silently wrong): "
                           + ", ".join(f"{k}={v:.3f}" for k, v in frac.items()),
                           "freeze the learned widths to integers first (AdaQAT does this at the end of training)")
    bad = {k: v for k, v in widths.items() if not 1 <= v <= 8}
    if bad:
        raise BitfoldError("bit-widths outside 1..8: " + ", ".join(f"{k}={v:g}" for k, v in bad.items()))
    if fmt == "qcdq":
        one = [k for k, v in widths.items() if v == 1]
        if one:
            raise BitfoldError(f"QCDQ cannot represent 1-bit (bipolar) quantizers: {', '.join(one)}",
                               "export --format qonnx (BipolarQuant), or use >= 2 bits for these")


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _raw_export(model: nn.Module, fmt: str, input_shape, path: Path) -> None:
    from brevitas.export import export_onnx_qcdq, export_qonnx
    names = dict(input_names=["input"], output_names=["logits"])
    with _quiet(), torch.no_grad():
        if fmt == "qonnx":
            export_qonnx(model, torch.zeros((1, *input_shape)), export_path=str(path), dynamo=False, **names)
        else:
            export_onnx_qcdq(model, torch.zeros((1, *input_shape)), export_path=str(path), dynamo=False,
                             dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, **names)


#: the output step allows this multiple of the largest measured single-flip change (a flip elsewhere
#: on other inputs can cascade a little further than the probed one)
STEP_MARGIN = 2.0


def output_step(model: nn.Module, x: torch.Tensor, samples: int = 16) -> float:
    """How far one rounding-boundary flip may move an output, measured on the quantized model: at
    every activation site, the element whose code matters most to the outputs (largest
    straight-through gradient) is moved by one quantization step, up and down, on each of the first
    ``samples`` verification inputs, and the real change of the outputs - through every later
    quantizer - is measured. The step is ``STEP_MARGIN`` times the largest change seen. 0.0 (no
    flip allowed) when the model has no quantized activation with a known scale (Brevitas
    quantizers give theirs on the output; a quantizer of its own states it as ``quant_step``)."""
    from bitfold.toolchain.quant import act_sites
    quants = {}   # site -> the module whose activation quantizer gives the site's output scale
    steps = {}    # site -> a quantizer that states its step itself (``quant_step``: ASQ's adaptive ones)
    for k, s in act_sites(model).items():
        q = [m for m in s.modules() if hasattr(m, "act_quant")]
        own = [m for m in s.modules() if hasattr(m, "quant_step")]
        if q:
            quants[k] = q[-1]
        elif own:
            steps[k] = own[-1]
    sites = {k: s for k, s in act_sites(model).items() if k in quants or k in steps}
    if not sites:
        return 0.0
    xs = x[:samples]
    scales, outs, hooks = {}, {}, []
    for key, site in sites.items():
        if key in quants:
            hooks.append(quants[key].act_quant.register_forward_hook(
                lambda m, i, o, k=key: scales.__setitem__(k, getattr(o, "scale", None))))
        else:
            scales[key] = steps[key].quant_step

        def keep(mod, inp, out, k=key):
            v = getattr(out, "value", out)
            if torch.is_tensor(v) and v.requires_grad:
                v.retain_grad()
            outs[k] = v
        hooks.append(site.register_forward_hook(keep))
    try:
        with torch.enable_grad():
            y = model(xs.clone().requires_grad_(True))
            y = getattr(y, "value", y).reshape(len(xs), -1)
            (y * torch.sign(y.detach())).sum().backward()
    except RuntimeError:
        return 0.0
    finally:
        for h in hooks:
            h.remove()
    base = y.detach()
    best = 0.0
    for key, site in sites.items():
        v, s = outs.get(key), scales.get(key)
        if v is None or s is None or v.grad is None:
            continue
        g = v.grad.reshape(len(xs), -1).abs()
        idx = g.argmax(1)                                   # the most influential element per sample
        step = s.detach().reshape(-1).max()
        for sign in (1.0, -1.0):
            def bump(mod, inp, out, idx=idx, d=sign * step):
                val = getattr(out, "value", out)
                flat = val.reshape(len(xs), -1).clone()
                flat[torch.arange(len(xs)), idx] += d
                return flat.reshape(val.shape)
            h = site.register_forward_hook(bump)
            try:
                with torch.no_grad():
                    yp = model(xs)
                best = max(best, float((getattr(yp, "value", yp).reshape(len(xs), -1) - base).abs().max()))
            except Exception:  # noqa: BLE001 - a site whose output cannot be replaced: not probed
                pass
            finally:
                h.remove()
    return STEP_MARGIN * best


def _finish(fmt: str, path: Path, bit_map: dict, step: float = 0.0) -> None:
    """Post-process in place: qonnx cleanup (QONNX) / no initializers as inputs (QCDQ), metadata."""
    import onnx
    if fmt == "qonnx":
        with _quiet():
            mw = prepare_qonnx(str(path))
        m = mw.model
    else:
        m = onnx.load(str(path))
        inits = {i.name for i in m.graph.initializer}
        keep = [i for i in m.graph.input if i.name not in inits]
        del m.graph.input[:]
        m.graph.input.extend(keep)
    del m.metadata_props[:]
    for k, v in (("bitfold.bit_map", json.dumps(bit_map)), ("bitfold.format", fmt),
                 ("bitfold.output_step", repr(float(step)))):
        p = m.metadata_props.add()
        p.key, p.value = k, v
    m.producer_name = "bitfold"
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def check_int8_kernels(path: Path, allow_saturation: bool) -> list[dict]:
    """QCDQ: refuse a file whose int8 layers can saturate u8 x s8 kernels on CPUs without VNNI.

    Returns the per-layer pair-sum bounds (:mod:`bitfold.export.qcdq_safety`) for the report.
    """
    import onnx
    from bitfold.export.qcdq_safety import INT16_MAX, pair_sum_bounds
    bounds = pair_sum_bounds(onnx.load(str(path)))
    bad = [b for b in bounds if not b.safe]
    if bad and not allow_saturation:
        worst = ", ".join(f"{b.node} (inputs up to {b.a_max} x weight pair {b.w_pair_max} = {b.bound})" for b in bad)
        raise BitfoldError(
            f"QCDQ: {len(bad)} layer(s) can overflow the int16 pair sums (> {INT16_MAX}) of the u8 x s8 int8 "
            f"kernels that onnxruntime and OpenVINO run on CPUs without VNNI, so the file would not compute "
            f"the trained model there: {worst}",
            "train those layers with at most 7-bit weights (bit map {\"layer\": {\"w\": 7, \"a\": 8}}; the "
            "shorthand's first/last layers are W7/A8 for this reason) or at most 7-bit unsigned inputs; or, when "
            "every target accumulates in int32 (VNNI CPUs, TVM builds), pass --allow-int16-saturation")
    return [b.as_dict() for b in bounds]


def export_model(model: nn.Module, fmt: str, out_path: str | Path, x_verify: torch.Tensor,
                 input_shape=None, allow_saturation: bool = False, for_: str | None = None, **tol) -> ExportResult:
    """Export ``model`` to ``out_path`` and verify it on ``x_verify``; nothing is written on failure.

    QCDQ files are refused when an int8 layer can saturate CPUs without VNNI
    (:func:`check_int8_kernels`) unless ``allow_saturation``. ``for_="hls4ml"`` (QONNX only): the
    quantizers must have power-of-two scales, the hls4ml configuration is written beside the file
    (``*.hls4ml.json``) and, where hls4ml is installed, its compiled C++ emulation must pass the
    float gate against the file (:mod:`bitfold.export.hls4ml_form`).
    """
    if for_ not in (None, "hls4ml"):
        raise BitfoldError(f"--for {for_!r} is not a consumer bitfold prepares files for", "use --for hls4ml")
    if for_ == "hls4ml" and fmt != "qonnx":
        raise BitfoldError("--for hls4ml takes --format qonnx (hls4ml's ONNX front end reads QONNX)")
    method = getattr(model, "quant_method", None)
    if method is not None:
        model = method.for_export(model)
    check_exportable(model, fmt)
    model = model.cpu().eval()
    input_shape = tuple(input_shape or x_verify.shape[1:])
    if getattr(model, "bit_map", None):
        bit_map = {k: v.as_dict() for k, v in model.bit_map.items()}
    else:  # a Brevitas model bitfold did not build: record its quantizers' widths instead
        bit_map = {k: int(v) for k, v in quant_bit_widths(model).items()}
    out_path = Path(out_path)
    with torch.no_grad():
        ref = model(x_verify).numpy()
    step = output_step(model, x_verify)
    with atomic_path(out_path, suffix=".onnx") as tmp:
        try:
            _raw_export(model, fmt, input_shape, tmp)
            _finish(fmt, tmp, bit_map, step)
            kernels = check_int8_kernels(tmp, allow_saturation) if fmt == "qcdq" else None
        except BitfoldError:
            raise
        except Exception as e:  # an exporter failure is a refusal, with the reason
            raise BitfoldError(f"{fmt} export failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                               "this layer or bit-width combination is not supported by the exporter") from e
        with _quiet():
            report = verify_file(fmt, str(tmp), x_verify.numpy(), ref, step, **tol)
        others = [r for r in report.runtimes or () if not r["passed"]]
        within = report.flips <= report.max_flips and report.max_abs_diff <= report.step + report.tolerance
        if not report.passed and others and within and allow_saturation and any(not k["safe"] for k in kernels or ()):
            # the reference executor computes the model; the runtimes' fused u8 x s8 kernels may saturate
            # the int16 pair sums of the layers check_int8_kernels flagged, which the caller accepted
            for r in others:
                r["accepted"] = "int16 pair-sum saturation allowed (--allow-int16-saturation)"
            report.passed = True
        if not report.passed:
            if others and within:
                # the file computes the model; a runtime's own fused kernels do not
                names = ", ".join(r["executor"] for r in others)
                raise BitfoldError(f"the {names} computes this QCDQ file differently from the model, beyond "
                                   f"rounding-boundary flips - {report.summary()}",
                                   "nothing was written: its fused int8 kernels requantize differently on this "
                                   "graph; deploy with QDQ fusions off (onnxruntime session option "
                                   "session.disable_quant_qdq=1), TVM or OpenVINO, or export --format qonnx")
            raise BitfoldError(f"exported {fmt} does not match the torch model - {report.summary()}",
                               "nothing was written; please report this model as a bitfold bug")
        if for_ == "hls4ml":
            _check_hls4ml(tmp, x_verify.numpy(), report, out_path)
        # the report lands first: an .onnx under its final name always has its verification beside it
        write_json(out_path.with_name(out_path.name + ".verify.json"),
                   {"format": fmt, "bit_map": bit_map, **report.as_dict(),
                    **({"int8_pair_sums": kernels} if kernels is not None else {})})
    return ExportResult(out_path, fmt, report, bit_map)


def _check_hls4ml(tmp: Path, x: np.ndarray, report: VerifyReport, out_path: Path) -> None:
    """--for hls4ml: configuration (refuses non-power-of-two scales), hls4ml's emulation under the float
    gate when hls4ml is installed (recorded in ``report.runtimes``), the configuration beside the file."""
    import tempfile
    from bitfold.export import hls4ml_form
    cfg = hls4ml_form.config_for(tmp)
    report.runtimes = list(report.runtimes or [])
    if hls4ml_form.available():
        with tempfile.TemporaryDirectory(prefix="bitfold-hls4ml-") as d, _quiet():
            r = hls4ml_form.verify_hls4ml(tmp, x, d, cfg)
        report.runtimes.append({"executor": r.executor, "passed": r.passed, "max_abs_diff": r.max_abs_diff,
                                "flips": r.flips, "argmax_agreement": r.argmax_agreement})
        if not r.passed:
            raise BitfoldError(f"hls4ml's C++ emulation computes this file differently - {r.summary()}",
                               "nothing was written; please report this model as a bitfold bug")
    else:
        report.runtimes.append({"executor": "hls4ml C++ emulation", "passed": True, "skipped": "hls4ml not installed",
                                "max_abs_diff": float("nan"), "flips": 0, "argmax_agreement": float("nan")})
    write_json(hls4ml_form.config_path(out_path), cfg)


def export_brevitas(model: nn.Module, example_input: torch.Tensor, fmt: str = "qonnx",
                    out_path: str | Path = "model.onnx", x_verify: torch.Tensor | None = None, **tol) -> ExportResult:
    """Export *any* Brevitas model (bitfold-built or not), verified on ``x_verify``.

    Without ``x_verify``, 64 inputs are drawn around ``example_input`` (same shape, seeded) - pass
    real held-out data where you have it: random inputs exercise the graph but not your data range.
    """
    if x_verify is None:
        g = torch.Generator().manual_seed(0)
        base = example_input[:1]
        x_verify = base + torch.randn((64, *base.shape[1:]), generator=g) * (base.std() + 1.0)
    return export_model(model, fmt, out_path, x_verify, tuple(example_input.shape[1:]), **tol)


def export_run(run_dir: str | Path, fmt: str = "qonnx", out_path: str | Path | None = None,
               max_samples: int | None = None, bits_map=None, allow_saturation: bool = False,
               for_: str | None = None, **tol) -> ExportResult:
    """Export a training run's final model, verified on its data set's held-out test split.

    ``bits_map`` (MEBQAT runs) sets the switchable model to those widths first - no retraining.
    """
    from bitfold.toolchain.runs import dataset_of, load_run
    if bits_map is not None:
        from bitfold.toolchain.select_bits import deploy_run
        cfg, model, ds = deploy_run(run_dir, bits_map)
    else:
        cfg, model, ck = load_run(run_dir)
        ds = dataset_of(cfg)
    x = ds.x_test if max_samples is None else ds.x_test[:max_samples]
    out_path = Path(out_path) if out_path else Path(run_dir) / f"model.{fmt}.onnx"
    method = getattr(model, "quant_method", None)
    if method is not None:
        method.prepare_export(model, ds.x_train)
    res = export_model(model, fmt, out_path, x, ds.input_shape, allow_saturation=allow_saturation, for_=for_, **tol)
    if method is not None:  # what the export-form conversion (snapping, baking) costs in accuracy
        y = ds.y_test if max_samples is None else ds.y_test[:max_samples]
        with torch.no_grad():
            acc = lambda m: float((m.eval()(x).argmax(1) == y).float().mean())  # noqa: E731
            res.accuracy = {"trained": acc(model), "exported": acc(method.for_export(model))}
    return res
