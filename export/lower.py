"""Lower a QONNX model to an integer streaming-dataflow model (the IR of the open-FPGA backend).

The QONNX graph (Quant nodes on weights and activations, MatMul/Gemm/Conv, BatchNormalization,
Relu, MaxPool, Flatten) is rewritten the way FINN's streamlining does it, but into a small typed
artefact instead of a graph:

* activations travel as unsigned integer *codes* ``q`` (``bits`` wide). The integer value the
  model computes with is ``v = mul * q + off`` (``mul`` 1, or 2 for bipolar ±1), its real value
  ``scale * v``;
* every compute layer is a matrix-vector unit: ``acc = W_int @ q`` (signed integer weights, the
  input's ``off`` folded into the thresholds), followed by a *multi-threshold* activation
  ``q_out = #{k : acc >= T[c, k]}`` that is exactly the float chain ``Quant(Relu(BN(...)))`` the
  QONNX model evaluates, or — for the last layer — the raw accumulator and a per-channel affine
  map (plus the remaining float ops) applied by the host;
* tensors stream pixel-major (``H, W, C``), so convolutions are sliding windows over a line of
  codes; flattening is folded into the next layer's weight order.

``IntModel.run_codes`` is the bit-exact integer reference that the generated RTL is simulated
against; :func:`check_lowering` compares the lowered model with ``qonnx.execute_onnx`` on the
original file (equal up to float rounding at threshold boundaries, the same check FINN makes).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from bitfold.core.errors import BitfoldError

#: element-wise float ops allowed between a compute layer and its activation quantizer
_CHAIN_OPS = ("BatchNormalization", "Relu", "Add", "Sub", "Mul", "Div", "Identity")


@dataclass
class QuantSpec:
    """One QONNX ``Quant``/``BipolarQuant`` (scalar or per-channel scale)."""
    scale: np.ndarray
    zeropt: float
    bits: int
    signed: bool
    narrow: bool
    rounding: str = "ROUND"
    bipolar: bool = False

    @property
    def lo(self) -> int:
        if self.bipolar:
            return -1
        if self.signed:
            return -(2 ** (self.bits - 1)) + int(self.narrow)
        return 0

    @property
    def hi(self) -> int:
        if self.bipolar:
            return 1
        return 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1 - int(self.narrow)

    @property
    def mul(self) -> int:
        return 2 if self.bipolar else 1

    @property
    def levels(self) -> int:
        return (self.hi - self.lo) // self.mul + 1

    @property
    def code_bits(self) -> int:
        return max(1, int(np.ceil(np.log2(self.levels))))

    def to_int(self, y: np.ndarray) -> np.ndarray:
        """The integer QONNX computes (``IntQuant`` before re-scaling), same float steps."""
        from qonnx.custom_op.general.intquant import resolve_rounding_mode
        if self.bipolar:
            return np.where(y >= 0, 1, -1).astype(np.int64)
        t = y / self.scale + self.zeropt
        t = np.clip(t, self.lo, self.hi)
        return resolve_rounding_mode(self.rounding)(t).astype(np.int64)

    def to_code(self, y: np.ndarray) -> np.ndarray:
        return (self.to_int(y) - self.lo) // self.mul


@dataclass
class InputStage:
    """Host side of the first quantizer: float input -> codes, in stream order. ``pre``: scalar
    element-wise ops in front of the quantizer (e.g. FINN's classics map [0, 1] to [-1, 1] with
    ``2x - 1``), applied in float32 in graph order, as ONNX computes them."""
    shape: tuple          # the model input without batch
    quant: QuantSpec
    nchw: bool            # 4-D input streamed as H, W, C
    pre: tuple = ()       # ((op, value), ...) with op in add, sub, mul, div

    def codes(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32).reshape(len(x), *self.shape)
        for op, v in self.pre:
            c = np.float32(v)
            x = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}[op](x, c)
        q = self.quant.to_code(x)
        if self.nchw:
            q = q.transpose(0, 2, 3, 1)
        return q.reshape(len(x), -1)


@dataclass
class MVAUStage:
    """A convolution (k x k sliding window) or dense layer (1 x 1 pixel) with thresholds."""
    name: str
    ih: int
    iw: int
    ic: int
    oc: int
    k: int
    stride: int
    pad: int
    ibits: int            # input code width
    pad_code: int         # the code of a real zero (padding)
    weights: np.ndarray   # (oc, k*k*ic) int64, im2col order (ky, kx, c)
    wbits: int            # signed storage width
    acc_lo: np.ndarray    # per-channel accumulator range
    acc_hi: np.ndarray
    thresholds: np.ndarray | None  # (oc, levels-1) int64, None: raw accumulator output
    obits: int            # output code width (accumulator width when raw)
    wbits_model: int = 0  # the weight width of the QONNX model (for reports)

    @property
    def oh(self):
        return (self.ih + 2 * self.pad - self.k) // self.stride + 1

    @property
    def ow(self):
        return (self.iw + 2 * self.pad - self.k) // self.stride + 1

    @property
    def mw(self):  # matrix width (inputs per output)
        return self.k * self.k * self.ic

    @property
    def acc_bits(self) -> int:
        lo = min(int(self.acc_lo.min()), 0)
        hi = int(self.acc_hi.max()) + 1
        return int(max(_sbits(lo), _sbits(hi)))

    @property
    def macs(self) -> int:
        return self.oh * self.ow * self.oc * self.mw

    def run(self, q: np.ndarray) -> np.ndarray:
        n = len(q)
        x = q.reshape(n, self.ih, self.iw, self.ic)
        if self.pad:
            x = np.pad(x, ((0, 0), (self.pad,) * 2, (self.pad,) * 2, (0, 0)), constant_values=self.pad_code)
        cols = np.empty((n, self.oh, self.ow, self.k, self.k, self.ic), dtype=np.int64)
        for ky in range(self.k):
            for kx in range(self.k):
                cols[:, :, :, ky, kx] = x[:, ky:ky + self.stride * self.oh:self.stride,
                                          kx:kx + self.stride * self.ow:self.stride]
        acc = cols.reshape(n, self.oh * self.ow, self.mw) @ self.weights.T
        if self.thresholds is None:
            return acc.reshape(n, -1)
        out = (acc[..., None] >= self.thresholds[None, None]).sum(-1)
        return out.reshape(n, -1)


@dataclass
class PoolStage:
    name: str
    ih: int
    iw: int
    ch: int
    k: int
    bits: int

    @property
    def oh(self):
        return self.ih // self.k

    @property
    def ow(self):
        return self.iw // self.k

    def run(self, q: np.ndarray) -> np.ndarray:
        n = len(q)
        x = q.reshape(n, self.ih, self.iw, self.ch)[:, :self.oh * self.k, :self.ow * self.k]
        x = x.reshape(n, self.oh, self.k, self.ow, self.k, self.ch).max(axis=(2, 4))
        return x.reshape(n, -1)


@dataclass
class IntModel:
    """The lowered model: host input quantizer, integer stages, host output map."""
    input: InputStage
    stages: list
    out_alpha: np.ndarray         # per output channel
    out_beta: np.ndarray
    out_chain: list = field(default_factory=list)
    out_quant: QuantSpec | None = None   # set when the model ends with an activation quantizer
    out_perm: np.ndarray | None = None   # stream position of each logical output index

    @property
    def mvaus(self) -> list:
        return [s for s in self.stages if isinstance(s, MVAUStage)]

    def run_codes(self, codes: np.ndarray) -> np.ndarray:
        q = np.asarray(codes, dtype=np.int64)
        for s in self.stages:
            q = s.run(q)
        return q

    def outputs_to_float(self, out: np.ndarray) -> np.ndarray:
        out = np.asarray(out, dtype=np.int64)
        if self.out_perm is not None:
            out = out[:, self.out_perm]
        if self.out_quant is not None:
            q = self.out_quant
            return (q.scale * (q.mul * out + q.lo)).astype(np.float32)
        y = self.out_alpha * out.astype(np.float64) + self.out_beta
        return _apply_chain(y, self.out_chain).astype(np.float32)

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self.outputs_to_float(self.run_codes(self.input.codes(x)))

    def summary(self) -> list[dict]:
        rows = []
        for s in self.stages:
            if isinstance(s, MVAUStage):
                rows.append({"name": s.name, "type": "conv" if s.k > 1 or s.ih > 1 else "dense",
                             "in": f"{s.ih}x{s.iw}x{s.ic}", "out": f"{s.oh}x{s.ow}x{s.oc}", "k": s.k,
                             "w_bits": s.wbits_model, "in_bits": s.ibits,
                             "out_bits": s.obits if s.thresholds is not None else f"acc{s.obits}",
                             "macs": s.macs})
            else:
                rows.append({"name": s.name, "type": "maxpool", "in": f"{s.ih}x{s.iw}x{s.ch}",
                             "out": f"{s.oh}x{s.ow}x{s.ch}", "k": s.k, "w_bits": "-", "in_bits": s.bits,
                             "out_bits": s.bits, "macs": 0})
        return rows


def _sbits(v: int) -> int:
    """Signed two's-complement width that holds ``v``."""
    v = int(v)
    return (v.bit_length() + 1) if v >= 0 else ((-v - 1).bit_length() + 1)


