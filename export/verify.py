"""Numerical verification of an exported ONNX file against the torch model.

* QONNX files run in qonnx's reference executor (``execute_onnx``) after qonnx's cleanup,
  shape and datatype inference and constant folding.
* QCDQ files run in onnxruntime with its QDQ fusions *off*
  (``session.disable_quant_qdq=1``): the fused int8 kernels round differently, so they are
  not a check of the file. A default (fused) session's argmax agreement is reported beside it,
  because that is what users' own onnxruntime sessions will do.

Gate (stated tolerance): with ``tol = atol + rtol * max|torch|`` (defaults 1e-3, 1e-3),
at most ``max_outlier_fraction`` (default 5 %) of the samples may have an output further than
``tol`` from torch, and the argmax agreement must be at least ``min_agreement`` (default 99 %).
Why outliers at all: torch and the ONNX executors sum convolutions in different orders, so an
activation that lands within float rounding of a quantization boundary can round to the
neighbouring level - one step, in a few samples (seen: 8 of 359 on a residual net at 8 bit).
A wrong export (scale, sign, layout, width) moves essentially every sample and is refused.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

ATOL, RTOL, MIN_AGREEMENT, MAX_OUTLIER_FRACTION = 1e-3, 1e-3, 0.99, 0.05


@dataclass
class VerifyReport:
    format: str
    executor: str
    samples: int
    max_abs_diff: float
    median_abs_diff: float
    tolerance: float
    outlier_fraction: float
    argmax_agreement: float
    default_ort_argmax_agreement: float | None = None
    default_ort_max_abs_diff: float | None = None
    passed: bool = False

    def as_dict(self):
        return asdict(self)

    def summary(self) -> str:
        s = (f"{self.format}: {self.executor} on {self.samples} samples: max |diff| "
             f"{self.max_abs_diff:.3g} (median {self.median_abs_diff:.2g}; tol {self.tolerance:.3g}, exceeded by "
             f"{self.outlier_fraction:.1%} of samples), argmax agreement {self.argmax_agreement:.2%}")
        if self.default_ort_argmax_agreement is not None:
            s += (f"; default onnxruntime session (QDQ fusions on): argmax {self.default_ort_argmax_agreement:.2%},"
                  f" max |diff| {self.default_ort_max_abs_diff:.3g}")
        return s


def ort_session(path: str, exact: bool = True):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if exact:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


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


def compare(fmt: str, executor: str, ref: np.ndarray, out: np.ndarray, atol=ATOL, rtol=RTOL,
            min_agreement=MIN_AGREEMENT, max_outlier_fraction=MAX_OUTLIER_FRACTION) -> VerifyReport:
    tol = atol + rtol * float(np.abs(ref).max())
    if out.shape != ref.shape:
        return VerifyReport(fmt, executor, len(ref), float("inf"), float("inf"), tol, 1.0, 0.0, passed=False)
    per_sample = np.abs(out - ref).reshape(len(ref), -1).max(1)
    outliers = float((per_sample > tol).mean())
    agree = argmax_agreement(ref, out, tol)
    return VerifyReport(fmt, executor, len(ref), float(per_sample.max()), float(np.median(per_sample)), tol,
                        outliers, agree, passed=bool(outliers <= max_outlier_fraction and agree >= min_agreement))


def verify_file(fmt: str, path: str, x: np.ndarray, ref: np.ndarray, **tol) -> VerifyReport:
    if fmt == "qonnx":
        return compare(fmt, "qonnx.execute_onnx", ref, run_qonnx(path, x), **tol)
    rep = compare(fmt, "onnxruntime (QDQ fusions off)", ref, run_ort(path, x, exact=True), **tol)
    default = run_ort(path, x, exact=False)
    rep.default_ort_argmax_agreement = argmax_agreement(ref, default, rep.tolerance)
    rep.default_ort_max_abs_diff = float(np.abs(default - ref).max())
    return rep


def held_out_inputs(shape: tuple, n: int) -> tuple[np.ndarray, str]:
    """Digits test images when the model takes 8x8 / 64 inputs, else seeded normal samples."""
    if int(np.prod(shape)) == 64:
        from bitfold.toolchain.data import load_dataset
        x = load_dataset("digits").x_test[:n]
        x = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
        return x.reshape(len(x), *shape).astype(np.float32), "digits test split"
    return np.random.default_rng(0).standard_normal((n, *shape)).astype(np.float32), "seeded N(0,1) samples"
