"""Numerical verification of an exported ONNX file against the torch model.

* QONNX files run in qonnx's reference executor (``execute_onnx``) after qonnx's cleanup,
  shape and datatype inference and constant folding.
* QCDQ files run in onnxruntime with its QDQ fusions *off* (``session.disable_quant_qdq=1``,
  the file's arithmetic as written), and then in the runtimes users run: a *default*
  onnxruntime session (QDQ pairs fused into int8 kernels) and, when the ``openvino`` package is
  installed, OpenVINO's CPU plugin (int8 kernels, float parts in f32). Each must pass the same float gate; the report lists them.
  (Whether the int8 kernels of CPUs *without* VNNI can saturate is a property of the weights,
  checked on the graph at export: :mod:`bitfold.export.qcdq_safety`.)

The gate has two modes, used by every check in bitfold (export, FPGA lowering, TVM, FINN):

* **exact** (:func:`compare_exact`) - integer-domain comparisons (QONNX codes, the lowered integer
  model, RTL simulation, FINN's HW layers): every output of every sample must be equal.
* **float** (:func:`compare`) - torch vs an ONNX executor, or two float executors. With
  ``tol = atol + rtol * max|ref|`` (defaults 1e-3, 1e-3) for float rounding, a sample whose
  largest difference exceeds ``tol`` is a *flip*: an activation that landed within float rounding
  of a quantization boundary and rounded to the neighbouring level (torch and the ONNX executors
  sum in different orders). A flip may move an output by at most one *output step* (``step``:
  measured at export by :func:`bitfold.export.onnx_export.output_step` - one activation code moved
  by one quantization step at every site, the real change of the outputs, with a margin - and
  recorded in the file's metadata), and at most
  ``max(1, 2 %)`` of the samples may flip (``max_flip_fraction``). Without a known step no flip is
  allowed. The report names the worst sample. A wrong export (scale, sign, layout, width) moves
  essentially every sample, or one sample by more than a step, and is refused.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

ATOL, RTOL, MAX_FLIP_FRACTION = 1e-3, 1e-3, 0.02


@dataclass
class VerifyReport:
    format: str
    executor: str
    samples: int
    max_abs_diff: float
    median_abs_diff: float
    tolerance: float
    outlier_fraction: float            # fraction of samples beyond ``tolerance`` (flips)
    argmax_agreement: float
    runtimes: list | None = None       # QCDQ: the default-runtime checks, each {executor, passed, ...}
    passed: bool = False
    mode: str = "float"                # "float" | "exact"
    step: float = 0.0                  # float mode: the largest move a flip may make
    flips: int = 0                     # samples beyond ``tolerance`` (exact mode: samples that differ)
    max_flips: int = 0
    worst_sample: int = -1             # index of the sample with the largest difference

    def as_dict(self):
        return asdict(self)

    def summary(self) -> str:
        if self.mode == "exact":
            s = (f"{self.format}: {self.executor} on {self.samples} samples, integer outputs: "
                 f"{self.samples - self.flips}/{self.samples} equal")
            if self.flips:
                s += f" (worst sample #{self.worst_sample}: max |diff| {self.max_abs_diff:.6g})"
            return s
        s = (f"{self.format}: {self.executor} on {self.samples} samples: max |diff| "
             f"{self.max_abs_diff:.3g} (median {self.median_abs_diff:.2g}, worst sample #{self.worst_sample}; "
             f"tol {self.tolerance:.3g}; {self.flips} rounding-boundary flip(s), allowed {self.max_flips} of at most "
             f"one step {self.step:.3g}), argmax agreement {self.argmax_agreement:.2%}")
        for r in self.runtimes or ():
            if r.get("skipped"):
                s += f"; {r['executor']}: not checked ({r['skipped']})"
                continue
            s += (f"; {r['executor']}: {'ok' if r['passed'] else 'differs, accepted: ' + r['accepted'] if r.get('accepted') else 'FAILED'} (max |diff| {r['max_abs_diff']:.3g}, "
                  f"{r['flips']} flip(s), argmax {r['argmax_agreement']:.2%})")
        return s


def ort_session(path: str, exact: bool = True):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if exact:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def run_openvino(path: str, x: np.ndarray) -> np.ndarray:
    """The file in OpenVINO's CPU plugin, one sample at a time, float parts in f32.

    (On CPUs with bf16 units - AMX, AVX512-BF16 - OpenVINO's default runs the layers that are not
    int8 in bf16, 8 mantissa bits, which no file can make exact; f32 is what the file says.)
    """
    import openvino as ov
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    x = x.astype(np.float32)
    return np.concatenate([compiled(x[i:i + 1])[0] for i in range(len(x))])


def run_ort(path: str, x: np.ndarray, exact: bool = True) -> np.ndarray:
    s = ort_session(path, exact)
    inp = s.get_inputs()[0]
    batch = inp.shape[0] if inp.shape and isinstance(inp.shape[0], int) else len(x)  # fixed-batch graphs
    x = x.astype(np.float32)
    return np.concatenate([s.run(None, {inp.name: x[i:i + batch]})[0] for i in range(0, len(x), max(1, batch))])


def prepare_qonnx(path_or_model):
    """qonnx's standard preparation: cleanup, shapes, constant folding, datatypes."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.fold_constants import FoldConstants
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.infer_shapes import InferShapes
    from qonnx.util.cleanup import cleanup_model
    mw = path_or_model if isinstance(path_or_model, ModelWrapper) else ModelWrapper(str(path_or_model))
    mw = cleanup_model(mw)
    return mw.transform(InferShapes()).transform(FoldConstants()).transform(InferDataTypes())


