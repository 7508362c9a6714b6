"""Bit-serial kernels for sub-8-bit dense layers in the TVM backend.

A quantized matmul whose input codes are unsigned ``a``-bit integers (``a <= 4``, zero point 0) and whose
weight codes are signed ``w``-bit integers (``w <= 4``) is computed on bit-planes: the input is split
into ``a`` planes and the weights into ``w`` planes of 32 one-bit lanes per word, and

    y[j] = sum_{p < a, q < w} 2^(p+q) * popcount(x_p & W'_q[j])  -  2^(w-1) * sum_k x[k]

where ``W' = W + 2^(w-1)`` (the weights offset into ``[0, 2^w - 1]``). The dot product on planes is TVM's
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
    def w_bits(self) -> int | None:
        if self.weight is None:
            return None
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
        return f"W{self.w_bits}A{self.a_bits}"


def operands(model) -> list[Operand]:
    """One :class:`Operand` per Conv/Gemm/MatMul node of a QCDQ ONNX model, in graph order."""
    from onnx import numpy_helper
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = numpy_helper.to_array(a.t)
        for o in n.output:
            producer[o] = n

    def attr(node, name, default=None):
        for a in node.attribute:
            if a.name == name:
                return a.i
        return default

    def const_of(name):
        """The integer codes of a constant tensor, through Clip / Transpose / Identity."""
        if name in consts:
            return consts[name]
        n = producer.get(name)
        if n is None:
            return None
        if n.op_type == "Clip":
            v = const_of(n.input[0])
            lo = consts.get(n.input[1]) if len(n.input) > 1 and n.input[1] else None
            hi = consts.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            if v is None:
                return None
            return np.clip(v, lo if lo is not None else v.min(), hi if hi is not None else v.max())
        if n.op_type == "Identity":
            return const_of(n.input[0])
        return None

    def weight_codes(name):
        """(codes, transposed?) of a dequantized weight input with zero point 0."""
        n = producer.get(name)
        transposed = False
        if n is not None and n.op_type == "Transpose":
            perm = [a.ints for a in n.attribute if a.name == "perm"]
            if perm and list(perm[0]) != [1, 0]:
                return None, False
            transposed, n = True, producer.get(n.input[0])
        if n is None or n.op_type != "DequantizeLinear":
            return None, False
        zp = consts.get(n.input[2]) if len(n.input) > 2 else None
        if zp is not None and np.any(zp != 0):
            return None, False
        codes = const_of(n.input[0])
        return (None if codes is None or not np.issubdtype(codes.dtype, np.integer) else codes), transposed

    def input_range(name):
        n = producer.get(name)
        while n is not None and n.op_type in ("Flatten", "Reshape", "MaxPool", "Identity"):
            n = producer.get(n.input[0])
        if n is None or n.op_type != "DequantizeLinear":
            return None, None, None
        zp = consts.get(n.input[2]) if len(n.input) > 2 else None
        z = int(np.asarray(zp).reshape(-1)[0]) if zp is not None and np.asarray(zp).size == 1 else None
        src = producer.get(n.input[0])
        if src is not None and src.op_type == "Clip" and len(src.input) >= 3 \
                and src.input[1] in consts and src.input[2] in consts:
            return int(consts[src.input[1]]), int(consts[src.input[2]]), z
        if src is not None and src.op_type == "QuantizeLinear" and zp is not None:
            info = np.iinfo(np.asarray(zp).dtype)
            return int(info.min), int(info.max), z
        return None, None, None

    out = []
    for i, n in enumerate(model.graph.node):
        if n.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        name = n.name or f"{n.op_type}_{i}"
        op = Operand(name, "conv2d" if n.op_type == "Conv" else "matmul")
        op.x_lo, op.x_hi, op.x_zero = input_range(n.input[0])
        codes, transposed = weight_codes(n.input[1])
        if op.op == "conv2d":
            op.groups = attr(n, "group", 1)
            op.dilated = any(d != 1 for a in n.attribute if a.name == "dilations" for d in a.ints)
            op.weight = None if codes is None or codes.ndim != 4 else codes.astype(np.int64)
        if codes is not None and op.op == "matmul" and codes.ndim == 2:
            if n.op_type == "Gemm":
                if attr(n, "transA", 0):
                    codes = None
                elif not attr(n, "transB", 0):
                    codes = codes.T            # B is (in, out)
            elif not transposed:
                codes = codes.T                # MatMul with (in, out) weights
            op.weight = None if codes is None else np.ascontiguousarray(codes.astype(np.int64))
        out.append(op)
    return out


def pack_weights(w: np.ndarray, bits: int) -> np.ndarray:
    """(out, in) signed codes -> (out + 1, bits, ceil(in / 32)) uint32 planes of ``w + 2^(bits-1)``;
    the last row is all ones (its output is the input's sum). Bit order within a word is
    ``topi.nn.bitpack``'s: element ``32*i + t`` at bit ``31 - t``."""
    n, k = w.shape
    kp = -(-k // WORD) * WORD
    wu = np.zeros((n + 1, kp), np.int64)
    wu[:n, :k] = w.astype(np.int64) + (1 << (bits - 1))
    wu[n, :k] = 1
    planes = ((wu[:, None, :] >> np.arange(bits)[None, :, None]) & 1).astype(np.uint64)
    planes = planes.reshape(n + 1, bits, kp // WORD, WORD)
    shifts = (WORD - 1 - np.arange(WORD)).astype(np.uint64)
    return (planes << shifts).sum(-1).astype(np.uint32)


def conv_word(channels: int) -> int:
    """The packing word for a convolution's input channels: 32, 16 or 8 bits (channels padded up to 8)."""
    return 32 if channels % 32 == 0 else 16 if channels % 16 == 0 else 8


def pack_conv_weights(w: np.ndarray, bits: int, word: int) -> np.ndarray:
    """(out, in, kh, kw) signed codes -> (out + 1, in_words, kh, kw, bits) planes of ``w + 2^(bits-1)``
    packed along the input channels (``topi.nn.bitpack``'s order); the last filter is all ones."""
    o, c, kh, kw = w.shape
    cp = -(-c // word) * word
    wu = np.zeros((o + 1, cp, kh, kw), np.int64)
    wu[:o, :c] = w.astype(np.int64) + (1 << (bits - 1))
    wu[o, :c] = 1
    planes = ((wu[..., None] >> np.arange(bits)) & 1).astype(np.uint64)        # o+1, cp, kh, kw, bits
    planes = planes.reshape(o + 1, cp // word, word, kh, kw, bits)
    shifts = (word - 1 - np.arange(word)).astype(np.uint64).reshape(1, 1, word, 1, 1, 1)
    return (planes << shifts).sum(2).astype({8: np.uint8, 16: np.uint16, 32: np.uint32}[word])


def conv_te(a_bits: int, w_bits: int, n_out: int, word: int, strides, padding):
    """A ``call_te`` function: (x (1, C, H, W) unsigned codes, packed filters) -> (1, n_out, H', W') int32."""
    from tvm import te, tirx
    from tvm.topi.nn import bitserial_conv2d_nchw

    def f(x, wp):
        _, c, h, w_ = (int(d) for d in x.shape)
        cp = int(wp.shape[1]) * word
        xpad = te.compute((1, cp, h, w_), lambda n, ch, y, xx: tirx.if_then_else(
            ch < c, x[n, tirx.min(ch, c - 1), y, xx].astype("int32"), tirx.const(0, "int32")),
            name="bitserial_pad")
        acc = bitserial_conv2d_nchw(xpad, wp, tuple(int(s) for s in strides), tuple(int(p) for p in padding),
                                    a_bits, w_bits, pack_dtype=f"uint{word}", out_dtype="int32", unipolar=False)
        off = 1 << (w_bits - 1)
        return te.compute((1, n_out, int(acc.shape[2]), int(acc.shape[3])),
                          lambda n, ff, y, xx: acc[n, ff, y, xx] - off * acc[n, n_out, y, xx], name="bitserial_out")
    return f


def dense_te(a_bits: int, w_bits: int, n_out: int):
    """A ``call_te`` function: (x (1, K) unsigned codes, packed weights) -> (1, n_out) int32 dot products."""
    from tvm import te, tirx
    from tvm.topi.nn import bitserial_dense

    def f(x, wp):
        k = int(x.shape[1])
        kp = int(wp.shape[2]) * WORD
        xpad = te.compute((1, kp), lambda i, kk: tirx.if_then_else(
            kk < k, x[i, tirx.min(kk, k - 1)].astype("int32"), tirx.const(0, "int32")), name="bitserial_pad")
        acc = bitserial_dense(xpad, wp, a_bits, w_bits, pack_dtype="uint32", out_dtype="int32", unipolar=False)
        off = 1 << (w_bits - 1)
        return te.compute((1, n_out), lambda i, j: acc[i, j] - off * acc[i, n_out], name="bitserial_out")
    return f
