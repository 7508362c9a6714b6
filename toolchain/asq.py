"""ASQ: adaptive activation step + POST (power-of-sqrt(2)) weights (after arXiv 2504.17263).

Choices made here (and tested):

* Activation sites are :class:`ASQAct` modules: ``s_a = s * beta(x)``,
  ``x_int = clamp(round(x / s_a), n, p)``, output ``x_int * s`` , with ``round``
  straight-through so s, beta and the adapter learn. ``beta = 2 * sigmoid(adapter(stats))`` where
  ``stats`` = per-sample (mean |x|, std x) of the incoming activation and the adapter is
  Linear(2, 8) - ReLU - Linear(8, 1), last layer zero-initialised (beta = 1 at the start).
  ``adapter=False`` fixes beta = 1 (ablation). ``s`` starts at max|x| / p of the first *training* batch.
  ReLU sites are unsigned (n = 0, p = 2^b - 1), others signed narrow (+-(2^(b-1) - 1)).
* Weights, POST: levels ``alpha * {0, +-sqrt(2)^-k, k = 0..2^(b-1) - 2}`` - b bits including sign
  and zero; ``alpha`` learned (init max|w|); nearest level, straight-through to the latent weight,
  ``alpha`` gets its gradient through the level values.
* Deployment: the POST levels are a codebook, exported like ADQ's (snapped to an 8-bit grid; the
  index + LUT form via ``--format qcdq-index``). Activations: ``folded`` replaces beta(x) by its
  mean over calibration data, per site - a plain Brevitas quantizer with scale s * beta followed by
  a constant multiply by 1 / beta, so the graph is ordinary QONNX/QCDQ; ``dynamic`` exports the
  adapter as ONNX ops (ReduceMean, Gemm, Sigmoid, Div, Round, Clip) that onnxruntime runs.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize

from bitfold.toolchain.adq import ADQMethod, assign
from bitfold.toolchain import qkernels
from bitfold.toolchain.fastquant import frozen_value, keep_in_range
from bitfold.core.errors import BitfoldError
from bitfold.toolchain.quant import act_sites, register_method


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g

    @staticmethod
    def symbolic(g, x):  # ONNX: a plain Round in the dynamic export
        return g.op("Round", x)


class _ASQQuantStep(torch.autograd.Function):
    """``clamp(round(x / (s * beta)), n, p) * s`` in one autograd node, its backward the one autograd
    computes for that expression (round straight-through; the clamp cuts the gradient outside
    [n, p]; ``s`` gets both of its uses' gradients), in the same floating-point order - only the
    clamp's mask is :func:`~bitfold.toolchain.fastquant.keep_in_range` (exact for integer q; on a
    CPU about 5x faster than the boolean mask).
    Training only: the export traces the plain expression (its Round has an ONNX symbolic)."""

    @staticmethod
    def forward(ctx, x, s, beta, n: float, p: float):
        d = s * beta
        ctx.n, ctx.p = n, p
        # one compiled pass (bitfold.toolchain.qkernels: divide by d, one per sample, multiply by s)
        # where the tensors allow it; the backward then recomputes y, q and c from x
        ctx.lay = qkernels.layout(x, d) if s.numel() == 1 else None
        if ctx.lay is not None:
            ctx.save_for_backward(x, d, s, beta)
            return qkernels.forward(x, d, ctx.lay, n, p, False, sm=s)
        y = x / d
        q = torch.round(y)
        c = torch.clamp(q, n, p)
        ctx.save_for_backward(y, d, q, c, s, beta)
        return c * s

    @staticmethod
    def backward(ctx, g):
        if ctx.lay is not None:
            x, d, s, beta = ctx.saved_tensors
            if qkernels.grad_fits(g, x):
                grad_x, (p1, p2) = qkernels.backward(x, g, d, ctx.lay, ctx.n, ctx.p, False, 2,
                                                     ctx.needs_input_grad[0], True, sm=s)
                grad_d = -p2.sum_to_size(d.shape)
                grad_s = grad_beta = None
                if ctx.needs_input_grad[1]:
                    grad_s = p1.sum_to_size(s.shape) + (grad_d * beta).sum_to_size(s.shape)
                if ctx.needs_input_grad[2]:
                    grad_beta = (grad_d * s).sum_to_size(beta.shape)
                return grad_x, grad_s, grad_beta, None, None
            y = x / d            # a gradient in another layout: the operations, on recomputed values
            q = torch.round(y)
            c = torch.clamp(q, ctx.n, ctx.p)
        else:
            y, d, q, c, s, beta = ctx.saved_tensors
        grad_q = keep_in_range(g * s, q, ctx.n, ctx.p)
        grad_x = grad_q / d if ctx.needs_input_grad[0] else None
        grad_d = -(grad_q * (y / d)).sum_to_size(d.shape)
        grad_s = grad_beta = None
        if ctx.needs_input_grad[1]:
            grad_s = (g * c).sum_to_size(s.shape) + (grad_d * beta).sum_to_size(s.shape)
        if ctx.needs_input_grad[2]:
            grad_beta = (grad_d * s).sum_to_size(beta.shape)
        return grad_x, grad_s, grad_beta, None, None


def row_std(flat: torch.Tensor) -> torch.Tensor:
    """Each row's sample standard deviation (n - 1), as two passes: the mean, then the mean squared
    deviation - on a CPU 8-15x faster than torch.std's forward on a convolution's activations (1
    thread, 64 x 6-12 k elements: 0.3 vs 4.5 ms), equal to it within float rounding (~1e-7 relative).
    Under autograd its gradient is one expression (:class:`_RowStd`) rather than five recorded steps."""
    if flat.requires_grad and torch.is_grad_enabled() and not torch.jit.is_tracing() \
            and not torch.compiler.is_compiling():
        return _RowStd.apply(flat)
    return _two_pass_std(flat)[1]


def _two_pass_std(flat):
    """(deviations from each row's mean, each row's std)."""
    d = flat - flat.mean(1, keepdim=True)
    return d, ((d * d).sum(1) / (flat.shape[1] - 1)).sqrt()


class _RowStd(torch.autograd.Function):
    """:func:`_two_pass_std` with its gradient ``(x - mean) * g / ((n - 1) * std)`` (0 for a row of
    zero spread, as torch's std backward)."""

    @staticmethod
    def forward(ctx, flat):
        d, s = _two_pass_std(flat)
        ctx.save_for_backward(d, s)
        return s

    @staticmethod
    def backward(ctx, g):
        d, s = ctx.saved_tensors
        coef = (g / (s * (d.shape[1] - 1))).masked_fill(s == 0, 0.0)
        return d * coef.unsqueeze(1)


class ASQAct(nn.Module):
    def __init__(self, bits: int, signed: bool, adapter: bool = True):
        super().__init__()
        self.bits, self.signed, self.use_adapter = int(bits), bool(signed), bool(adapter)
        self.p = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
        self.n = -self.p if signed else 0
        self.log_s = nn.Parameter(torch.tensor(0.0))
        self.register_buffer("initialized", torch.tensor(False))
        self._init_seen: dict = {}   # frozen_value's memo of ``initialized`` (a read is ~5 us in a step)
        self.adapter = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
        nn.init.zeros_(self.adapter[2].weight)
        nn.init.zeros_(self.adapter[2].bias)

    def beta(self, x):
        if not self.use_adapter:
            return torch.ones((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
        flat = x.flatten(1)
        ops = None if torch.jit.is_tracing() else qkernels.ops_for(flat)
        # (mean |x|, std) per sample: one C++ node (bitfold_q.row_stats: two passes, sums in double) where
        # it runs, else the tensor operations (equal within float rounding; the export traces these)
        stats = ops.row_stats(flat) if ops is not None else torch.stack([flat.abs().mean(1), row_std(flat)], 1)
        if ops is not None and self._plain_adapter():
            # the adapter's operations themselves (Linear, ReLU, Linear, 2 * sigmoid) as one C++ node
            # (bitfold_q.asq_adapter: the same ATen calls, and autograd's formulas for their gradients),
            # without three module calls and a dozen autograd nodes
            a0, a2 = self.adapter[0], self.adapter[2]
            beta = ops.asq_adapter(stats, a0.weight, a0.bias, a2.weight, a2.bias)
        else:
            beta = 2 * torch.sigmoid(self.adapter(stats))
        return beta.reshape((x.shape[0],) + (1,) * (x.dim() - 1))

    def _plain_adapter(self) -> bool:
        """The adapter as built (a plain Sequential without hooks): its operations may run in C++ nodes."""
        return type(self.adapter) is nn.Sequential and not self.adapter._forward_hooks

    def _site_ops(self, x):
        """The C++ operators where the whole training step runs as one node: the adapter on and plain, x a
        CPU float tensor of samples."""
        if not self.use_adapter or x.dim() < 2 or not self._plain_adapter() or torch.jit.is_tracing():
            return None
        return qkernels.ops_for(x)

    @property
    def quant_step(self) -> torch.Tensor:
        """The dequantized output's step (x_hat = x_int * s): one rounding-boundary flip moves an
        output element by this much."""
        return self.log_s.exp()

    def forward(self, x):
        if not frozen_value(self.initialized, self._init_seen):
            first = math.log(float(x.detach().abs().max().clamp_min(1e-6)) / self.p)
            if not self.training:  # e.g. a shape probe on zeros: do not fix the step from it
                s = torch.tensor(math.exp(first))
                return torch.clamp(_RoundSTE.apply(x / (s * self.beta(x))), self.n, self.p) * s
            with torch.no_grad():
                self.log_s.fill_(first)
                self.initialized.fill_(True)
        if self.training and torch.is_grad_enabled():
            ops = self._site_ops(x)
            if ops is not None:   # statistics, adapter and step as one C++ node (bitfold_q.asq_site), bit for bit
                a0, a2 = self.adapter[0], self.adapter[2]
                return ops.asq_site(x, self.log_s, a0.weight, a0.bias, a2.weight, a2.bias, float(self.n), float(self.p))
            s = self.log_s.exp()
            beta = self.beta(x)
            ops = qkernels.ops_for(x)   # the same node in C++ (bitfold_q.asq_step), else the Python one
            if ops is not None:
                return ops.asq_step(x, s, beta, float(self.n), float(self.p))
            return _ASQQuantStep.apply(x, s, beta, float(self.n), float(self.p))
        s = self.log_s.exp()
        x_int = torch.clamp(_RoundSTE.apply(x / (s * self.beta(x))), self.n, self.p)
        return x_int * s


class POSTWeight(nn.Module):
    """Parametrization: weight -> nearest signed power-of-sqrt(2) level times a learned alpha
    (``base`` 2: powers of two; ``base`` None: the uniform grid {0, +-1/k, ..., +-1} with the same
    number of levels - the ablation that keeps ASQ's learned alpha but not its level spacing)."""

    def __init__(self, bits: int, base: float | None = math.sqrt(2)):
        super().__init__()
        if bits < 2:
            raise BitfoldError("POST weights need >= 2 bits (sign + zero + one level)")
        self.bits = int(bits)
        k = 2 ** (bits - 1) - 1
        mags = torch.tensor([base ** -i for i in range(k)]) if base else torch.arange(k, 0, -1) / k
        self.register_buffer("unit_levels", torch.cat([-mags, torch.zeros(1), mags.flip(0)]).sort().values)
        self.alpha = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))
        self._init_seen: dict = {}   # frozen_value's memo of ``initialized``

    @property
    def codebook(self) -> torch.Tensor:
        return (self.alpha * self.unit_levels).detach()

    def forward(self, w):
        if not frozen_value(self.initialized, self._init_seen):
            with torch.no_grad():
                self.alpha.fill_(float(w.detach().abs().max().clamp_min(1e-8)))
                self.initialized.fill_(True)
        ops = None if torch.jit.is_tracing() else qkernels.ops_for(w)
        if ops is not None:   # the same in one C++ node (bitfold_q.post_snap: the levels too), bit for bit
            return ops.post_snap(w, self.alpha, self.unit_levels)
        levels = self.alpha * self.unit_levels
        q = levels[assign(w, levels.detach())]
        return q + (w - w.detach())


class FoldedScale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = float(factor)

    def forward(self, x):
        return x * self.factor


#: weight level sets: POST (powers of sqrt 2, the method's), POT (powers of 2) and uniform (the ablations)
LEVEL_BASES = {"post": math.sqrt(2), "pot": 2.0, "uniform": None}


@register_method("asq")
class ASQMethod(ADQMethod):
    weight_bits_range = (2, 8)

    def __init__(self, per_channel: bool = False, adapter: bool = True, grid_bits: int = 8, deploy: str = "folded",
                 levels: str = "post"):
        super().__init__(per_channel=per_channel, grid_bits=grid_bits)
        if deploy not in ("folded", "dynamic"):
            raise BitfoldError(f"ASQ deploy mode {deploy!r}", "choose folded or dynamic")
        if levels not in LEVEL_BASES:
            raise BitfoldError(f"ASQ weight levels {levels!r}", f"choose one of: {', '.join(LEVEL_BASES)}")
        self.adapter, self.deploy_mode, self.levels = bool(adapter), deploy, levels
        self.beta_consts: dict = {}

    def options(self):
        return {"adapter": self.adapter, "grid_bits": self.grid_bits, "levels": self.levels}

    def act_module(self, site, bits, relu):
        return ASQAct(bits, signed=not relu, adapter=self.adapter)  # unsigned clamp at 0 is the ReLU

    def prepare_layer(self, name, layer, bits):
        parametrize.register_parametrization(layer, "weight", POSTWeight(bits.w, LEVEL_BASES[self.levels]))
        return layer

    def after_step(self, model, step):  # POST levels are fixed: no codebook EMA
        return None

    def prepare_export(self, model, x_calib):
        if self.adapter:
            self.init_beta(model, x_calib)

    def layer_extras(self, model):
        """Per layer: the adapter MACs of the ASQ site feeding it (extra work beside the layer)."""
        return {k: {"adapter_macs": v} for k, v in count_adapter_ops(model).items()}

    # -- folded deployment -------------------------------------------------------------------------
    @torch.no_grad()
    def init_beta(self, model, x, batch_size=128) -> dict:
        """Mean beta per site over ``x`` (the folded constants)."""
        sums, n = {}, 0
        hooks = []
        for key, site in act_sites(model).items():
            act = _asq(site)

            def hook(mod, inp, out, key=key, act=act):
                sums[key] = sums.get(key, 0.0) + float(act.beta(inp[0]).sum())
            hooks.append(act.register_forward_hook(hook))
        model.eval()
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])
            n += len(x[i:i + batch_size])
        for h in hooks:
            h.remove()
        self.beta_consts = {k: v / n for k, v in sums.items()}
        return self.beta_consts

    def for_export(self, model):
        """ADQ's snapped-codebook layers + each ASQ site folded into a Brevitas quantizer and a scale."""
        if not self.beta_consts and self.adapter:
            raise BitfoldError("ASQ export needs the folded beta constants",
                               "export through bitfold export / export_run, which calibrates them")
        import brevitas.nn as qnn
        from brevitas.core.scaling import ScalingImplType
        from brevitas.quant.scaled_int import Int8ActPerTensorFloat, Uint8ActPerTensorFloat

        from bitfold.toolchain.convert import set_module
        m = super().for_export(model)
        for path, mod in list(m.named_modules()):
            if not hasattr(mod, "_bitfold_feeds"):
                continue
            act = _asq(mod)
            beta = self.beta_consts.get(mod._bitfold_feeds, 1.0)
            base = Int8ActPerTensorFloat if act.signed else Uint8ActPerTensorFloat
            quant = type("ASQFolded", (base,), {"scaling_impl_type": ScalingImplType.CONST,
                                               "scaling_init": float(act.log_s.exp()) * beta * act.p})
            cls = qnn.QuantIdentity if act.signed else qnn.QuantReLU
            folded = nn.Sequential(cls(act_quant=quant, bit_width=act.bits, return_quant_tensor=False),
                                   FoldedScale(1.0 / beta))
            folded._bitfold_feeds = mod._bitfold_feeds
            set_module(m, path, folded)
        return m


def _asq(site) -> ASQAct:
    return next(x for x in site.modules() if isinstance(x, ASQAct))


def dynamic_export(model, example_input, path) -> None:
    """Export with the adapters as ONNX ops (float graph that onnxruntime runs)."""
    import copy

    from bitfold.toolchain.quant import bake_parametrizations
    m = bake_parametrizations(copy.deepcopy(model)).eval()
    with torch.no_grad():
        torch.onnx.export(m, example_input, str(path), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=17, dynamo=False)


def count_adapter_ops(model) -> dict:
    """Per layer feeding from an ASQ site: the adapter's MACs per sample (visible to cost reports)."""
    out = {}
    for key, site in act_sites(model).items():
        act = _asq(site)
        macs = sum(l.in_features * l.out_features for l in act.adapter if isinstance(l, nn.Linear)) if act.use_adapter else 0
        for layer in key:
            out[layer] = macs
    return out

