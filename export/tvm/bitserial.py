"""Bit-serial kernels for sub-8-bit dense layers in the TVM backend.

A quantized matmul whose input codes are unsigned ``a``-bit integers (``a <= 4``, zero point 0) and whose
weight codes are signed ``w``-bit integers (``w <= 4``) is computed on bit-planes: the input is split
into ``a`` planes and the weights into ``w`` planes of 32 one-bit lanes per word, and

    y[j] = sum_{p < a, q < w} 2^(p+q) * popcount(x_p & W'_q[j])  -  2^(w-1) * sum_k x[k]

where ``W' = W + 2^(w-1)`` (the weights offset into ``[0, 2^w - 1]``). Bipolar weights (every code -1 or
+1: 1-bit weights as BNNs and FINN's classic networks have them) are one plane, ``W = 2 W' - 1`` with
``W'`` in {0, 1}: ``y[j] = 2 * popcount-sum(x, W'[j]) - sum_k x[k]``. The dot product on planes is TVM's
own ``topi.nn.bitserial_dense`` compute (``bitpack`` of the input at run time); the weights are packed
once, at build time, with one extra all-ones row whose output is ``sum_k x[k]`` - the offset's
correction comes out of the same kernel. Integer arithmetic from end to end, so the result is exactly
the int8 kernel's (and onnxruntime's) accumulator.

Which layers qualify is read from the ONNX graph (:func:`operands`): the input's code range from the
``Clip`` of its QCDQ quantizer, the weight codes from its (clipped) initializer. Whether a qualifying
layer runs bit-serial or int8 is the backend's choice (measured per layer on the host).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WORD = 32
MAX_BITS = 4


@dataclass
class Operand:
    """What the ONNX graph guarantees about one compute layer's integer operands."""
    layer: str
    op: str                    # "conv2d" or "matmul"
    x_lo: int | None = None    # input code range (from its quantizer's Clip, else its integer type)
    x_hi: int | None = None
    x_zero: int | None = None
    weight: np.ndarray | None = None   # weight codes, (out, in) for matmul, (out, in, kh, kw) for conv
    groups: int = 1
    dilated: bool = False

    @property
    def a_bits(self) -> int | None:
        if self.x_lo is None or self.x_lo < 0 or self.x_zero not in (0, None):
            return None
        return max(1, int(self.x_hi).bit_length())

    @property
    def bipolar(self) -> bool:
        """Every weight code is -1 or +1 (no 0): one bit plane, ``W = 2 W' - 1``."""
        return self.weight is not None and bool(np.all(np.abs(self.weight) == 1))

    @property
    def w_bits(self) -> int | None:
        if self.weight is None:
            return None
        if self.bipolar:
            return 1
        lo, hi = int(self.weight.min()), int(self.weight.max())
        b = 1
        while not (-(1 << (b - 1)) <= lo and hi <= (1 << (b - 1)) - 1):
            b += 1
        return b

    def why_not(self) -> str | None:
        """None when the layer can run bit-serial, else the reason."""
        if self.op == "conv2d" and (self.groups != 1 or self.dilated):
            return "bit-serial convolutions cover groups=1, dilation 1"
        a, w = self.a_bits, self.w_bits
        if a is None:
            return "input codes are not unsigned with zero point 0"
        if w is None:
            return "weight codes are not a constant"
        if a > MAX_BITS or w > MAX_BITS:
            return f"W{w}A{a} is wider than {MAX_BITS} bits"
        return None

    @property
    def label(self) -> str:
        """``W2A2``; bipolar 1-bit weights ``W1A2`` (bitfold's 1-bit weights are bipolar), signed
        {-1, 0} ones ``W1sA2``."""
        return f"W{self.w_bits}{'s' if self.w_bits == 1 and not self.bipolar else ''}A{self.a_bits}"


