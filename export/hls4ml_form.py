"""hls4ml-ready QONNX: a QONNX export with power-of-two scales, and the hls4ml configuration beside it.

hls4ml (the other main FPGA flow of the field; C++/HLS templates, Vivado/Vitis HLS for the bitstream)
converts QONNX ``Quant`` nodes to fixed-point types. A float scale does not map to one: hls4ml
multiplies by 1/scale in its default ``fixed<16,6>`` type and the C++ emulation drifts (13-14 % argmax
on bitfold's digits models with float scales). With power-of-two scales every quantizer *is* a
fixed-point type (``b`` bits, ``-log2(scale)`` fraction bits) and hls4ml infers the exact accumulator
types from them; what is left in float are BatchNorm's scale and shift and the last layer's bias,
which take the configuration's default type here: ``FRAC_BITS`` fraction bits and enough integer
bits for the largest such parameter of this model.

The recipe (:func:`convert`, also in the README): qonnx cleanup, channels-last conversion, Gemm to
MatMul, cleanup again; ``hls4ml.utils.config.config_from_onnx_model(..., granularity="name",
default_precision=<the config's default>)``; ``hls4ml.converters.convert_from_onnx_model``. The
check (:func:`verify_hls4ml`) compiles hls4ml's C++ emulation and holds it to bitfold's float gate
against ``qonnx.execute_onnx`` of the same file on held-out data (its float BatchNorm may round an
activation the other way within one quantization step; nothing more is allowed).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from bitfold.core.errors import BitfoldError

FRAC_BITS = 20
CONFIG_SUFFIX = ".hls4ml.json"


def _inits(model) -> dict:
    from onnx import numpy_helper
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def pot_violations(model) -> list[str]:
    """Quant nodes whose scale is not a power of two or whose zero point is not 0."""
    arrays = _inits(model)
    bad = []
    for n in model.graph.node:
        if n.op_type not in ("Quant", "BipolarQuant"):
            continue
        if n.op_type == "BipolarQuant":
            bad.append(f"{n.name} (bipolar 1-bit)")
            continue
        s, z = arrays.get(n.input[1]), arrays.get(n.input[2])
        if s is None or z is None:
            bad.append(f"{n.name} (scale or zero point computed in the graph)")
            continue
        e = np.log2(np.abs(s.astype(np.float64)))
        if not (np.all(s > 0) and np.all(e == np.round(e)) and np.all(z == 0)):
            bad.append(f"{n.name} (scale {float(s.ravel()[0]):.6g})")
    return bad


def default_precision(model) -> str:
    """``fixed<I+FRAC_BITS, I>`` with I integer bits (sign included) for the model's largest float
    parameter outside the quantizers (BatchNorm scale/shift, biases), and at least 12."""
    arrays = _inits(model)
    quant_inputs = {i for n in model.graph.node if n.op_type == "Quant" for i in n.input}
    big = 1.0
    for n in model.graph.node:
        if n.op_type in ("BatchNormalization", "Add", "Mul", "Sub", "Gemm", "Conv", "MatMul"):
            for i in n.input:
                a = arrays.get(i)
                if a is not None and i not in quant_inputs and a.dtype.kind == "f":
                    big = max(big, float(np.abs(a).max()))
    if any(n.op_type == "BatchNormalization" for n in model.graph.node):   # scale = gamma / sqrt(var + eps)
        for n in model.graph.node:
            if n.op_type == "BatchNormalization":
                g, var = arrays.get(n.input[1]), arrays.get(n.input[4])
                eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
                if g is not None and var is not None:
                    big = max(big, float(np.abs(g / np.sqrt(var + eps)).max()))
    ibits = max(12, math.ceil(math.log2(big + 1)) + 2)
    return f"fixed<{ibits + FRAC_BITS},{ibits}>"


def config_for(qonnx_path: str | Path) -> dict:
    """The hls4ml configuration of a QONNX file; refuses a file whose quantizers are not fixed-point."""
    import onnx
    m = onnx.load(str(qonnx_path))
    bad = pot_violations(m)
    if bad:
        raise BitfoldError(f"--for hls4ml: {len(bad)} quantizer(s) without a power-of-two scale: {', '.join(bad[:6])}"
                           + (" ..." if len(bad) > 6 else ""),
                           "train the run with power-of-two scales (`bitfold train --opt scales=pot`, >= 2-bit "
                           "weights and activations) and export it again")
    return {"default_precision": default_precision(m), "granularity": "name", "io_type": "io_parallel",
            "backend": "Vitis", "reuse_factor": 1, "strategy": "Latency",
            "recipe": ["qonnx.util.cleanup.cleanup_model", "ConvertToChannelsLastAndClean", "GemmToMatMul",
                       "qonnx.util.cleanup.cleanup_model",
                       "hls4ml.utils.config.config_from_onnx_model(granularity, backend, default_precision)",
                       "hls4ml.converters.convert_from_onnx_model(io_type, backend, hls_config)"],
            "input_layout": "channels-last (NHWC) for 4-D inputs"}


def config_path(qonnx_path: str | Path) -> Path:
    p = Path(qonnx_path)
    return p.with_name(p.name + CONFIG_SUFFIX)


def available() -> bool:
    try:
        import hls4ml  # noqa: F401
    except ImportError:
        return False
    return True


def _hls4ml():
    try:
        import hls4ml
    except ImportError:
        raise BitfoldError("hls4ml is not installed", "pip install 'bitfold[hls4ml]' (hls4ml 1.3)") from None
    return hls4ml


def prepare(qonnx_path: str | Path):
    """The QONNX preprocessing hls4ml's ONNX front end expects; returns a ModelWrapper."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.channels_last import ConvertToChannelsLastAndClean
    from qonnx.transformation.gemm_to_matmul import GemmToMatMul
    from qonnx.util.cleanup import cleanup_model
    m = cleanup_model(ModelWrapper(str(qonnx_path)))
    m = m.transform(ConvertToChannelsLastAndClean())
    m = m.transform(GemmToMatMul())
    return cleanup_model(m)


