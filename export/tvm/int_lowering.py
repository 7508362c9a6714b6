"""A Relax pass that runs quantized convolutions and matmuls in integer arithmetic.

TVM's ONNX frontend imports a QCDQ export as fake-quant: ``conv2d(dequantize(x_q), dequantize(w_q))``
computes a float convolution on dequantized values. :func:`lower_to_integer` rewrites each

    conv2d / matmul ( dequantize(x_q, s_x, z_x) , dequantize(w_q, s_w, 0) )

into

    astype( conv2d / matmul (x_q - z_x, w_q, out_dtype=int32), float32 ) * (s_x * s_w)

so the kernel that runs multiplies 8-bit integer codes and accumulates in int32; the float multiply by
the combined scale is fused by Relax into the requantize chain that follows (BN, ReLU, quantize).
``max_pool2d`` and ``reshape`` between a dequantize and the layer are moved before the dequantize
(both commute with a positive per-tensor scale), so pooled and flattened inputs stay integer too.

A layer stays in float32 when its input or weight is not a dequantized integer tensor, when the
weight has a non-zero zero point, or when a scale is not per-tensor (input) / per-output-channel
(weight). :func:`lower_to_integer` returns the module and one :class:`LayerArith` per layer, in
graph order, saying which it became and why.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class LayerArith:
    index: int
    op: str
    arith: str          # "int" or "float"
    detail: str         # dtypes for int layers, the reason for float ones
    layer: str = ""     # the ONNX node name, when it could be matched
    kernel: str = ""    # what runs it: "int8", "bitserial W2A2" or "float"
    bitserial: str = "" # "W2A2" when the layer can run bit-serial, else the reason it cannot

    def as_dict(self) -> dict:
        return asdict(self)


def _const(e):
    import tvm
    return e.value.numpy() if isinstance(e, tvm.ir.expr.Constant) else None


def _make_pass():
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    ops = {name: tvm.ir.Op.get(f"relax.{name}") for name in
           ("dequantize", "nn.conv2d", "matmul", "nn.max_pool2d", "reshape", "permute_dims")}

    @mutator
    class IntLowering(PyExprMutator):
        def __init__(self, mod=None, operands=None, bitserial=()):
            super().__init__(mod)
            self.layers: list[LayerArith] = []
            self.operands = operands
            # {layer index: variant}; "" (packing word from the channel count, filters innermost and
            # vectorized), "x" (the same word, output width innermost), "k32" (32-bit words, channels
            # padded), "k32n" (32-bit words, the compute's own loop nest)
            self.bitserial = dict(bitserial) if isinstance(bitserial, dict) else {i: "" for i in bitserial}

        def _value(self, e):
            if isinstance(e, relax.Var):
                try:
                    v = self.lookup_binding(e)
                except Exception:  # noqa: BLE001 - not a binding of this function
                    return None
                return v
            return e

        def _int_source(self, e, moves=True):
            """(int tensor, scale ndarray, zero point ndarray, axis) for a dequantized input."""
            v = self._value(e)
            if not isinstance(v, relax.Call):
                return None
            if v.op == ops["dequantize"]:
                scale, zp = _const(v.args[1]), _const(v.args[2])
                if scale is None or zp is None:
                    return None
                return v.args[0], scale, zp, int(v.attrs.axis)
            if moves and v.op in (ops["nn.max_pool2d"], ops["reshape"]):
                src = self._int_source(v.args[0], moves)
                if src is None or src[1].size != 1 or float(src[1].reshape(-1)[0]) <= 0 or src[2].size != 1:
                    return None
                q = src[0]
                if v.op == ops["reshape"]:
                    moved = relax.op.reshape(q, v.args[1])
                else:
                    moved = relax.Call(v.op, [q], v.attrs)
                return self.builder_.emit(self.builder_.normalize(moved)), src[1], src[2], src[3]
            return None

        def _weight_source(self, e):
            v = self._value(e)
            if isinstance(v, relax.Call) and v.op == ops["permute_dims"]:
                src = self._int_source(v.args[0], moves=False)
                if src is None:
                    return None
                q, s, z, axis = src
                rank = len(q.ty.shape)
                perm = [int(a) for a in v.attrs.axes] if v.attrs.axes is not None else list(range(rank))[::-1]
                pq = self.builder_.emit(relax.op.permute_dims(q, v.attrs.axes))
                return pq, s, z, perm.index(axis % rank) if s.size > 1 else axis
            return self._int_source(e, moves=False)

        def _lower(self, call, kind):
            idx = len(self.layers)
            x, w = call.args[0], call.args[1]
            xs, ws = self._int_source(x), self._weight_source(w)

            def keep(reason):
                self.layers.append(LayerArith(idx, kind, "float", reason, kernel="float"))
                return call
            if xs is None:
                return keep("input is not a dequantized integer tensor")
            if ws is None:
                return keep("weight is not a dequantized integer tensor")
            xq, sx, zx, _ = xs
            wq, sw, zw, waxis = ws
            if sx.size != 1 or zx.size != 1:
                return keep("input scale or zero point is per-channel")
            if np.any(zw != 0):
                return keep("weight zero point is not 0")
            wshape = [int(d) for d in wq.ty.shape]
            out_axis = 0 if kind == "conv2d" else len(wshape) - 1
            if sw.size != 1 and (sw.size != wshape[out_axis] or waxis % len(wshape) != out_axis):
                return keep("weight scale is not per output channel")
            if kind == "conv2d" and (call.attrs.data_layout != "NCHW" or call.attrs.kernel_layout != "OIHW"):
                return keep("layout is not NCHW/OIHW")
            zx_v = int(np.asarray(zx).reshape(-1)[0])
            xi = xq
            if zx_v != 0:
                xi = self.builder_.emit(relax.op.subtract(relax.op.astype(xq, "int32"),
                                                          relax.const(zx_v, "int32")))
            bb = self.builder_
            serial = self._bitserial_operand(idx, xq, wq, zx_v, kind)
            if kind == "conv2d":
                a = call.attrs
                if isinstance(serial, str):
                    acc = bb.emit(relax.op.nn.conv2d(xi, wq, strides=a.strides, padding=a.padding,
                                                     dilation=a.dilation, groups=a.groups, data_layout="NCHW",
                                                     kernel_layout="OIHW", out_dtype="int32"))
                else:
                    from bitfold.export.tvm import bitserial as bs
                    a_bits, w_bits = serial.a_bits, serial.w_bits
                    variant = self.bitserial.get(idx, "")
                    word = 32 if variant.startswith("k32") else bs.conv_word(int(serial.weight.shape[1]))
                    acc = bb.emit(bb.call_te(
                        bs.conv_te(a_bits, w_bits, int(serial.weight.shape[0]), word, a.strides, a.padding,
                                   serial.bipolar), xq,
                        relax.const(bs.pack_conv_weights(serial.weight, w_bits, word, serial.bipolar)),
                        primfunc_name_hint=f"bitserial_conv2d_{serial.label.lower()}"
                                           f"{SUFFIX.get(variant[-1:], '')}"))
                scale = (float(sx.reshape(-1)[0]) * sw.astype(np.float64)).astype(np.float32)
                scale = scale.reshape(()) if scale.size == 1 else scale.reshape(1, -1, 1, 1)
            else:
                if isinstance(serial, str):
                    acc = bb.emit(relax.op.matmul(xi, wq, out_dtype="int32"))
                else:
                    from bitfold.export.tvm import bitserial as bs
                    a_bits, w_bits = serial.a_bits, serial.w_bits
                    n_out = int(serial.weight.shape[0])
                    acc = bb.emit(bb.call_te(bs.dense_te(a_bits, w_bits, n_out, serial.bipolar), xq,
                                             relax.const(bs.pack_weights(serial.weight, w_bits, serial.bipolar),
                                                         "uint32"),
                                             primfunc_name_hint=f"bitserial_dense_{serial.label.lower()}"))
                scale = (float(sx.reshape(-1)[0]) * sw.astype(np.float64)).astype(np.float32)
                scale = scale.reshape(()) if scale.size == 1 else scale.reshape(-1)
            op = self._operand(idx)
            why = op.why_not() if op is not None else "no ONNX operand information"
            if not isinstance(serial, str):
                kernel = f"bitserial {serial.label}"
            else:
                kernel = "int8" if zx_v == 0 else "int32"
            self.layers.append(LayerArith(idx, kind, "int",
                                          f"{xq.ty.dtype if zx_v == 0 else 'int32'} x "
                                          f"{wq.ty.dtype} -> int32", kernel=kernel,
                                          bitserial=why or op.label))
            return relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(scale, "float32"))

        def _operand(self, idx):
            return self.operands[idx] if self.operands and idx < len(self.operands) else None

        def _bitserial_operand(self, idx, xq, wq, zx_v, kind):
            """The layer's Operand when it is asked to run bit-serial and can, else the reason why not."""
            if idx not in self.bitserial:
                return "not asked"
            op = self._operand(idx)
            if op is None:
                return "no ONNX operand information"
            why = op.why_not()
            if why:
                return why
            if zx_v != 0:
                return "input zero point is not 0"
            xs, ws = [int(d) for d in xq.ty.shape], [int(d) for d in wq.ty.shape]
            if kind == "conv2d":
                if len(xs) != 4 or xs[0] != 1 or ws != list(op.weight.shape) or xs[1] != ws[1]:
                    return "operand shapes do not match the ONNX weight"
                return op
            if len(xs) != 2 or xs[0] != 1 or ws != [op.weight.shape[1], op.weight.shape[0]] or xs[1] != ws[0]:
                return "operand shapes do not match the ONNX weight"
            return op

        def visit_call_(self, call):  # noqa: N802 - TVM's visitor name
            call = self.visit_expr_post_order(call)
            if call.op == ops["nn.conv2d"]:
                return self._lower(call, "conv2d")
            if call.op == ops["matmul"]:
                return self._lower(call, "matmul")
            return call

    return IntLowering