def operands(model) -> list[Operand]:
    """One :class:`Operand` per Conv/Gemm/MatMul node of a QCDQ ONNX model, in graph order (read with
    the QCDQ graph helpers of :mod:`bitfold.export.qcdq_safety`)."""
    from bitfold.export.qcdq_safety import code_range, dequant_input, producers, values, weight_codes
    vals, prod = values(model), producers(model)
    out = []
    for i, n in enumerate(model.graph.node):
        if n.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        op = Operand(n.name or f"{n.op_type}_{i}", "conv2d" if n.op_type == "Conv" else "matmul")
        attrs = {a.name: a for a in n.attribute}
        xdq = dequant_input(n.input[0], prod, skip=("Flatten", "Reshape", "MaxPool", "Identity"))
        if xdq is not None and len(xdq.input) > 2 and xdq.input[2] in vals and vals[xdq.input[2]].size == 1:
            zp = vals[xdq.input[2]]
            op.x_lo, op.x_hi = code_range(xdq.input[0], prod, vals, zp.dtype)
            op.x_zero = int(zp.reshape(-1)[0])
        wdq = dequant_input(n.input[1], prod, skip=("Transpose",))
        codes = None
        if wdq is not None and not (len(wdq.input) > 2 and wdq.input[2] in vals and np.any(vals[wdq.input[2]] != 0)):
            codes = weight_codes(wdq, prod, vals)
        if codes is not None and not np.issubdtype(codes.dtype, np.integer):
            codes = None
        if op.op == "conv2d":
            op.groups = attrs["group"].i if "group" in attrs else 1
            op.dilated = "dilations" in attrs and any(d != 1 for d in attrs["dilations"].ints)
            op.weight = None if codes is None or codes.ndim != 4 else codes.astype(np.int64)
        elif codes is not None and codes.ndim == 2 and not ("transA" in attrs and attrs["transA"].i):
            # rows = output channels: a weight read through a Transpose, or a Gemm's with transB, is
            # stored [out, in]; a plain MatMul's / Gemm's B is [in, out]
            through_t = prod.get(n.input[1]) is not None and prod[n.input[1]].op_type == "Transpose"
            trans_b = "transB" in attrs and attrs["transB"].i
            op.weight = np.ascontiguousarray((codes if through_t or trans_b else codes.T).astype(np.int64))
        out.append(op)
    return out


#: the name of a bit-serial convolution's filter block (the default schedule re-lays it out)
WEIGHTS = "bitserial_filters"


def weight_form(bits: int, bipolar: bool = False) -> tuple[int, int]:
    """(multiplier, offset) with ``w = multiplier * w' - offset`` for the unsigned plane codes ``w'``:
    signed ``bits``-bit codes (1, 2^(bits-1)); bipolar codes (2, 1)."""
    if bipolar:
        if bits != 1:
            raise ValueError("bipolar weights are 1-bit")
        return 2, 1
    return 1, 1 << (bits - 1)


def pack_weights(w: np.ndarray, bits: int, bipolar: bool = False) -> np.ndarray:
    """(out, in) signed (or bipolar) codes -> (out + 1, bits, ceil(in / 32)) uint32 planes of the
    unsigned codes ``w'`` (:func:`weight_form`); the last row is all ones (its output is the input's sum):
    a dense layer packed as a 1x1 convolution, in the layout ``topi.nn.bitserial_dense`` reads."""
    return np.ascontiguousarray(pack_conv_weights(w[:, :, None, None], bits, WORD, bipolar)[:, :, 0, 0, :]
                                .transpose(0, 2, 1))


def conv_word(channels: int) -> int:
    """The packing word for a convolution's input channels: 32, 16 or 8 bits (channels padded up to 8)."""
    return 32 if channels % 32 == 0 else 16 if channels % 16 == 0 else 8


