"""Fast QAT: the fixed-width Brevitas quantizers of a layer computed as one fused step, bit-identical.

A Brevitas weight or activation quantizer is a tree of ~30 small modules (statistics, restrictions,
clamps, integer range, rounding, zero point); a training step of a small network spends most of its
time dispatching their ~45 tensor operations per quantizer and recording them for autograd, not in
arithmetic. :func:`fast_quant` runs, for the duration of a ``with`` block, the training-mode forward
of every layer whose quantizers are of the kinds below as one autograd node per quantizer
(:class:`_QuantFromAbsMax` for a weight scaled by its own statistic, :class:`_QuantFromValue` for a
learned scale, the ReLU before an activation quantizer included): the scale,
``clamp(round(x / s)) * s`` and Brevitas's straight-through gradients, each expression in Brevitas's
floating-point order, so that outputs, gradients and therefore every trained weight, checkpoint and exported file are bit-identical to the Brevitas
path (tests compare them with ``torch.equal``). Layers and quantizers stay Brevitas modules holding
their own state; nothing is fused outside training mode (evaluation, export and calibration run
Brevitas itself), and any quantizer of another kind keeps the Brevitas path, named in the report.

Fused kinds: weights - integer, zero zero-point, constant bit-width, scale from the max-abs
statistic of the weight (per tensor or per output channel, float scale); activations - ReLU or
identity followed by an integer quantizer with a learned float scale whose statistics collection is
over. These are the ``fixed`` method's quantizers (and those of layers other methods leave fixed).
A layer with no quantizer of its own (weight quantization off - ADQ's and ASQ's codebook weights are
parametrizations - and no input, output or bias quantizer) runs ``F.linear`` / ``F.conv*`` of its weight
directly (:data:`DIRECT`): what Brevitas's forward computes for it, without its per-call work.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as _parametrize
from torch.nn.modules import module as _module

from bitfold.toolchain import qkernels


#: ``threshold_backward(g, t, 0)``: ``g`` where ``t > 0``, else 0 - autograd's own ReLU backward, used
#: for every mask here: on CPU it runs at the speed of a float multiply, a comparison producing a bool
#: tensor and a masked fill about 5x slower (measured, 50k elements, 1 thread)
_keep_where_positive = torch.ops.aten.threshold_backward


def keep_in_range(g: torch.Tensor, q: torch.Tensor, lo: float, hi: float, above_lo: bool = False) -> torch.Tensor:
    """``where(lo <= q <= hi, g, 0)`` for an integer-valued ``q`` and integer bounds - a clamp's
    backward - read as ``hi + 1/2 - q > 0`` and ``q - (lo - 1/2) > 0`` (exact in float for integers
    below 2^22); ``above_lo``: q >= lo is known (after a ReLU, lo <= 0), only the upper test."""
    g = _keep_where_positive(g, (hi + 0.5) - q, 0)
    return g if above_lo else _keep_where_positive(g, q - (lo - 0.5), 0)


def _scale_grad(g, c, grad_c, y, s):
    """The gradient of ``s`` in ``clamp(round(x / s)) * s``: its two uses (``c * s``: ``g * c``;
    ``x / s``: ``-grad_c * ((x / s) / s)``), each reduced to ``s``'s shape as autograd reduces a
    broadcast operand (``sum(-a * b) == -sum(a * b)`` exactly)."""
    return (g * c).sum_to_size(s.shape) - (grad_c * (y / s)).sum_to_size(s.shape)


def _quant_fwd(ctx, x, s, lo, hi, ste_clamp, relu_before, *keep):
    """``clamp(round(x / s), lo, hi) * s``; saves what :func:`_quant_bwd` needs, and ``keep``."""
    y = x / s
    q = torch.round(y)
    c = torch.clamp(q, lo, hi)
    ctx.bounds = None if ste_clamp else (lo, hi, relu_before and lo <= 0)
    ctx.save_for_backward(y, s, c, None if ste_clamp else q, *keep)
    return c * s


def _kernel_fwd(ctx, x, s, lo, hi, ste_clamp, relu, *keep):
    """:func:`_quant_fwd` (with the ReLU before it, ``relu``) as one compiled pass
    (:mod:`bitfold.toolchain.qkernels`) when the tensors allow it, else None; saves ``x`` (the
    backward recomputes ``x / s`` and the rounding, in the same operations), ``s`` and ``keep``."""
    lay = qkernels.layout(x, s)
    if lay is None:
        ctx.kernel = None
        return None
    mask = 0 if ste_clamp else (1 if relu and lo <= 0 else 2)   # after a ReLU nothing is below lo <= 0
    ctx.kernel = (lay, lo, hi, relu, mask)
    ctx.save_for_backward(x, s, *keep)
    return qkernels.forward(x, s, lay, lo, hi, relu)


def _kernel_bwd(ctx, g, need_x: bool, need_s: bool):
    """(grad_x, grad_s, kept tensors) of :func:`_kernel_fwd` - the ReLU's backward included - with
    the scale's gradient reduced as :func:`_scale_grad` reduces it."""
    x, s, *keep = ctx.saved_tensors
    lay, lo, hi, relu, mask = ctx.kernel
    if not qkernels.grad_fits(g, x):
        # a gradient in another memory layout (a convolution's backward may hand one in channels-last
        # order): the products ``g * c`` then take g's layout, and their sums add in that order - the
        # tensor operations, on the forward's values recomputed (same operations, same results)
        r = torch.relu(x) if relu else x
        y = r / s
        q = torch.round(y)
        grad_x, grad_s = _grads(g, y, s, torch.clamp(q, lo, hi), q, (lo, hi, mask == 1) if mask else None,
                                need_x, need_s)
        if grad_x is not None and relu:
            grad_x = _keep_where_positive(grad_x, r, 0)
        return grad_x, grad_s, keep
    grad_x, prods = qkernels.backward(x, g, s, lay, lo, hi, relu, mask, need_x, need_s)
    grad_s = prods[0].sum_to_size(s.shape) - prods[1].sum_to_size(s.shape) if prods is not None else None
    return grad_x, grad_s, keep