def _apply_chain(y: np.ndarray, chain: list) -> np.ndarray:
    """Apply recorded element-wise ops to channels-last ``y`` (float64)."""
    for op, p in chain:
        if op == "bn":
            y = (y - p["mean"]) / np.sqrt(p["var"] + p["eps"]) * p["gamma"] + p["beta"]
        elif op == "relu":
            y = np.maximum(y, 0.0)
        elif op == "add":
            y = y + p
        elif op == "mul":
            y = y * p
        elif op == "div":
            y = y / p
    return y


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.model = model
        self.init = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self.consumers: dict[str, list] = {}
        self.producer = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
            for o in n.output:
                self.producer[o] = n
        self.outputs = [o.name for o in g.output]

    def const(self, name: str):
        """Value of a constant tensor (initializer, Constant, or Quant/Identity of constants)."""
        if name in self.init:
            return self.init[name]
        n = self.producer.get(name)
        if n is None:
            return None
        if n.op_type == "Constant":
            return numpy_helper.to_array(n.attribute[0].t)
        if n.op_type in ("Quant", "BipolarQuant"):
            vals = [self.const(i) for i in n.input]
            if any(v is None for v in vals):
                return None
            spec = quant_spec(n, self)
            return spec.to_int(vals[0].astype(np.float32)).astype(np.float64) * spec.scale
        if n.op_type == "Identity":
            return self.const(n.input[0])
        return None

    def quant_of_const(self, name: str):
        """(integer weights, per-channel scale, spec) of a constant quantized weight tensor."""
        n = self.producer.get(name)
        while n is not None and n.op_type == "Identity":
            n = self.producer.get(n.input[0])
        if n is None or n.op_type not in ("Quant", "BipolarQuant"):
            return None
        w = self.const(n.input[0])
        if w is None:
            return None
        spec = quant_spec(n, self)
        if spec.zeropt != 0:
            raise BitfoldError(f"weight quantizer {n.name} has a non-zero zero point",
                               "the open-FPGA backend needs symmetric weight quantization (zero point 0)")
        return spec.to_int(w.astype(np.float32)), spec