def convert(qonnx_path: str | Path, out_dir: str | Path, cfg: dict | None = None, compile: bool = True):
    """hls4ml's model of an ``--for hls4ml`` export (``cfg``: its configuration, default the one
    beside the file), compiled (the C++ emulation) unless ``compile=False``."""
    import json
    hls4ml = _hls4ml()
    path = Path(qonnx_path)
    if cfg is None:
        if not config_path(path).is_file():
            raise BitfoldError(f"{config_path(path)} does not exist",
                               "export the run with `bitfold export RUN --for hls4ml` first")
        cfg = json.loads(config_path(path).read_text())
    m = prepare(path)
    hc = hls4ml.utils.config.config_from_onnx_model(m, granularity=cfg["granularity"], backend=cfg["backend"],
                                                    default_precision=cfg["default_precision"],
                                                    default_reuse_factor=cfg["reuse_factor"])
    hc["Model"]["Strategy"] = cfg["strategy"]
    hm = hls4ml.converters.convert_from_onnx_model(m, output_dir=str(out_dir), io_type=cfg["io_type"],
                                                   backend=cfg["backend"], hls_config=hc)
    if compile:
        hm.compile()
    return hm


def predict(hm, x: np.ndarray) -> np.ndarray:
    """hls4ml's emulation on NCHW (or flat) inputs: 4-D batches go channels-last, as the model was converted."""
    xin = np.ascontiguousarray(x.transpose(0, 2, 3, 1) if x.ndim == 4 else x, dtype=np.float32)
    shape = tuple(hm.get_input_variables()[0].shape)
    out = hm.predict(xin.reshape((len(x),) + shape))
    return np.asarray(out, dtype=np.float64).reshape(len(x), -1)


def verify_hls4ml(qonnx_path: str | Path, x: np.ndarray, out_dir: str | Path, cfg: dict | None = None):
    """Convert + compile, then the float gate: hls4ml's emulation vs ``qonnx.execute_onnx`` of the file."""
    from bitfold.export.verify import compare, output_step_of, run_qonnx
    hm = convert(qonnx_path, out_dir, cfg)
    ref = run_qonnx(str(qonnx_path), x).reshape(len(x), -1)
    return compare("qonnx (hls4ml)", "hls4ml C++ emulation", ref, predict(hm, x), output_step_of(qonnx_path))