def pack_conv_weights(w: np.ndarray, bits: int, word: int, bipolar: bool = False) -> np.ndarray:
    """(out, in, kh, kw) signed (or bipolar) codes -> (out + 1, in_words, kh, kw, bits) planes of the
    unsigned codes ``w'`` (:func:`weight_form`) packed along the input channels (``topi.nn.bitpack``'s
    order); the last filter is all ones."""
    o, c, kh, kw = w.shape
    cp = -(-c // word) * word
    mul, off = weight_form(bits, bipolar)
    wu = np.zeros((o + 1, cp, kh, kw), np.int64)
    wu[:o, :c] = (w.astype(np.int64) + off) // mul
    if wu.min() < 0 or wu.max() >= (1 << bits) or np.any(wu[:o, :c] * mul - off != w):
        raise ValueError(f"weight codes outside the {'bipolar' if bipolar else f'signed {bits}-bit'} range")
    wu[o, :c] = 1
    planes = ((wu[..., None] >> np.arange(bits)) & 1).astype(np.uint64)        # o+1, cp, kh, kw, bits
    planes = planes.reshape(o + 1, cp // word, word, kh, kw, bits)
    shifts = (word - 1 - np.arange(word)).astype(np.uint64).reshape(1, 1, word, 1, 1, 1)
    return (planes << shifts).sum(2).astype({8: np.uint8, 16: np.uint16, 32: np.uint32}[word])


def conv_te(a_bits: int, w_bits: int, n_out: int, word: int, strides, padding, bipolar: bool = False):
    """A ``call_te`` function: (x (1, C, H, W) unsigned codes, packed filters) -> (1, n_out, H', W') int32.
    The ``n_out`` filters run as TVM's bit-serial convolution; the offset's correction (the all-ones
    filter's output: the sum of the input codes under each window) as a plain integer sum - the
    channels' sum per pixel, then the window's - so that the input is bit-packed once and the
    convolution has a filter count the default schedule can vectorize over
    (:func:`bitfold.export.tvm.schedules.apply_default`). The same integers either way."""
    from tvm import te, tirx
    from tvm.topi.nn import bitserial_conv2d_nchw
    from tvm.topi.nn.utils import get_pad_tuple

    def f(x, wp):
        _, c, h, w_ = (int(d) for d in x.shape)
        cp, kh, kw = int(wp.shape[1]) * word, int(wp.shape[2]), int(wp.shape[3])
        sh, sw = (int(s) for s in strides)
        pt, pl, pb, pr = get_pad_tuple(tuple(int(p) for p in padding), (kh, kw))
        xpad = te.compute((1, cp, h, w_), lambda n, ch, y, xx: tirx.if_then_else(
            ch < c, x[n, tirx.min(ch, c - 1), y, xx].astype("int32"), tirx.const(0, "int32")),
            name="bitserial_pad")
        filters = te.compute((n_out, *(int(d) for d in wp.shape[1:])), lambda *i: wp(*i), name=WEIGHTS)
        acc = bitserial_conv2d_nchw(xpad, filters, (sh, sw), (pt, pl, pb, pr), a_bits, w_bits,
                                    pack_dtype=f"uint{word}", out_dtype="int32", unipolar=False)
        rc = te.reduce_axis((0, c), name="rc")
        xsum = te.compute((h, w_), lambda y, xx: te.sum(x[0, rc, y, xx].astype("int32"), axis=rc),
                          name="bitserial_xsum")
        ry, rx = te.reduce_axis((0, kh), name="ry"), te.reduce_axis((0, kw), name="rx")

        def window(y, xx):
            iy, ix = y * sh + ry - pt, xx * sw + rx - pl
            inside = tirx.all(iy >= 0, iy < h, ix >= 0, ix < w_)
            return te.sum(tirx.if_then_else(inside, xsum[tirx.max(tirx.min(iy, h - 1), 0),
                                                         tirx.max(tirx.min(ix, w_ - 1), 0)],
                                            tirx.const(0, "int32")), axis=[ry, rx])
        total = te.compute((int(acc.shape[2]), int(acc.shape[3])), window, name="bitserial_total")
        mul, off = weight_form(w_bits, bipolar)
        return te.compute((1, n_out, int(acc.shape[2]), int(acc.shape[3])),
                          lambda n, ff, y, xx: mul * acc[n, ff, y, xx] - off * total[y, xx], name="bitserial_out")
    return f


def dense_te(a_bits: int, w_bits: int, n_out: int, bipolar: bool = False):
    """A ``call_te`` function: (x (1, K) unsigned codes, packed weights) -> (1, n_out) int32 dot products."""
    from tvm import te, tirx
    from tvm.topi.nn import bitserial_dense

    def f(x, wp):
        k = int(x.shape[1])
        kp = int(wp.shape[2]) * WORD
        xpad = te.compute((1, kp), lambda i, kk: tirx.if_then_else(
            kk < k, x[i, tirx.min(kk, k - 1)].astype("int32"), tirx.const(0, "int32")), name="bitserial_pad")
        acc = bitserial_dense(xpad, wp, a_bits, w_bits, pack_dtype="uint32", out_dtype="int32", unipolar=False)
        mul, off = weight_form(w_bits, bipolar)
        return te.compute((1, n_out), lambda i, j: mul * acc[i, j] - off * acc[i, n_out], name="bitserial_out")
    return f