def quant_spec(node, graph: _Graph) -> QuantSpec:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    scale = np.asarray(graph.const(node.input[1]), dtype=np.float32)
    if node.op_type == "BipolarQuant":
        return QuantSpec(scale, 0.0, 1, True, False, bipolar=True)
    zp = np.asarray(graph.const(node.input[2]), dtype=np.float32)
    bw = float(np.asarray(graph.const(node.input[3])))
    if bw != int(bw) or not 1 <= bw <= 8:
        raise BitfoldError(f"quantizer {node.name} has bit width {bw}",
                           "the open-FPGA backend takes integer widths 1..8; re-export with integer bits")
    if zp.size != 1:
        raise BitfoldError(f"quantizer {node.name} has a per-channel zero point", "use a scalar zero point")
    rm = attrs.get("rounding_mode", b"ROUND")
    rm = rm.decode() if isinstance(rm, bytes) else rm
    signed, narrow = bool(attrs.get("signed", 1)), bool(attrs.get("narrow", 0))
    if int(bw) == 1 and signed:
        return QuantSpec(scale, float(zp), 1, True, False, rm, bipolar=True)
    return QuantSpec(scale, float(zp), int(bw), signed, narrow, rm)


def _per_channel(v, oc: int, what: str, node) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    if v.size == 1:
        return np.full(oc, float(v.reshape(())))
    if v.size == oc:
        return v.reshape(oc)
    raise BitfoldError(f"{node.op_type} {node.name}: {what} of shape {v.shape} is not per-tensor or per-channel "
                       f"({oc} channels)", "the open-FPGA backend supports per-tensor and per-channel constants")