def _quant_bwd(ctx, g, need_x: bool, need_s: bool):
    """Gradients of :func:`_quant_fwd` towards x and s, as autograd evaluates the Brevitas graph: round
    is straight-through; the clamp is straight-through for weights (``TensorClampSte``) and cuts the
    gradient outside the range for activations (``TensorClamp``, :func:`keep_in_range`); ``s`` gets
    both of its uses' gradients (:func:`_scale_grad`). ``(g * s) / s`` is not ``g`` in floating
    point: every expression is autograd's, rewritten only where that is exact."""
    y, s, c, q = ctx.saved_tensors[:4]
    return _grads(g, y, s, c, q, ctx.bounds, need_x, need_s)


def _grads(g, y, s, c, q, bounds, need_x: bool, need_s: bool):
    """:func:`_quant_bwd` on given values: ``bounds`` (lo, hi, above_lo) of a cutting clamp, or None."""
    grad_c = g * s
    if bounds is not None:
        grad_c = keep_in_range(grad_c, q, *bounds)
    grad_x = grad_c / s if need_x else None
    grad_s = _scale_grad(g, c, grad_c, y, s) if need_s else None
    return grad_x, grad_s


class _QuantFromValue(torch.autograd.Function):
    """An integer quantizer whose scale is a learned parameter: ``s = max(|value|, min_val) / thr``
    (the clamp straight-through: Brevitas's ``ScalarSignedClampMinSte``), optionally after a ReLU
    on ``x`` - the activation quantizers, and learned-scale (LSQ-style) weights. One autograd node
    for what Brevitas records as five to six; the backward is theirs, composed."""

    @staticmethod
    def forward(ctx, x, value, relu: bool, min_val, thr, lo: float, hi: float, ste_clamp: bool):
        s = torch.abs(value)
        if min_val is not None:
            s = torch.clamp_min(s, min_val)
        s = s / thr
        ctx.thr, ctx.relu = thr, relu
        out = _kernel_fwd(ctx, x, s, lo, hi, ste_clamp, relu, value)
        if out is not None:
            return out
        if relu:
            x = torch.relu(x)
        return _quant_fwd(ctx, x, s, lo, hi, ste_clamp, relu, value, x if relu else None)

    @staticmethod
    def backward(ctx, g):
        if ctx.kernel is not None:
            grad_x, grad_s, (value,) = _kernel_bwd(ctx, g, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        else:
            grad_x, grad_s = _quant_bwd(ctx, g, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
            value, r = ctx.saved_tensors[4:]
            if grad_x is not None and ctx.relu:
                grad_x = _keep_where_positive(grad_x, r, 0)   # ReLU's backward, as autograd runs it
        grad_v = (grad_s / ctx.thr) * value.sgn() if grad_s is not None else None   # div, clamp STE, abs
        return grad_x, grad_v, None, None, None, None, None, None


class _QuantTensorRange(torch.autograd.Function):
    """``clamp(round(r / s), lo, hi) * s`` (``r = relu(x)`` or ``x``) whose scale and integer bounds are
    tensors computed by Brevitas's own modules under autograd - a learned bit-width's (AdaQAT's) range
    moves with the width. Only the tensor-sized part is fused; the gradients towards ``lo`` and ``hi``
    are those of Brevitas's ``tensor_clamp`` (two ``where`` s, each summed to the bound's shape), none
    for a straight-through clamp (``TensorClampSte``)."""

    @staticmethod
    def forward(ctx, x, s, lo, hi, relu: bool, ste_clamp: bool, unsigned: bool = False):
        ctx.relu, ctx.ste = relu, ste_clamp
        ctx.none_below = relu and unsigned     # q >= 0 == lo: nothing is clamped from below
        lay = qkernels.layout(x, s) if lo.numel() == 1 and hi.numel() == 1 else None
        ctx.kernel = None if lay is None else (lay, float(lo), float(hi))
        if ctx.kernel is not None:   # one compiled pass; the backward recomputes from x
            ctx.save_for_backward(x, s, lo, hi)
            return qkernels.forward(x, s, lay, ctx.kernel[1], ctx.kernel[2], relu)
        r = torch.relu(x) if relu else x
        y = r / s
        q = torch.round(y)
        c = torch.clamp(q, lo, hi)
        ctx.save_for_backward(y, s, c, q, lo, hi, r if relu else None)
        return c * s

    @staticmethod
    def backward(ctx, g):
        if ctx.kernel is not None:
            x, s, lo, hi = ctx.saved_tensors
            lay, lof, hif = ctx.kernel
            need = ctx.needs_input_grad
            if qkernels.grad_fits(g, x):
                grad_x, prods, above, below = qkernels.backward_range(
                    x, g, s, lay, lof, hif, ctx.relu, ctx.ste, need[0], need[1], need[3], need[2] and not ctx.none_below)
                grad_s = prods[0].sum_to_size(s.shape) - prods[1].sum_to_size(s.shape) if prods is not None else None
                grad_lo = grad_hi = None
                if not ctx.ste:
                    if need[2]:
                        grad_lo = torch.zeros_like(lo) if ctx.none_below else below.sum_to_size(lo.shape)
                    if need[3]:
                        grad_hi = above.sum_to_size(hi.shape)
                return grad_x, grad_s, grad_lo, grad_hi, None, None, None
            # a gradient in another layout: the operations below, on the forward's values recomputed
            r = torch.relu(x) if ctx.relu else x
            y = r / s
            q = torch.round(y)
            c = torch.clamp(q, lo, hi)
            r = r if ctx.relu else None
        else:
            y, s, c, q, lo, hi, r = ctx.saved_tensors
        g2 = g * s
        grad_lo = grad_hi = None
        if ctx.ste:
            grad_q = g2
        else:
            # where(q > hi, g2, 0) and where(q < lo, g2, 0): a difference of two floats is > 0 exactly
            # when the first is the larger; g2 minus both is g2 inside the range and 0 outside, exactly
            above = _keep_where_positive(g2, q - hi, 0)
            if ctx.none_below:     # where(q < lo, g2, 0) is all zeros: its sum is exactly 0
                grad_q = g2 - above
                if ctx.needs_input_grad[2]:
                    grad_lo = torch.zeros_like(lo)
            else:
                below = _keep_where_positive(g2, lo - q, 0)
                grad_q = g2 - above - below
                if ctx.needs_input_grad[2]:
                    grad_lo = below.sum_to_size(lo.shape)
            if ctx.needs_input_grad[3]:
                grad_hi = above.sum_to_size(hi.shape)
        grad_x = grad_q / s if ctx.needs_input_grad[0] else None
        if grad_x is not None and ctx.relu:
            grad_x = _keep_where_positive(grad_x, r, 0)
        grad_s = _scale_grad(g, c, grad_q, y, s) if ctx.needs_input_grad[1] else None
        return grad_x, grad_s, grad_lo, grad_hi, None, None, None


class _QuantFromAbsMax(torch.autograd.Function):
    """An integer weight quantizer whose scale is the weight's own statistic:
    ``s = max(max|w|, min_val) / thr``, per tensor or per output channel - one autograd node; the
    statistic's gradient reaches the weight as autograd routes a max: to the arg-max of each channel,
    or (per tensor) spread evenly over the elements equal to the maximum."""

    @staticmethod
    def forward(ctx, w, per_channel: bool, stats_shape, min_val, thr, lo: float, hi: float, ste_clamp: bool):
        if per_channel:
            stats, at_max = torch.max(torch.abs(w.reshape(w.shape[0], -1)), dim=1)   # each channel's arg-max
        else:
            stats = torch.max(torch.abs(w.reshape(-1)))
            at_max = stats   # the maximum: its elements are found in the backward (ties share it)
        s = stats.view(stats_shape)
        if min_val is not None:
            s = torch.clamp_min(s, min_val)
        s = s / thr
        ctx.thr, ctx.per_channel = thr, per_channel
        out = _kernel_fwd(ctx, w, s, lo, hi, ste_clamp, False, at_max)
        if out is not None:
            return out
        return _quant_fwd(ctx, w, s, lo, hi, ste_clamp, False, w, at_max)

    @staticmethod
    def backward(ctx, g):
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        if ctx.kernel is not None:
            grad_x, grad_s, (at_max,) = _kernel_bwd(ctx, g, True, True)
            w = ctx.saved_tensors[0]
        else:
            grad_x, grad_s = _quant_bwd(ctx, g, True, True)
            w, at_max = ctx.saved_tensors[4:]
        grad_stats = grad_s / ctx.thr                 # div; the clamp is straight-through; then the view
        if ctx.kernel is not None and qkernels.add_max_gradient(grad_x, w, at_max, grad_stats, ctx.per_channel):
            return grad_x, None, None, None, None, None, None, None
        # the max's backward is zero but at the arg-max elements; then abs's backward (a product with
        # sgn(w)) and the sum with the direct gradient
        # (grad_x may be in another memory layout than w - a channels-last gradient: reshape, not view)
        if ctx.per_channel:   # to the index torch.max returned, in each channel (autograd's scatter)
            rows = torch.arange(w.shape[0], device=w.device)
            gw, wf = grad_x.reshape(w.shape[0], -1), w.reshape(w.shape[0], -1)
            gw[rows, at_max] += grad_stats.reshape(-1) * wf[rows, at_max].sgn()
            grad_x = gw.reshape(w.shape)
        else:                 # spread evenly over the elements equal to the maximum (autograd's masked fill)
            ties = 1.0 - _keep_where_positive(torch.ones_like(w), at_max - torch.abs(w), 0)   # 1 where |w| == max
            share = grad_stats.reshape(()) / ties.sum()          # the sum counts the ties exactly (< 2^24)
            # x + share * tie * sgn(w): the products of 0, 1 and +-1 are exact in any order
            grad_x = grad_x.addcmul(ties, w.sgn(), value=share)
        return grad_x, None, None, None, None, None, None, None


class _IntQuantSTE(torch.autograd.Function):
    """The weight quantizer's last step on its own (the scale computed outside it, by autograd): what
    :func:`fused_weight` runs while torch.compile traces it - dynamo mis-traces
    :class:`_QuantFromAbsMax` (it fed one layer's weight to another's quantizer in torch 2.13).
    ``clamp(round(x / scale), lo, hi) * scale`` with Brevitas's gradients: round is straight-through;
    the clamp is straight-through for weights (``TensorClampSte``) and cuts the gradient outside the
    range for activations (``TensorClamp``); ``scale`` gets both of its uses' gradients, reduced as
    autograd reduces a broadcast operand. Every expression is the one autograd evaluates for the
    Brevitas graph (``(g * s) / s`` is not ``g`` in floating point); the only rewrites are exact ones:
    ``sum(-a * b) == -sum(a * b)``, and the in-range mask read as ``clamp(q) == q``."""

    @staticmethod
    def forward(ctx, x, scale, lo: float, hi: float, ste_clamp: bool):
        y = x / scale
        q = torch.round(y)
        c = torch.clamp(q, lo, hi)
        keep = None if ste_clamp else c == q
        ctx.save_for_backward(y, scale, c, keep)
        return c * scale

    @staticmethod
    def backward(ctx, g):
        y, scale, c, keep = ctx.saved_tensors
        grad_c = g * scale
        if keep is not None:
            grad_c = torch.where(keep, grad_c, 0.0)
        grad_x = grad_c / scale if ctx.needs_input_grad[0] else None
        grad_s = _scale_grad(g, c, grad_c, y, scale) if ctx.needs_input_grad[1] else None
        return grad_x, grad_s, None, None, None


class _ClampMinSTE(torch.autograd.Function):
    """``max(x, v)`` with the identity gradient (Brevitas's ``ScalarSignedClampMinSte`` on a
    non-negative scale statistic)."""

    @staticmethod
    def forward(ctx, x, v):
        return torch.clamp_min(x, v)

    @staticmethod
    def backward(ctx, g):
        return g, None


def int_quant_ste(x, scale, lo, hi, ste_clamp: bool):
    return _IntQuantSTE.apply(x, scale, lo, hi, ste_clamp)


class _Range:
    """(lo, hi, threshold) of an integer quantizer at its current width: the clamp bounds and the
    integer range the scale divides by (2^(b-1)-1 for narrow signed), as Brevitas computes them;
    computed once per width (a switchable width, MEBQAT's, is read at each call)."""

    def __init__(self, tq, restrict_threshold, switchable: bool):
        self._tq, self._restrict, self._switchable = tq, restrict_threshold, switchable
        self._seen: dict[float, tuple] = {}
        self._fixed = None if switchable else self._compute()

    @torch.no_grad()
    def _compute(self):
        bw = self._tq.msb_clamp_bit_width_impl()
        iq = self._tq.int_quant
        return float(iq.min_int(bw)), float(iq.max_int(bw)), self._restrict(self._tq.int_scaling_impl(bw))

    def __call__(self):
        if self._fixed is not None:
            return self._fixed
        key = float(self._tq.msb_clamp_bit_width_impl.bits)
        if key not in self._seen:
            self._seen[key] = self._compute()
        return self._seen[key]


@dataclass(frozen=True)
class WeightPlan:
    """What the fused weight quantizer needs, read once from the Brevitas quantizer."""
    range: _Range
    per_channel: bool
    stats_shape: tuple
    min_val: float | None
    ste_clamp: bool
    learned_scale: bool = False   # a scale parameter initialised from the weight statistic (LSQ-style)
    scaling: nn.Module | None = None   # the quantizer's scaling module (its learned scale's holder)


@dataclass(frozen=True)
class ActPlan:
    range: _Range
    relu: bool
    min_val: float | None
    ste_clamp: bool
    scaling: nn.Module | None = None   # the quantizer's scaling module: its learned scale and statistics counter


@dataclass(frozen=True)
class LearnedChain:
    """How a learned width's quantizer computes its range and scale, read once from its Brevitas
    modules, for the C++ node that computes them (``bitfold_q.learned_scale``, see qautograd.cpp):
    the integer range's kind, the constant scale of a weight (or the activation's learned value and
    its minimum), and whether the width's gradient may be taken there (at most two non-zero parts)."""
    signed: bool
    narrow: bool
    const_scale: float | None       # a weight's constant scale (after its restrictions); None: learned value
    min_val: float | None
    width_grad: bool


@dataclass(frozen=True)
class LearnedPlan:
    """A quantizer whose bit-width is learned (AdaQAT): its width, integer range and scale from the
    C++ node of :class:`LearnedChain` where the quantizer has that form, else computed by its own
    Brevitas modules at every call, under autograd; the tensor-sized part is fused
    (:class:`_QuantTensorRange`)."""
    tq: nn.Module
    relu: bool
    ste_clamp: bool
    chain: LearnedChain | None = None
    width: nn.Module | None = None    # tq's bit-width module (LearnedBitWidth)
    #: the minimum of the weight's tanh normalisation where that is the layer's one weight
    #: parametrization (AdaQAT's), run with the quantizer as one node (:func:`fused_tanh_learned`)
    tanh: float | None = None
    #: the width's frozen value as last read, with the buffer and its version counter it was read
    #: from (:func:`frozen_value`): a frozen width changes only through an in-place write or a new buffer
    seen: dict = field(default_factory=dict, compare=False, repr=False)


def frozen_value(buf: torch.Tensor, memo: dict) -> float:
    """``float(buf)`` of a 0-dim buffer, read from the tensor again only when it is another tensor or
    its version counter moved (an in-place write: ``fill_``, ``load_state_dict``'s copy): a read is a
    device sync and, inside a training step, ~5-10 us."""
    last = memo.get("buf")
    if last is not buf or memo["version"] != buf._version:
        memo["buf"], memo["version"], memo["value"] = buf, buf._version, float(buf)
    return memo["value"]


@dataclass(frozen=True)
class DirectPlan:
    """A layer without a quantizer of its own (its weight quantization off - ADQ's and ASQ's codebook
    weights are parametrizations - and no input, output or bias quantizer): its training forward is
    ``F.linear`` / ``F.conv*`` of the (parametrized) weight, what Brevitas's forward computes for it,
    without Brevitas's per-call work. ``parametrization``: the weight's one parametrization, called on
    the original weight as torch's parametrization property calls it (:func:`direct_weight`)."""
    parametrization: nn.Module | None = None


DIRECT = DirectPlan()


def _one_parametrization(layer) -> nn.Module | None:
    """The parametrization of the layer's weight where it has exactly one (ADQ's codebook, ASQ's POST levels)
    on a plain tensor, else None."""
    plist = getattr(getattr(layer, "parametrizations", None), "weight", None)
    if plist is None or len(plist) != 1 or not plist.is_tensor:
        return None
    return plist[0]


def direct_weight(layer, plan: DirectPlan) -> torch.Tensor:
    """A direct layer's weight: its one parametrization called on the original weight - what
    ``ParametrizationList.forward`` computes for one parametrization, without the property's and the
    list's per-call work (~6 us a layer) - where the list has no hooks and torch's parametrization
    cache is off; else the weight attribute."""
    plists = getattr(layer, "parametrizations", None) if plan.parametrization is not None else None
    plist = getattr(plists, "weight", None)
    if plist is None or plist._forward_hooks or plist._forward_pre_hooks or _global_hooks() \
            or _parametrize._cache_enabled or len(plist) != 1 or plist[0] is not plan.parametrization:
        return layer.weight   # (also a parametrization added or replaced inside the block)
    return plan.parametrization(plist.original)


def _global_hooks() -> bool:
    """Whether global module hooks are registered (they would see the parametrization list's call)."""
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


@dataclass
class FastQuantReport:
    """Which layers run fused, which run directly (no quantizer of their own), and why the others do
    not (layer -> reason)."""
    fused: list[str] = field(default_factory=list)
    brevitas: dict[str, str] = field(default_factory=dict)
    kernels: str = ""      # qkernels.status(): the compiled passes in use, or why not
    direct: list[str] = field(default_factory=list)

    def summary(self) -> str:
        s = f"fast quantizers: {len(self.fused)} of {len(self.fused) + len(self.brevitas)} quantized layers fused"
        if self.kernels:
            s += f" ({self.kernels})"
        if self.direct:
            s += f"; {len(self.direct)} layers without a weight quantizer run F.linear/conv directly"
        if self.brevitas:
            s += "; Brevitas path for " + ", ".join(f"{k} ({v})" for k, v in sorted(self.brevitas.items()))
        return s


def _min_val(mod) -> float | None:
    from brevitas.core.function_wrapper import Identity
    from brevitas.core.function_wrapper.ops_ste import ScalarSignedClampMinSte
    if isinstance(mod, ScalarSignedClampMinSte):
        return float(mod.min_val)
    if isinstance(mod, Identity):
        return None
    raise _NotFusable(f"scale clamp {type(mod).__name__}")


class _NotFusable(Exception):
    pass


def _is(mod, *names):
    return type(mod).__name__ in names


def _int_quant_parts(tq) -> tuple[bool, bool]:
    """(switchable width, straight-through clamp) of a RescalingIntQuant with a constant or
    switchable width and a zero zero-point; anything else is not fused."""
    if not _is(tq, "RescalingIntQuant") or tq.observer_only:
        raise _NotFusable(f"tensor quantizer {type(tq).__name__}")
    iq = tq.int_quant
    if not _is(iq, "IntQuant") or not _is(iq.float_to_int_impl, "RoundSte") \
            or not _is(iq.input_view_impl, "Identity") or not _is(iq.delay_wrapper.delay_impl, "_NoDelay"):
        raise _NotFusable("integer quantizer with delay, view or rounding other than round-to-nearest")
    from bitfold.toolchain.mebqat import SwitchableBitWidth
    if _is(tq.msb_clamp_bit_width_impl, "BitWidthConst"):
        switchable = False
    elif type(tq.msb_clamp_bit_width_impl) is SwitchableBitWidth:
        switchable = True
    elif _is(tq.msb_clamp_bit_width_impl, "LearnedBitWidth"):
        switchable = None     # learned: the range is computed by Brevitas at every call (LearnedPlan)
    else:
        raise _NotFusable(f"bit-width {type(tq.msb_clamp_bit_width_impl).__name__}")
    if not _is(tq.zero_point_impl, "ZeroZeroPoint"):
        raise _NotFusable("non-zero zero-point")
    if _is(iq.tensor_clamp_impl, "TensorClampSte"):
        return switchable, True
    if _is(iq.tensor_clamp_impl, "TensorClamp"):
        return switchable, False
    raise _NotFusable(f"clamp {type(iq.tensor_clamp_impl).__name__}")


def _float_restrict(mod) -> bool:
    return _is(mod, "FloatRestrictValue")


def _learned_chain(tq, act: bool, ste_clamp: bool) -> LearnedChain | None:
    """The :class:`LearnedChain` of a learned-width quantizer whose modules compute exactly what the
    C++ node does (width straight-through, integer scaling of the quantizer's own sign and range, float
    restrictions: abs of the threshold twice, abs of the value with an optional signed minimum), else None
    (Brevitas's modules run)."""
    bwm, iq, isc, sc = tq.msb_clamp_bit_width_impl, tq.int_quant, tq.int_scaling_impl, tq.scaling_impl
    if not (_is(bwm, "LearnedBitWidth") and _is(isc, "IntScaling") and isc.signed == iq.signed
            and isc.narrow_range == iq.narrow_range and getattr(isc, "dtype", None) in (None, torch.float32)):
        return None
    signed, narrow = bool(iq.signed), bool(iq.narrow_range)
    ident = lambda m: m is None or _is(m, "Identity")   # noqa: E731
    if act:
        if not (_is(sc, "ParameterFromRuntimeStatsScaling") and not sc.local_loss_mode
                and _float_restrict(sc.restrict_scaling.restrict_value_impl)
                and _is(sc.restrict_scaling.restrict_value_impl.apply_abs, "Abs")
                and _float_restrict(sc.restrict_threshold.restrict_value_impl)
                and _is(sc.restrict_threshold.restrict_value_impl.apply_abs, "Abs")
                and ident(sc.restrict_scale_threshold.restrict_value_impl) and _is(sc.restrict_threshold_pre, "Abs")
                and sc.value.dim() == 0):
            return None
        try:
            min_val = _min_val(sc.clamp_scaling.clamp_min_ste)
        except _NotFusable:
            return None
        const = None
    else:
        if not (_is(sc, "ConstScaling") and _is(sc.restrict_threshold_pre, "Abs")
                and _float_restrict(sc.restrict_clamp_threshold.restrict_value_impl)
                and _is(sc.restrict_clamp_threshold.restrict_value_impl.apply_abs, "Abs")
                and ident(sc.restrict_clamp_threshold.clamp_ste)
                and ident(sc.restrict_clamp_scale_threshold.restrict_value_impl)
                and ident(sc.restrict_clamp_scale_threshold.clamp_ste)):
            return None
        with torch.no_grad():
            v = sc.restrict_clamp_scaling(sc.value())
        if v.numel() != 1 or v.dtype != torch.float32:
            return None
        const, min_val = float(v), None
    # the width's gradient: from the threshold, and from the bounds where the clamp passes theirs - a
    # weight's straight-through clamp passes none; an unsigned range's lo is 0 * bw (its part is 0)
    width_grad = (not act and ste_clamp) or (act and not signed)
    return LearnedChain(signed, narrow, const, min_val, width_grad)


def weight_plan(layer) -> WeightPlan | LearnedPlan | DirectPlan:
    wq = layer.weight_quant
    if getattr(wq, "export_mode", False):
        raise _NotFusable("weight quantizer in export mode")
    if not wq.is_quant_enabled:
        one = _one_parametrization(layer)
        return DirectPlan(one) if one is not None else DIRECT
    tq = wq.tensor_quant
    switchable, ste = _int_quant_parts(tq)
    if switchable is None:
        return LearnedPlan(tq, False, ste, _learned_chain(tq, False, ste), tq.msb_clamp_bit_width_impl,
                           _tanh_min(layer))
    sc = tq.scaling_impl
    learned = _is(sc, "ParameterFromStatsFromParameterScaling")
    if not (_is(sc, "StatsFromParameterScaling") or learned and not sc.local_loss_mode):
        raise _NotFusable(f"weight scale {type(sc).__name__}")
    pls, ss = sc.parameter_list_stats, sc.stats_scaling_impl
    if pls.extra_tracked_params_list is not None or not _is(pls.first_tracked_param, "_ViewParameter"):
        raise _NotFusable("scale shared between parameters")
    view = pls.first_tracked_param.view_shape_impl
    stats = pls.stats.stats_impl
    if not _is(stats, "AbsMax"):
        raise _NotFusable(f"weight statistic {type(stats).__name__}")
    if _is(view, "OverTensorView") and stats.stats_reduce_dim is None:
        per_channel = False
    elif _is(view, "OverOutputChannelView") and _is(view.permute_impl, "Identity") \
            and stats.stats_reduce_dim == 1 and not stats.keepdim:
        per_channel = True
    else:
        raise _NotFusable("weight statistic over another view")
    if not (_is(ss.affine_rescaling, "Identity") and _float_restrict(ss.restrict_clamp_scaling.restrict_value_impl)
            and _float_restrict(ss.restrict_clamp_threshold.restrict_value_impl)
            and _is(ss.restrict_clamp_threshold.clamp_ste, "Identity")
            and _is(ss.restrict_clamp_scale_threshold.restrict_value_impl, "Identity")
            and _is(ss.restrict_clamp_scale_threshold.clamp_ste, "Identity")
            and _is(ss.restrict_scaling_pre, "Abs") and _is(ss.restrict_threshold_pre, "Abs")):
        raise _NotFusable("scale restricted other than to a float")
    if learned:  # after initialisation: |value| clamped, over the threshold (the statistic is not used)
        mins = {_min_val(ss.restrict_clamp_scaling.clamp_ste)} - {None}
        pre = lambda t: ss.restrict_clamp_threshold(sc.restrict_threshold_pre(t))  # noqa: E731
    else:
        mins = {_min_val(ss.clamp_scaling.clamp_min_ste), _min_val(ss.restrict_clamp_scaling.clamp_ste)} - {None}
        pre = lambda t: ss.restrict_clamp_threshold(ss.restrict_threshold_pre(t))  # noqa: E731
    if len(mins) > 1:
        raise _NotFusable("two different scale minima")
    return WeightPlan(_Range(tq, pre, switchable), per_channel, tuple(pls.stats.stats_output_shape),
                      next(iter(mins), None), ste, learned, sc)


def _tanh_min(layer) -> float | None:
    """The minimum of the layer's weight normalisation when its weight has exactly one parametrization
    and that is the tanh normalisation (AdaQAT's ``TanhNormalize``), else None."""
    plist = getattr(getattr(layer, "parametrizations", None), "weight", None)
    if plist is None or len(plist) != 1 or not _is(plist[0], "TanhNormalize"):
        return None
    return float(plist[0].min_val)


def act_plan(site) -> ActPlan:
    if getattr(site, "input_quant", None) is not None and site.input_quant.is_quant_enabled:
        raise _NotFusable("input quantizer")
    aq = site.act_quant
    fap = aq.fused_activation_quant_proxy
    if fap is None or not aq.is_quant_enabled:
        raise _NotFusable("activation quantization off")
    if isinstance(fap.activation_impl, nn.ReLU):
        relu = True
    elif _is(fap.activation_impl, "Identity"):
        relu = False
    else:
        raise _NotFusable(f"activation {type(fap.activation_impl).__name__}")
    tq = fap.tensor_quant
    switchable, ste = _int_quant_parts(tq)
    sc = tq.scaling_impl
    if not _is(sc, "ParameterFromRuntimeStatsScaling") or sc.local_loss_mode:
        raise _NotFusable(f"activation scale {type(sc).__name__}")
    if switchable is None:   # a learned width: its range and scale computed at every call
        return LearnedPlan(tq, relu, ste, _learned_chain(tq, True, ste), tq.msb_clamp_bit_width_impl)
    if not (_float_restrict(sc.restrict_scaling.restrict_value_impl)
            and _float_restrict(sc.restrict_threshold.restrict_value_impl)
            and _is(sc.restrict_scale_threshold.restrict_value_impl, "Identity")
            and _is(sc.restrict_threshold_pre, "Abs")):
        raise _NotFusable("scale restricted other than to a float")
    rng = _Range(tq, lambda t: sc.restrict_threshold(sc.restrict_threshold_pre(t)), switchable)
    return ActPlan(rng, relu, _min_val(sc.clamp_scaling.clamp_min_ste), ste, sc)


def fused_weight(w: torch.Tensor, p: WeightPlan, value: torch.Tensor | None = None) -> torch.Tensor:
    """The quantized weight; ``value``: the learned scale parameter of a ``learned_scale`` plan."""
    lo, hi, thr = p.range()
    ops = _native(w, thr)
    if p.learned_scale:
        if ops is not None:
            return ops.quant_value(w, value, False, p.min_val, thr, lo, hi, p.ste_clamp)
        return _QuantFromValue.apply(w, value, False, p.min_val, thr, lo, hi, p.ste_clamp)
    if ops is not None:
        return ops.quant_absmax(w, p.per_channel, p.stats_shape, p.min_val, thr, lo, hi, p.ste_clamp)
    if not torch.compiler.is_compiling():
        return _QuantFromAbsMax.apply(w, p.per_channel, p.stats_shape, p.min_val, thr, lo, hi, p.ste_clamp)
    if p.per_channel:
        stats = torch.max(torch.abs(w.reshape(w.shape[0], -1)), dim=1)[0]
    else:
        stats = torch.max(torch.abs(w.reshape(-1)))
    stats = stats.view(p.stats_shape)
    if p.min_val is not None:
        stats = _ClampMinSTE.apply(stats, p.min_val)
    return int_quant_ste(w, stats / thr, lo, hi, p.ste_clamp)


def fused_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, p: WeightPlan) -> torch.Tensor | None:
    """``F.linear(x, fused_weight(w, p), bias)`` of a 2-d input as one C++ node (``bitfold_q.quant_linear``: the
    quantizer's and the product's operations and autograd's formulas for them, bit for bit), or None where it
    does not run (the caller then runs the two)."""
    lo, hi, thr = p.range()
    ops = _native(w, thr)
    if ops is None:
        return None
    return ops.quant_linear(x, w, bias, p.per_channel, p.stats_shape, p.min_val, thr, lo, hi, p.ste_clamp)


def fused_learned(x: torch.Tensor, p: LearnedPlan) -> torch.Tensor:
    """The quantized tensor of a learned-width quantizer: the scale, the bounds and the quantized tensor
    from one C++ node (``bitfold_q.quant_learned``: ``learned_scale``'s and ``quant_range``'s
    operations, :func:`_learned_args`) where its :class:`LearnedChain` applies, else the width, the
    integer threshold, the scale and the bounds from its Brevitas modules in Brevitas's order
    (``RescalingIntQuant`` then ``IntQuant.to_int``), so that the width's gradient is summed from the
    same parts in the same order; then the fused tensor step."""
    ops = _native(x, x)
    args = _learned_args(p) if ops is not None and p.chain is not None else None
    if args is not None:
        return ops.quant_learned(x, *args, p.relu, p.ste_clamp)
    tq = p.tq
    bw = tq.msb_clamp_bit_width_impl()
    s = tq.scaling_impl(x, tq.int_scaling_impl(bw))
    lo = tq.int_quant.min_int(bw)
    hi = tq.int_quant.max_int(bw)
    ops = _native(x, s) if isinstance(lo, torch.Tensor) and isinstance(hi, torch.Tensor) else None
    if ops is not None:
        return ops.quant_range(x, s, lo, hi, p.relu, p.ste_clamp, not tq.int_quant.signed)
    return _QuantTensorRange.apply(x, s, lo, hi, p.relu, p.ste_clamp, not tq.int_quant.signed)


def fused_tanh_learned(layer, p: LearnedPlan, x: torch.Tensor | None = None) -> torch.Tensor | None:
    """The quantized weight of a layer whose weight is tanh-normalised (``p.tanh``) and has a learned
    width: the normalisation and the quantizer as one C++ node (``bitfold_q.tanh_learned``: the
    ``tanh_normalize`` and ``quant_learned`` nodes' operations, one pass each way), or None where the
    quantizer is not in the node's form (the caller then runs the two). With a 2-d input ``x`` (a Linear):
    ``F.linear(x, that weight, bias)`` as one node (``bitfold_q.tanh_learned_linear``)."""
    w = layer.parametrizations.weight.original
    ops = _native(w, w)
    args = _learned_args(p) if ops is not None and p.chain is not None else None
    if args is None or args[1] is not None or args[5] is not None or not p.ste_clamp:
        return None
    n, _, signed, narrow, const, _, lo, hi, frozen = args
    if x is not None:
        return ops.tanh_learned_linear(x, w, layer.bias, n, p.tanh, signed, narrow, const, lo, hi, frozen)
    return ops.tanh_learned(w, n, p.tanh, signed, narrow, const, lo, hi, frozen)


def _scalar_f32(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.dim() == 0 and t.is_cpu


def _learned_args(p: LearnedPlan):
    """The C++ node's arguments after the tensor (``bitfold_q.learned_scale``'s: the width, the
    activation's learned scale, the chain's constants and the frozen width), or None where its width
    is not in a state the node computes (the finite-difference estimator's widths, a width whose
    gradient would have three parts, tensors of another kind)."""
    bwm, ch = p.width, p.chain
    frozen = frozen_value(bwm.frozen, p.seen)
    n = bwm.n
    if bwm.override is not None or (frozen <= 0 and (bwm.estimator != "ste" or n.requires_grad and not ch.width_grad)):
        return None
    value = p.tq.scaling_impl.value if ch.const_scale is None else None
    if not _scalar_f32(n) or value is not None and not _scalar_f32(value):
        return None
    return n, value, ch.signed, ch.narrow, ch.const_scale or 0.0, ch.min_val, bwm.lo, bwm.hi, frozen if frozen > 0 else 0.0


def fused_act(x: torch.Tensor, value: torch.Tensor, p: ActPlan) -> torch.Tensor:
    lo, hi, thr = p.range()
    ops = _native(x, thr)
    if ops is not None:
        return ops.quant_value(x, value, p.relu, p.min_val, thr, lo, hi, p.ste_clamp)
    return _QuantFromValue.apply(x, value, p.relu, p.min_val, thr, lo, hi, p.ste_clamp)


def _native(x: torch.Tensor, thr) -> object | None:
    """The C++ autograd nodes (``torch.ops.bitfold_q``, :func:`qkernels.ops`: the Functions above,
    same operations, without Python's per-call work) for a CPU float32 tensor, outside torch.compile
    (dynamo does not trace into them); else None and the Python Functions run."""
    return qkernels.ops_for(x) if isinstance(thr, torch.Tensor) else None


#: plans of the layers inside an active :func:`fast_quant` block (a copy of a layer made inside the
#: block is not in it and runs Brevitas)
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, object]" = weakref.WeakKeyDictionary()


def _fast_layer_forward(self, x):
    plan = _ACTIVE.get(self)
    if plan is None or not self.training or type(x) is not torch.Tensor:
        return super(type(self), self).forward(x)
    if isinstance(plan, DirectPlan):
        w = direct_weight(self, plan)
    elif isinstance(plan, LearnedPlan):
        x2 = x if plan.tanh is not None and _linear_input(self, x) else None
        w = fused_tanh_learned(self, plan, x2) if plan.tanh is not None else None
        if w is not None and x2 is not None:
            return w   # the layer's output: the weight and the product in one node
        if w is None:
            w = fused_learned(self.weight, plan)
    else:
        sc = plan.scaling
        if plan.learned_scale and not sc.init_done:
            return super(type(self), self).forward(x)
        if not plan.learned_scale and _linear_input(self, x):
            y = fused_linear(x, self.weight, self.bias, plan)
            if y is not None:
                return y
        w = fused_weight(self.weight, plan, sc.value if plan.learned_scale else None)
    if isinstance(self, _LINEAR):
        return F.linear(x, w, self.bias)
    conv = F.conv2d if isinstance(self, _CONV2D) else F.conv1d
    return conv(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _linear_input(layer, x: torch.Tensor) -> bool:
    """A Linear layer's 2-d CPU float32 input: its weight node and product may run as one node."""
    return isinstance(layer, _LINEAR) and x.dim() == 2 and x.dtype == torch.float32 and x.is_cpu


def _fast_act_forward(self, x):
    plan = _ACTIVE.get(self)
    if plan is None or not self.training or type(x) is not torch.Tensor:
        return super(type(self), self).forward(x)
    sc = plan.tq.scaling_impl if isinstance(plan, LearnedPlan) else plan.scaling
    if sc.counter <= sc.collect_stats_steps:   # statistics still being collected (or the step that turns them into the scale)
        return super(type(self), self).forward(x)
    if isinstance(plan, LearnedPlan):
        return fused_learned(x, plan)
    return fused_act(x, sc.value, plan)


#: fast subclasses of torch's parametrized layer classes (a layer whose weight is parametrized, e.g.
#: AdaQAT's normalisation, has a class of its own made by torch.nn.utils.parametrize)
_PARAMETRIZED_FAST: "weakref.WeakKeyDictionary[type, type]" = weakref.WeakKeyDictionary()


def _fast_parametrized(cls: type, classes: dict) -> type | None:
    base = cls.__bases__[0] if len(cls.__bases__) == 1 else None
    if base not in classes or cls.__name__ != f"Parametrized{base.__name__}":
        return None
    if cls not in _PARAMETRIZED_FAST:
        fwd = _fast_layer_forward if base in (_LINEAR, _CONV2D, _CONV1D) else _fast_act_forward
        _PARAMETRIZED_FAST[cls] = type(f"Fast{cls.__name__}", (cls,), {"forward": fwd, "__module__": __name__})
    return _PARAMETRIZED_FAST[cls]


def _fast_classes():
    import brevitas.nn as qnn
    global FastQuantLinear, FastQuantConv2d, FastQuantConv1d, FastQuantReLU, FastQuantIdentity
    global _LINEAR, _CONV2D, _CONV1D
    _LINEAR, _CONV2D, _CONV1D = qnn.QuantLinear, qnn.QuantConv2d, qnn.QuantConv1d
    if "FastQuantLinear" not in globals():
        FastQuantLinear = type("FastQuantLinear", (qnn.QuantLinear,), {"forward": _fast_layer_forward, "__module__": __name__})
        FastQuantConv2d = type("FastQuantConv2d", (qnn.QuantConv2d,), {"forward": _fast_layer_forward, "__module__": __name__})
        FastQuantConv1d = type("FastQuantConv1d", (qnn.QuantConv1d,), {"forward": _fast_layer_forward, "__module__": __name__})
        FastQuantReLU = type("FastQuantReLU", (qnn.QuantReLU,), {"forward": _fast_act_forward, "__module__": __name__})
        FastQuantIdentity = type("FastQuantIdentity", (qnn.QuantIdentity,), {"forward": _fast_act_forward, "__module__": __name__})
    return {qnn.QuantLinear: FastQuantLinear, qnn.QuantConv2d: FastQuantConv2d, qnn.QuantConv1d: FastQuantConv1d,
            qnn.QuantReLU: FastQuantReLU, qnn.QuantIdentity: FastQuantIdentity}


def _layer_reason(layer) -> str | None:
    if layer.input_quant.is_quant_enabled or layer.output_quant.is_quant_enabled:
        return "input or output quantizer"
    if layer.bias is not None and layer.bias_quant.is_quant_enabled:
        return "quantized bias"
    if getattr(layer, "padding_mode", "zeros") != "zeros":
        return f"padding mode {layer.padding_mode}"
    return None


@contextmanager
def fast_quant(model: nn.Module, enabled: bool = True, learned: bool = True):
    """Within the block, eligible Brevitas layers of ``model`` run their training-mode forward fused
    (see the module docstring); yields a :class:`FastQuantReport`. On exit every layer is as it was.
    ``learned=False`` leaves learned-width quantizers (and parametrized layers) on Brevitas's path -
    for steps under torch.compile, where dynamo traced the swapped classes of AdaQAT's layers into
    wrong outputs (another layer's weight, torch 2.13); the fixed-width fusion compiles."""
    classes = _fast_classes() if enabled else {}
    report = FastQuantReport()
    swapped: list[tuple[nn.Module, type]] = []
    try:
        for name, m in model.named_modules():
            fast = classes.get(type(m))
            if fast is None and isinstance(m, tuple(classes)):   # a weight parametrization (ADQ, AdaQAT, ASQ)
                fast = _fast_parametrized(type(m), classes) if learned else None
                if fast is None:
                    report.brevitas[name] = f"{type(m).__name__}, a subclass of {type(m).__mro__[1].__name__}"
            if fast is None:
                continue
            try:
                if m.return_quant_tensor:
                    raise _NotFusable("returns a QuantTensor")
                if hasattr(m, "weight_quant"):
                    reason = _layer_reason(m)
                    if reason:
                        raise _NotFusable(reason)
                    plan = weight_plan(m)
                else:
                    plan = act_plan(m)
                if isinstance(plan, LearnedPlan) and not learned:
                    raise _NotFusable("learned bit-width (left to Brevitas under torch.compile)")
            except _NotFusable as e:
                report.brevitas[name] = str(e)
                continue
            _ACTIVE[m] = plan
            swapped.append((m, type(m)))
            m.__class__ = fast
            (report.direct if isinstance(plan, DirectPlan) else report.fused).append(name)
        if report.fused:
            report.kernels = qkernels.status()
        yield report
    finally:
        for m, cls in swapped:
            m.__class__ = cls
            _ACTIVE.pop(m, None)