def with_batch(mw, n: int):
    """A copy of a (batch-1) QONNX model re-shaped to batch ``n`` for fast batched execution."""
    import copy

    from qonnx.transformation.infer_shapes import InferShapes
    m2 = copy.deepcopy(mw)
    del m2.graph.value_info[:]
    for vi in list(m2.graph.input) + list(m2.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_value = n
    return m2.transform(InferShapes())


def run_qonnx(path_or_model, x: np.ndarray) -> np.ndarray:
    """Execute a QONNX model on a batch with qonnx's reference executor.

    The graph is re-shaped to the whole batch (100x faster than sample by sample); a graph whose
    shapes are baked in (constant Reshape targets) falls back to one sample at a time.
    """
    from qonnx.core.onnx_exec import execute_onnx
    mw = prepare_qonnx(path_or_model)
    iname, oname = mw.graph.input[0].name, mw.graph.output[0].name
    x = x.astype(np.float32)
    try:
        out = execute_onnx(with_batch(mw, len(x)), {iname: x})[oname]
        if out.shape[0] == len(x):
            return out
    except Exception:  # noqa: BLE001 - any failure of the batched graph: use the batch-1 graph
        pass
    batch = mw.get_tensor_shape(iname)[0]
    return np.concatenate([execute_onnx(mw, {iname: x[i:i + batch]})[oname] for i in range(0, len(x), batch)])


def argmax_agreement(ref: np.ndarray, out: np.ndarray, tol: float = 0.0) -> float:
    """Fraction of positions where the ONNX argmax (over axis 1) is a top-1 of the reference.

    Ties count as agreement: the ONNX pick must be within ``tol`` of the reference maximum
    (a layer with low-bit weights easily produces exactly equal channels).
    """
    idx = np.expand_dims(out.argmax(1), 1)
    picked = np.take_along_axis(ref, idx, 1).squeeze(1)
    return float((picked >= ref.max(1) - tol).mean())


def max_flips(samples: int, max_flip_fraction: float = MAX_FLIP_FRACTION) -> int:
    """How many samples may show a rounding-boundary flip: ``max(1, floor(fraction * samples))``."""
    return max(1, int(max_flip_fraction * samples))


def compare(fmt: str, executor: str, ref: np.ndarray, out: np.ndarray, step: float | None = 0.0, atol=ATOL,
            rtol=RTOL, max_flip_fraction=MAX_FLIP_FRACTION) -> VerifyReport:
    """The float-mode gate (module docstring): ``step`` is the output step a flip may move an output
    by (0 or None: no flip allowed)."""
    tol = atol + rtol * float(np.abs(ref).max()) if ref.size else atol
    step = float(step or 0.0)
    if out.shape != ref.shape:
        return VerifyReport(fmt, executor, len(ref), float("inf"), float("inf"), tol, 1.0, 0.0, passed=False,
                            step=step, flips=len(ref))
    per_sample = np.abs(out.astype(np.float64) - ref).reshape(len(ref), -1).max(1)
    flipped = per_sample > tol
    n_flip, allowed = int(flipped.sum()), (max_flips(len(ref), max_flip_fraction) if step > 0 else 0)
    within_step = bool((per_sample <= step + tol).all())
    agree = argmax_agreement(ref, out, tol)
    return VerifyReport(fmt, executor, len(ref), float(per_sample.max()), float(np.median(per_sample)), tol,
                        float(flipped.mean()), agree, passed=bool(n_flip <= allowed and within_step),
                        step=step, flips=n_flip, max_flips=allowed, worst_sample=int(per_sample.argmax()))


def compare_exact(what: str, executor: str, ref: np.ndarray, out: np.ndarray) -> VerifyReport:
    """The exact-mode gate: integer outputs, equal on every sample."""
    ref, out = np.asarray(ref), np.asarray(out)
    if out.shape != ref.shape:
        return VerifyReport(what, executor, len(ref), float("inf"), float("inf"), 0.0, 1.0, 0.0, passed=False,
                            mode="exact", flips=len(ref))
    per_sample = np.abs(out.astype(np.int64) - ref.astype(np.int64)).reshape(len(ref), -1).max(1)
    bad = int((per_sample != 0).sum())
    agree = float((out.reshape(len(ref), -1).argmax(1) == ref.reshape(len(ref), -1).argmax(1)).mean())
    return VerifyReport(what, executor, len(ref), float(per_sample.max()), float(np.median(per_sample)), 0.0,
                        bad / max(1, len(ref)), agree, passed=bad == 0, mode="exact", flips=bad,
                        worst_sample=int(per_sample.argmax()))


def output_step_of(path_or_model) -> float:
    """The output step an export recorded in its metadata (``bitfold.output_step``); 0 if none."""
    import onnx
    m = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(str(path_or_model),
                                                                                    load_external_data=False)
    meta = {p.key: p.value for p in m.metadata_props}
    try:
        return float(meta.get("bitfold.output_step", 0.0))
    except ValueError:
        return 0.0


def verify_file(fmt: str, path: str, x: np.ndarray, ref: np.ndarray, step: float | None = None, **tol) -> VerifyReport:
    """Torch outputs ``ref`` against the file's executor on ``x`` (float mode; ``step`` default: the
    file's recorded output step)."""
    step = output_step_of(path) if step is None else step
    if fmt == "qonnx":
        return compare(fmt, "qonnx.execute_onnx", ref, run_qonnx(path, x), step, **tol)
    rep = compare(fmt, "onnxruntime (QDQ fusions off)", ref, run_ort(path, x, exact=True), step, **tol)
    runs = [("onnxruntime default session", lambda: run_ort(path, x, exact=False))]
    if openvino_available():
        runs.append(("OpenVINO CPU", lambda: run_openvino(path, x)))
    rep.runtimes = []
    for name, run in runs:
        r = compare(fmt, name, ref, run(), step, **tol)
        rep.runtimes.append({"executor": name, "passed": r.passed, "max_abs_diff": r.max_abs_diff,
                             "flips": r.flips, "argmax_agreement": r.argmax_agreement})
        rep.passed = rep.passed and r.passed
    return rep


def held_out_inputs(shape: tuple, n: int) -> tuple[np.ndarray, str]:
    """Digits test images when the model takes 8x8 / 64 inputs, else seeded normal samples."""
    if int(np.prod(shape)) == 64:
        from bitfold.toolchain.data import load_dataset
        x = load_dataset("digits").x_test[:n]
        x = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
        return x.reshape(len(x), *shape).astype(np.float32), "digits test split"
    return np.random.default_rng(0).standard_normal((n, *shape)).astype(np.float32), "seeded N(0,1) samples"