def _thresholds(alpha, beta, chain, quant: QuantSpec, lo, hi):
    """Smallest accumulator per channel and output code k=1..levels-1 whose activation code is >= k.

    ``alpha`` must be oriented so the code is non-decreasing in the accumulator.
    """
    oc = len(alpha)
    levels = quant.levels
    ks = np.arange(1, levels)[None, :]
    a = alpha[:, None]
    b = beta[:, None]

    def code(acc):
        y = _apply_chain(a * acc.astype(np.float64) + b, [(op, _col(p)) for op, p in chain])
        return quant.to_code(y)

    left = np.repeat(lo[:, None], levels - 1, axis=1).astype(np.int64)
    right = np.repeat((hi + 1)[:, None], levels - 1, axis=1).astype(np.int64)
    while np.any(left < right):
        mid = (left + right) // 2
        ok = code(mid) >= ks
        right = np.where(ok, mid, right)
        left = np.where(ok, left, mid + 1)
    assert left.shape == (oc, levels - 1)
    return left


def _col(p):
    if isinstance(p, dict):
        return {k: (v[:, None] if isinstance(v, np.ndarray) and v.ndim == 1 else v) for k, v in p.items()}
    if isinstance(p, np.ndarray) and p.ndim == 1:
        return p[:, None]
    return p


