"""Int16 pair-sum saturation of u8 x s8 integer kernels, checked on a QCDQ graph.

A QCDQ layer ``MatMul/Gemm/Conv(DequantizeLinear(x_q), DequantizeLinear(w_q))`` is fused by
onnxruntime's default session and by OpenVINO into an int8 kernel. On x86 CPUs without VNNI both
use ``vpmaddubsw``: unsigned 8-bit activations times signed 8-bit weights, two adjacent products
summed into a *saturating int16*. Signed activations are first moved to unsigned by adding 128
(the zero point absorbs it). When ``a_max * (|w_1| + |w_2|) > 32767`` the pair sum clips and
the layer's result is wrong - a full-range 8-bit layer (codes up to 255 x 127) does that; VNNI
CPUs (``vpdpbusd``, int32 sums) do not, so the same file is exact on one CPU and not on another.

:func:`pair_sum_bounds` computes, per layer, the largest pair sum the layer's *actual* weight
codes can produce with its activation code range (the two largest |w| of each output channel, a
sound bound whatever pairing the kernel packs). A layer is safe when its weights have at most
7 bits (|w| <= 64) or its inputs are unsigned codes of at most 7 bits - train it so to run it in
int8 on every CPU.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

INT16_MAX = 32767
_LAYER_OPS = ("MatMul", "Gemm", "Conv")


@dataclass
class PairSumBound:
    node: str             # the MatMul / Gemm / Conv node
    a_max: int            # largest activation code the u8 x s8 kernel sees (after the s8 -> u8 shift)
    w_pair_max: int       # largest |w_1| + |w_2| over output channels
    bound: int            # a_max * w_pair_max
    safe: bool

    def as_dict(self) -> dict:
        return asdict(self)


def values(m) -> dict:
    """Initializers and Constant nodes of ``m``, by tensor name (the QCDQ graph helpers below read them)."""
    from onnx import numpy_helper
    vals = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Constant":
            vals[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return vals


def producers(m) -> dict:
    """The node that writes each tensor, by tensor name."""
    return {o: n for n in m.graph.node for o in n.output}


def code_range(q_out: str, prod: dict, vals: dict, zp_dtype) -> tuple[int, int]:
    """Integer range of the codes flowing into a DequantizeLinear: a Clip's bounds, else the dtype's."""
    n = prod.get(q_out)
    if n is not None and n.op_type == "Clip" and len(n.input) == 3 and n.input[1] in vals and n.input[2] in vals:
        return int(vals[n.input[1]]), int(vals[n.input[2]])
    info = np.iinfo(zp_dtype)
    return int(info.min), int(info.max)


def dequant_input(name: str, prod: dict, skip=("Transpose", "Reshape", "Flatten", "MaxPool")):
    """The DequantizeLinear that feeds ``name`` (through layout-only ops), or None."""
    n = prod.get(name)
    while n is not None and n.op_type in skip:
        n = prod.get(n.input[0])
    return n if n is not None and n.op_type == "DequantizeLinear" else None


def _constant(name: str, prod: dict, vals: dict) -> np.ndarray | None:
    """A tensor computable from initializers alone: an initializer, a Cast of one, or a Gather of
    one by one (the index form's ``Gather(codebook, Cast(index))``)."""
    if name in vals:
        return vals[name]
    n = prod.get(name)
    if n is None:
        return None
    if n.op_type == "Cast":
        src = _constant(n.input[0], prod, vals)
        return None if src is None else src.astype(np.int64)
    if n.op_type == "Gather" and len(n.input) == 2:
        data, idx = _constant(n.input[0], prod, vals), _constant(n.input[1], prod, vals)
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        return None if data is None or idx is None else np.take(data, idx.astype(np.int64), axis=axis)
    return None


def weight_codes(dq, prod: dict, vals: dict) -> np.ndarray | None:
    """The integer codes a weight DequantizeLinear reads: a constant, clipped by its Clip if there is one."""
    src = dq.input[0]
    n = prod.get(src)
    if n is not None and n.op_type == "Clip" and len(n.input) == 3:
        w = _constant(n.input[0], prod, vals)
        return None if w is None else np.clip(w, vals[n.input[1]], vals[n.input[2]])
    return _constant(src, prod, vals)


def pair_sum_bounds(m) -> list[PairSumBound]:
    """One bound per integer-fusable layer of the QCDQ model ``m`` (an ``onnx.ModelProto``)."""
    vals, prod = values(m), producers(m)
    out = []
    for n in m.graph.node:
        if n.op_type not in _LAYER_OPS or len(n.input) < 2:
            continue
        xdq, wdq = dequant_input(n.input[0], prod), dequant_input(n.input[1], prod, skip=("Transpose",))
        if xdq is None or wdq is None or len(xdq.input) < 3 or xdq.input[2] not in vals:
            continue
        w = weight_codes(wdq, prod, vals)
        if w is None or w.dtype != np.int8:
            continue
        zp = vals[xdq.input[2]]
        lo, hi = code_range(xdq.input[0], prod, vals, zp.dtype)
        shift = 128 if zp.dtype == np.int8 else 0
        a_max = max(abs(lo + shift), abs(hi + shift))
        w = np.abs(w.astype(np.int64))
        # rows = output channels: Conv weights are [out, in/g, kh, kw]; a MatMul weight read through
        # a Transpose, or a Gemm's with transB, is stored [out, in]; a plain MatMul's is [in, out]
        if n.op_type == "Conv":
            per_out = w.reshape(w.shape[0], -1)
        else:
            transposed = prod.get(n.input[1]) is not None and prod[n.input[1]].op_type == "Transpose"
            trans_b = any(a.name == "transB" and a.i for a in n.attribute)
            per_out = w if (transposed or trans_b) else w.T
        top2 = np.sort(per_out, axis=1)[:, -2:].sum(axis=1) if per_out.shape[1] > 1 else per_out[:, 0]
        w_pair = int(top2.max())
        out.append(PairSumBound(n.name or n.output[0], int(a_max), w_pair, int(a_max) * w_pair,
                                int(a_max) * w_pair <= INT16_MAX))
    return out