#: a bit-serial convolution variant's last letter -> its kernel name's suffix, which selects the
#: loop nest in :func:`bitfold.export.tvm.schedules.apply_default`
SUFFIX = {"n": "_nat", "x": "_xin"}


def lower_to_integer(mod, onnx_layers: list[str] | None = None, operands=None, bitserial=()):
    """Rewrite ``mod['main']``'s quantized conv2d/matmul to integer kernels: ``(new_mod, [LayerArith])``.

    ``operands``: :func:`bitfold.export.tvm.bitserial.operands` of the ONNX model (graph order);
    ``bitserial``: indices of the layers to run bit-serial where they qualify (the others run int8), or
    ``{index: variant}`` with a convolution variant ("", "x", "k32", "k32n": see the pass)."""
    from tvm import relax
    lowering = _make_pass()(mod, operands, bitserial)
    gv = mod.get_global_var("main")
    new_main = lowering.visit_expr(mod[gv])
    out = mod.__class__(dict(mod.functions_items()), attrs=mod.attrs)
    have = {g.name_hint for g in out.get_global_vars()}
    for g, f in lowering.builder_.get().functions_items():   # kernels the pass added (bit-serial)
        if g.name_hint not in have:
            out[g] = f
    out[gv] = new_main
    out = relax.transform.DeadCodeElimination(["main"])(out)
    layers = lowering.layers
    if onnx_layers and len(onnx_layers) == len(layers):
        for la, name in zip(layers, onnx_layers):
            la.layer = name
    return out, layers


def onnx_compute_layers(model) -> list[str]:
    """Names of the ONNX graph's Conv/Gemm/MatMul nodes in graph order (the order Relax imports them)."""
    return [n.name or f"{n.op_type}_{i}" for i, n in enumerate(model.graph.node)
            if n.op_type in ("Conv", "Gemm", "MatMul")]