def lower(model_or_path) -> IntModel:
    """Lower a QONNX file (or ModelProto) to an :class:`IntModel`; clear errors for what it cannot map."""
    from bitfold.export.onnx_io import load_onnx
    model = load_onnx(model_or_path) if isinstance(model_or_path, (str, Path)) else model_or_path
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        raise BitfoldError("this is a QCDQ file; the FPGA backends take QONNX",
                           "export with: bitfold export RUN --format qonnx")
    g = _Graph(model)
    inputs = [i for i in model.graph.input if i.name not in g.init]
    if len(inputs) != 1:
        raise BitfoldError(f"the model has {len(inputs)} inputs", "FPGA builds take single-input models")
    shape = tuple(d.dim_value for d in inputs[0].type.tensor_type.shape.dim)[1:]
    if not shape or any(d <= 0 for d in shape):
        raise BitfoldError(f"model input has no fixed shape ({shape})", "export with a fixed input shape")

    t = inputs[0].name
    state = "raw"
    flatten_first = False
    inp = None
    stages: list = []
    pre: list = []        # scalar ops on the raw input, before its quantizer
    cur = None            # live activation: dict(quant, h, w, c, perm)
    pend = None           # pending compute stage: dict(stage, alpha, beta, chain)
    n_idx = {"conv": 0, "dense": 0, "pool": 0}

    while t not in g.outputs:
        cons = g.consumers.get(t, [])
        if len(cons) != 1:
            raise BitfoldError(f"tensor {t} feeds {len(cons)} nodes ({', '.join(n.op_type for n in cons)})",
                               "the FPGA backends map chains of layers; residual/branching topologies are not "
                               "supported (use the TVM backend for those)")
        n = cons[0]
        op = n.op_type
        if op in ("Flatten", "Reshape"):
            if state == "raw":
                flatten_first = True
            elif state == "codes":
                h, w, c = cur["h"], cur["w"], cur["c"]
                cur = {**cur, "perm": _flatten_perm(h, w, c, cur["perm"]), "h": 1, "w": 1, "c": h * w * c}
            else:
                raise BitfoldError(f"{op} {n.name} between a layer and its activation quantizer is not supported")
        elif op in ("Quant", "BipolarQuant") and state == "raw":
            spec = quant_spec(n, g)
            if spec.scale.size != 1:
                raise BitfoldError(f"input quantizer {n.name} has a per-channel scale", "use a per-tensor input scale")
            nchw = len(shape) == 3 and not flatten_first
            inp = InputStage(shape, spec, nchw, tuple(pre))
            if nchw:
                c, h, w = shape
            else:
                c, h, w = int(np.prod(shape)), 1, 1
            cur = {"quant": spec, "h": h, "w": w, "c": c, "perm": None}
            state = "codes"
        elif op in ("Add", "Sub", "Mul", "Div") and state == "raw":
            pre.append(_input_op(n, g, t))
        elif op in ("MatMul", "Gemm", "Conv"):
            if state != "codes":
                raise BitfoldError(f"{op} {n.name} reads an unquantized tensor",
                                   "every compute layer's input needs an activation quantizer (Quant node)")
            pend = _compute_stage(n, g, cur, n_idx)
            state = "acc"
        elif op in _CHAIN_OPS and state == "acc":
            pend["chain"].append(_chain_op(n, g, pend["stage"].oc))
        elif op in ("Quant", "BipolarQuant") and state == "acc":
            spec = quant_spec(n, g)
            if spec.scale.size != 1:
                raise BitfoldError(f"activation quantizer {n.name} has a per-channel scale",
                                   "the open-FPGA backend needs per-tensor activation scales")
            stages.append(_finish(pend, spec))
            s = pend["stage"]
            cur = {"quant": spec, "h": s.oh, "w": s.ow, "c": s.oc, "perm": None}
            pend, state = None, "codes"
        elif op == "MaxPool" and state == "codes":
            stages.append(_pool(n, cur, n_idx))
            p = stages[-1]
            cur = {**cur, "h": p.oh, "w": p.ow}
        elif op == "Identity":
            pass
        else:
            raise BitfoldError(f"unsupported layer for the FPGA backends: {op} ({n.name}) after "
                               f"{'the input' if state == 'raw' else 'a quantized activation' if state == 'codes' else 'a compute layer'}",
                               "supported: Quant, MatMul/Gemm/Conv (group 1), BatchNormalization, Relu, "
                               "Add/Mul by constants, MaxPool (k = stride), Flatten")
        t = n.output[0]

    if state == "raw" or not stages and pend is None:
        raise BitfoldError("the model has no quantized compute layer", "export a quantized model (QONNX)")
    if state == "acc":
        s = pend["stage"]
        flip = np.ones(s.oc)
        s.thresholds = None
        s.obits = s.acc_bits
        stages.append(s)
        model_out = IntModel(inp, stages, pend["alpha"] * flip, pend["beta"], pend["chain"])
        if s.oh * s.ow > 1:
            model_out.out_perm = _flatten_perm(s.oh, s.ow, s.oc, None)
        return model_out
    q = cur["quant"]
    return IntModel(inp, stages, np.ones(1), np.zeros(1), out_quant=q,
                    out_perm=None if cur["h"] * cur["w"] == 1 else _flatten_perm(cur["h"], cur["w"], cur["c"], None))


def _flatten_perm(h, w, c, prev):
    """For a (C, H, W) tensor streamed as (H, W, C): stream position of each NCHW-flat index."""
    if h * w == 1:
        return prev
    ci, hi, wi = np.meshgrid(np.arange(c), np.arange(h), np.arange(w), indexing="ij")
    return ((hi * w + wi) * c + ci).reshape(-1)


def _compute_stage(n, g: _Graph, cur, n_idx) -> dict:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
    wq = g.quant_of_const(n.input[1])
    if wq is None:
        raise BitfoldError(f"{n.op_type} {n.name}: weights are not a quantized constant",
                           "export weights through a Quant node (Brevitas QuantLinear/QuantConv2d)")
    wint, wspec = wq
    aq: QuantSpec = cur["quant"]
    bias = None
    if n.op_type == "Conv":
        if attrs.get("group", 1) != 1 or any(d != 1 for d in attrs.get("dilations", [1, 1])):
            raise BitfoldError(f"Conv {n.name}: grouped/dilated convolutions are not supported by the FPGA backends")
        oc, ic, kh, kw = wint.shape
        pads = attrs.get("pads", [0, 0, 0, 0])
        strides = attrs.get("strides", [1, 1])
        if kh != kw or len(set(pads)) != 1 or strides[0] != strides[1]:
            raise BitfoldError(f"Conv {n.name}: only square kernels, symmetric padding and equal strides are supported")
        if ic != cur["c"] or cur["perm"] is not None:
            raise BitfoldError(f"Conv {n.name}: input has {cur['c']} channels, weights expect {ic}")
        wmat = wint.transpose(0, 2, 3, 1).reshape(oc, -1)
        k, stride, pad, ih, iw = kh, strides[0], pads[0], cur["h"], cur["w"]
        kind = "conv"
        if len(n.input) > 2:
            bias = g.const(n.input[2])
    else:
        if n.op_type == "Gemm":
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                raise BitfoldError(f"Gemm {n.name}: transA/alpha/beta are not supported")
            wmat = wint if attrs.get("transB", 0) else wint.T
            if len(n.input) > 2:
                bias = g.const(n.input[2])
        else:
            wmat = wint.T
        oc, inf = wmat.shape
        if inf != cur["h"] * cur["w"] * cur["c"]:
            raise BitfoldError(f"{n.op_type} {n.name}: {inf} inputs but the previous layer gives "
                               f"{cur['h'] * cur['w'] * cur['c']}")
        if cur["perm"] is not None:
            wm = np.empty_like(wmat)
            wm[:, cur["perm"]] = wmat
            wmat = wm
        k, stride, pad, ih, iw = 1, 1, 0, 1, 1
        kind = "dense"
        cur = {**cur, "c": inf}
    sw = _per_channel(wspec.scale, oc, "weight scale", n)
    sa = float(aq.scale.reshape(()))
    wmat = wmat.astype(np.int64)
    qmax = aq.levels - 1
    pos = np.clip(wmat, 0, None).sum(1)
    neg = np.clip(wmat, None, 0).sum(1)
    acc_lo, acc_hi = neg * qmax, pos * qmax
    if pad and (-aq.lo) % aq.mul:
        raise BitfoldError(f"Conv {n.name}: zero padding of a bipolar (±1) input cannot be represented",
                           "use >= 2-bit activations before padded convolutions")
    pad_code = (0 - aq.lo) // aq.mul if pad else 0
    rowsum = wmat.sum(1).astype(np.float64)
    alpha = sa * sw * aq.mul
    beta = sa * sw * aq.lo * rowsum + (0.0 if bias is None else _per_channel(bias, oc, "bias", n))
    wb = max(2, max(_sbits(int(wmat.min())), _sbits(int(wmat.max()))))
    n_idx[kind] += 1
    stage = MVAUStage(f"{kind}{n_idx[kind] - 1}", ih, iw, cur["c"] if kind == "conv" else cur["h"] * cur["w"] * cur["c"],
                      oc, k, stride, pad, aq.code_bits, pad_code, wmat, wb, acc_lo, acc_hi, None, 0,
                      wbits_model=wspec.bits)
    return {"stage": stage, "alpha": alpha, "beta": beta, "chain": []}


def _input_op(n, g: _Graph, t: str):
    """A scalar Add/Sub/Mul/Div on the raw input (the tensor ``t``), kept for the host's quantizer."""
    other = [i for i in n.input if i != t]
    c = g.const(other[0]) if len(other) == 1 else None
    if c is None or np.asarray(c).size != 1 or (n.op_type in ("Sub", "Div") and n.input[0] != t):
        raise BitfoldError(f"{n.op_type} {n.name} on the model input is not 'input {n.op_type} scalar constant'",
                           "the FPGA backends take scalar Add/Sub/Mul/Div constants in front of the input quantizer")
    return (n.op_type.lower(), float(np.asarray(c, dtype=np.float32).reshape(())))


def _chain_op(n, g: _Graph, oc: int):
    if n.op_type == "Relu":
        return ("relu", None)
    if n.op_type == "Identity":
        return ("add", 0.0)
    if n.op_type == "BatchNormalization":
        sc, b, m, v = (g.const(i) for i in n.input[1:5])
        if any(x is None for x in (sc, b, m, v)):
            raise BitfoldError(f"BatchNormalization {n.name} has non-constant parameters")
        eps = [onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == "epsilon"]
        return ("bn", {"gamma": _per_channel(sc, oc, "scale", n), "beta": _per_channel(b, oc, "bias", n),
                       "mean": _per_channel(m, oc, "mean", n), "var": _per_channel(v, oc, "var", n),
                       "eps": float(eps[0]) if eps else 1e-5})
    c = g.const(n.input[1])
    if c is None:
        raise BitfoldError(f"{n.op_type} {n.name} has a non-constant operand",
                           "residual additions are not supported by the FPGA backends")
    c = _per_channel(c, oc, "operand", n)
    return {"Add": ("add", c), "Sub": ("add", -c), "Mul": ("mul", c), "Div": ("div", c)}[n.op_type]


def _finish(pend, spec: QuantSpec) -> MVAUStage:
    s: MVAUStage = pend["stage"]
    alpha, beta, chain = pend["alpha"], pend["beta"], pend["chain"]
    # orient every channel so the activation code is non-decreasing in the accumulator
    def code_at(acc):
        return spec.to_code(_apply_chain(alpha * acc + beta, chain))
    flip = code_at(s.acc_hi.astype(np.float64)) < code_at(s.acc_lo.astype(np.float64))
    if flip.any():
        sign = np.where(flip, -1, 1)
        s.weights = s.weights * sign[:, None]
        s.acc_lo, s.acc_hi = np.where(flip, -s.acc_hi, s.acc_lo), np.where(flip, -s.acc_lo, s.acc_hi)
        alpha = alpha * sign
    s.thresholds = _thresholds(alpha, beta, chain, spec, s.acc_lo, s.acc_hi)
    s.obits = spec.code_bits
    return s


def _pool(n, cur, n_idx) -> PoolStage:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
    ks, st = attrs.get("kernel_shape"), attrs.get("strides", attrs.get("kernel_shape"))
    if (len(set(ks)) != 1 or list(st) != list(ks) or any(attrs.get("pads", [0]))
            or attrs.get("ceil_mode", 0)):
        raise BitfoldError(f"MaxPool {n.name}: only square, non-overlapping pooling without padding is supported")
    if cur["perm"] is not None:
        raise BitfoldError(f"MaxPool {n.name} after a flatten is not supported")
    q: QuantSpec = cur["quant"]
    n_idx["pool"] += 1
    return PoolStage(f"pool{n_idx['pool'] - 1}", cur["h"], cur["w"], cur["c"], ks[0], q.code_bits)


@dataclass
class LoweringCheck:
    samples: int
    max_abs_diff: float
    argmax_agreement: float
    passed: bool

    def summary(self):
        return (f"lowered integer model vs qonnx.execute_onnx: {self.samples} samples, max |diff| "
                f"{self.max_abs_diff:.3g}, argmax agreement {self.argmax_agreement:.2%} "
                f"({'pass' if self.passed else 'FAIL'})")


def check_lowering(onnx_path, im: IntModel, x: np.ndarray) -> LoweringCheck:
    """Compare the lowered model with qonnx execution of the original file (float rounding allowed)."""
    from bitfold.export.verify import compare, output_step_of, run_qonnx
    ref = run_qonnx(str(onnx_path), x)
    out = im.forward(x)
    rep = compare("qonnx", "lowered", ref.reshape(len(x), -1), out.reshape(len(x), -1), output_step_of(onnx_path))
    return LoweringCheck(len(x), rep.max_abs_diff, rep.argmax_agreement, rep.passed)
