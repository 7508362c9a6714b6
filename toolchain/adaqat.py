"""AdaQAT: learned fractional per-layer bit-widths with a pluggable hardware-cost loss.

After Gernigon et al., "AdaQAT: Adaptive Bit-Width Quantization-Aware Training" (arXiv 2404.16876),
extended per layer and to any :class:`~bitfold.hw_models.cost.CostModel`.

Choices made here (and tested):

* Every compute layer owns a real-valued weight width ``N_w`` and every activation site a
  real-valued ``N_a`` (shared by the layers it feeds), clamped to ``[min_bits, max_bits]`` in the
  forward pass and after every optimizer step. First and last layer stay at their initial widths
  unless ``learn_edges`` (the paper keeps them at 8 bit) - also when ``max_bits`` is below them.
* Discretisation: **nearest** integer, ``round(clamp(N))``.
* Weights, DoReFa-style: the layer's weight is re-parametrised as ``tanh(w) / max|tanh(w)|``
  (a torch parametrization) and quantized on the symmetric narrow-range grid of ``2^k - 1`` levels
  with constant scale ``1 / (2^(k-1) - 1)`` - the exportable integer variant of DoReFa's grid
  (DoReFa's own 2^k levels have no zero and would need k+1 signed bits).
* Activations, PACT: the learned Brevitas scale is the clipping level alpha; the step is
  ``alpha / (2^k - 1)``, so changing k keeps alpha and refines the grid.
* Bit-width gradient estimators (``estimator``):
  - ``"ste"``: straight-through ``round`` (``N + (round(N) - N).detach()``); the task-loss gradient
    reaches N through Brevitas' scale/clamp expressions.
  - ``"fd"``: finite differences of the task loss between the two neighbouring integer widths
    (our reading of the paper), made affordable per layer by a simultaneous random perturbation:
    each step draws a sign s_i per width, evaluates the batch loss with every width at its upper
    (s_i=+1) or lower (s_i=-1) neighbour and then at the opposite one, and uses
    ``g_i = (L_+ - L_-) * s_i`` (an unbiased estimate for losses additive over layers); two extra
    no-grad forward passes per step.
  ``benchmarks/adaqat_pareto.py --estimators`` compares both on digits; ``ste`` is the default
  (the measurement is recorded at ``DEFAULT_ESTIMATOR``).
* Cost: the cost model sees the *continuous* clamped N (smooth in N, so the penalty always has a
  gradient). ``penalty``: ``lam * C / C_ref`` with C_ref the cost at the initial widths;
  ``budget``: ``lam * max(0, C - B) / B``. A product-form cost (BitOPs, weight bits) over widths
  that each appear once is evaluated as one autograd node (:class:`ProductCost`, float for float
  the cost model's graph); other costs (board tables, energy) run their own graph.
* After ``epochs - finetune_epochs`` epochs the widths are frozen to integers (in budget mode the
  rounding is repaired so that the frozen map fits the budget) and the last epochs fine-tune the
  weights at those widths. The frozen model exports like a fixed-width one.
"""
from __future__ import annotations

import csv
import weakref
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

from bitfold.toolchain import qkernels
from bitfold.toolchain.fastquant import frozen_value
from bitfold.toolchain.bitmap import LayerBits
from bitfold.core.errors import BitfoldError
from bitfold.toolchain.quant import QuantMethod, act_sites, bake_parametrizations, compute_layers, register_method

#: Measured on digits, CNN, 15 epochs, seed 0 (``benchmarks/adaqat_pareto.py --estimators``):
#: at equal BitOPs the finite-difference estimator was about one point more accurate
#: (6.06e6 BitOPs: fd 97.5 % vs ste 96.4 %; 5.18e6: fd 96.4 % vs ste 95.5 % - 3 to 4 test images,
#: one seed, so within noise) and needs ~10x larger lambda for the same cost, but costs two extra
#: forward passes per step, which run in evaluation mode on Brevitas's modules (not fused): 3.9x the
#: fused fixed-width step vs 1.20x for ste (CNN 8x8, 1 thread, ``benchmarks/adaqat_overhead.py``,
#: ``benchmarks/results/adaqat_parts_1206.txt``; 2.1x vs 1.13x when the fixed step was not fused).
#: STE is the default: same trade-off within noise, inside the 1.25x step-time budget on the CNN.
#: Use ``--estimator fd`` when step time does not matter.
DEFAULT_ESTIMATOR = "ste"
ESTIMATORS = ("ste", "fd")


class LearnedBitWidth(nn.Module):
    """A real-valued, trainable bit-width, discretised by nearest rounding.

    Injected into Brevitas quantizers as their ``bit_width_impl``; Brevitas passes ``bit_width``
    (the initial width) and the ``adaqat_*`` settings from the quantizer's injector.
    """

    def __init__(self, bit_width, adaqat_min_bits: float, adaqat_max_bits: float, adaqat_estimator: str):
        super().__init__()
        self.n = nn.Parameter(torch.tensor(float(bit_width)))
        self.lo, self.hi = float(adaqat_min_bits), float(adaqat_max_bits)
        self.estimator = adaqat_estimator
        self.register_buffer("frozen", torch.tensor(0.0))  # > 0: the frozen integer width
        self.override: torch.Tensor | None = None  # set by the finite-difference estimator

    def clamped(self) -> torch.Tensor:
        return self.n.clamp(self.lo, self.hi)

    def forward(self) -> torch.Tensor:
        if self.frozen > 0:
            return self.frozen
        if self.override is not None:
            return self.override
        n = self.clamped()
        if self.estimator == "ste":
            return n + (torch.round(n) - n).detach()
        return torch.round(n).detach()

    def integer(self) -> int:
        return int(self.frozen) if self.frozen > 0 else int(torch.round(self.clamped()))


class TanhNormalize(nn.Module):
    """DoReFa's weight normalisation onto [-1, 1]: tanh(w) / max(max|tanh(w)|, min_val)."""

    min_val = 1e-8

    def forward(self, w):
        ops = None if torch.jit.is_tracing() else qkernels.ops_for(w)
        if ops is not None and w.requires_grad and torch.is_grad_enabled():
            return ops.tanh_normalize(w, self.min_val)   # one C++ node, bit for bit (tests)
        t = torch.tanh(w)
        return t / t.abs().max().clamp_min(self.min_val)


def _quantizers(lo, hi, estimator):
    from brevitas.core.scaling import ScalingImplType
    from brevitas.quant.scaled_int import Int8ActPerTensorFloat, Int8WeightPerTensorFloat, Uint8ActPerTensorFloat

    common = {"bit_width_impl": LearnedBitWidth, "adaqat_min_bits": lo, "adaqat_max_bits": hi,
              "adaqat_estimator": estimator}
    weight = type("AdaQATWeight", (Int8WeightPerTensorFloat,),
                  {"scaling_impl_type": ScalingImplType.CONST, "scaling_init": 1.0, **common})
    act_u = type("AdaQATActPACT", (Uint8ActPerTensorFloat,), dict(common))
    act_s = type("AdaQATActSigned", (Int8ActPerTensorFloat,), dict(common))
    return weight, act_u, act_s


def _bw_module(quant_proxy) -> LearnedBitWidth | None:
    return next((m for m in quant_proxy.modules() if isinstance(m, LearnedBitWidth)), None)


#: width optimizers and their default learning rates. ``sgd`` (default): n -= bit_lr * dL/dn, so a
#: layer whose cost gradient is 4x larger moves 4x faster - the relative prices of a board's table
#: reach the widths. ``adam``: per-parameter normalised steps (every width moves ~bit_lr per step
#: whatever its price; kept for comparison - under it a BitOPs loss and a board loss that agree in
#: sign move the widths alike).
BIT_OPTIMIZERS = {"sgd": 2.0, "adam": 0.05}
#: sgd: the largest width move in one step (all steps scaled together when one would exceed it)
MAX_BIT_STEP = 0.05


class ProductCost(torch.autograd.Function):
    """A product-form cost (``sum_l coef_l * b_w[l] * b_a[l]``, or without ``b_a``: BitOPs, weight
    bits) over the clamped widths ``n`` as one autograd node. The graph it replaces - a clamp per
    width, two products per layer, stack and sum, ~30 nodes and ~0.25 ms a step on the MLP - is
    reproduced float for float: the same forward operations on the same values in the same
    order, and in the backward autograd's own formulas (SumBackward's expand, MulBackward0's
    ``g * other``, ClampBackward1's ``where(lo <= n <= hi, g, 0)``). ``ns``: the layers' weight
    widths, then (``acts``) their input sites' widths, each width once (:meth:`AdaQATMethod._product_plan`):
    one gradient per width, as the graph gives it."""

    @staticmethod
    def forward(ctx, coef, lo, hi, acts: bool, *ns):
        n = torch.stack(ns)
        c = n.clamp(lo, hi)
        k = coef.shape[0]
        x = coef * c[:k]
        ba = c[k:] if acts else None
        ctx.save_for_backward(coef, x, ba, (n >= lo).logical_and_(n <= hi))
        return (x * ba if acts else x).sum()

    @staticmethod
    def backward(ctx, g):
        coef, x, ba, inside = ctx.saved_tensors
        gl = g.expand(x.shape)
        grad = torch.cat([(gl * ba) * coef, gl * x]) if ba is not None else gl * coef
        grad = torch.where(inside, grad, torch.zeros((), dtype=grad.dtype))
        return (None,) * 4 + tuple(grad.unbind())


@register_method("adaqat")
class AdaQATMethod(QuantMethod):
    def __init__(self, per_channel: bool = False, cost: str = "bitops", lam: float = 0.1,
                 budget: float | None = None, estimator: str = DEFAULT_ESTIMATOR, min_bits: float = 2.0,
                 max_bits: float = 8.0, bit_lr: float | None = None, finetune_epochs: int = 2,
                 learn_edges: bool = False, bit_opt: str = "sgd", target_fps: float | None = None):
        if per_channel:
            raise BitfoldError("adaqat uses DoReFa-normalised weights with one constant scale",
                               "drop --per-channel for --method adaqat")
        super().__init__(per_channel=False)
        if estimator not in ESTIMATORS:
            raise BitfoldError(f"unknown AdaQAT estimator {estimator!r}", f"choose one of: {', '.join(ESTIMATORS)}")
        if not 1 <= min_bits < max_bits <= 8:
            raise BitfoldError(f"AdaQAT bit range [{min_bits}, {max_bits}] is invalid",
                               "use 1 <= min_bits < max_bits <= 8")
        if lam < 0 or (budget is not None and budget <= 0):
            raise BitfoldError("--lam must be >= 0 and --budget > 0")
        if bit_opt not in BIT_OPTIMIZERS:
            raise BitfoldError(f"unknown width optimizer {bit_opt!r}", f"choose one of: {', '.join(BIT_OPTIMIZERS)}")
        self.cost_name, self.lam, self.budget, self.estimator = cost, float(lam), budget, estimator
        self.bit_opt = bit_opt
        bit_lr = BIT_OPTIMIZERS[bit_opt] if bit_lr is None else bit_lr
        if bit_lr <= 0:
            raise BitfoldError(f"--bit-lr must be > 0, got {bit_lr}")
        self.min_bits, self.max_bits, self.bit_lr = float(min_bits), float(max_bits), float(bit_lr)
        self._walks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # model -> cached module walks
        self.finetune_epochs, self.learn_edges = int(finetune_epochs), bool(learn_edges)
        from bitfold.hw_models.cost import get_cost_model
        self.cost_model = get_cost_model(cost)  # fails early, with a clear message, on a bad name
        self.target_fps = target_fps
        if target_fps is not None:
            if not hasattr(self.cost_model, "at_rate"):
                raise BitfoldError(f"--target-fps needs a board's FPGA cost table, not {cost!r}",
                                   "pass --cost <board> (ulx3s-85f, icebreaker)")
            self.cost_model = self.cost_model.at_rate(target_fps)
        # an FPGA table prices a layer's thresholds only up to the output width it was fitted on:
        # learnable layer outputs stay inside that range (wider ones would be priced by extrapolation)
        self.out_cap = getattr(self.cost_model, "measured_out_bits", None)
        self._wq, self._aq_u, self._aq_s = _quantizers(self.min_bits, self.max_bits, estimator)
        self.trajectory: list[list] = []  # [step, layer or site, "w"|"a", N]
        self.layers = None
        self.c_ref = None
        self.edges: set[str] = set()
        self.capped: list = []
        self.fuse_penalty = True   # the product-form penalty as one node (ProductCost); False: the cost model's graph

    def options(self) -> dict:
        return {"cost": self.cost_name, "lam": self.lam, "budget": self.budget, "estimator": self.estimator,
                "min_bits": self.min_bits, "max_bits": self.max_bits, "bit_lr": self.bit_lr,
                "finetune_epochs": self.finetune_epochs, "learn_edges": self.learn_edges, "bit_opt": self.bit_opt,
                "target_fps": self.target_fps}

    # -- quantizers --------------------------------------------------------------------------
    def weight_kwargs(self, layer, bits):
        return {"weight_quant": self._wq, "weight_bit_width": bits}

    def act_kwargs(self, site, bits, signed):
        return {"act_quant": self._aq_s if signed else self._aq_u, "bit_width": bits,
                "collect_stats_steps": 16}

    def prepare_layer(self, name, layer, bits):
        parametrize.register_parametrization(layer, "weight", TanhNormalize())
        return layer

    # -- access to the learnable widths ---------------------------------------------------------
    # (module walks are cached per model, in a weak map owned by the method: they would otherwise
    # dominate a small model's step time)
    def _cached(self, model, key, build):
        cache = self._walks.setdefault(model, {})
        if key not in cache:
            cache[key] = build()
        return cache[key]

    def weight_widths(self, model) -> dict[str, LearnedBitWidth]:
        return self._cached(model, "w", lambda: {n: _bw_module(l.weight_quant)
                                                for n, l in compute_layers(model).items()})

    def site_widths(self, model) -> dict[tuple, LearnedBitWidth]:
        return self._cached(model, "a", lambda: {k: _bw_module(s.act_quant) for k, s in act_sites(model).items()})

    def _site_of(self, model) -> dict[str, LearnedBitWidth]:
        return self._cached(model, "site_of", lambda: {layer: m for key, m in self.site_widths(model).items()
                                                      for layer in key})

    def _all_widths(self, model):
        return self._cached(model, "all", lambda: list(self.weight_widths(model).values())
                            + list(self.site_widths(model).values()))

    def _learnable(self, model) -> list[LearnedBitWidth]:
        w = [m for n, m in self.weight_widths(model).items() if n not in self.edges]
        a = [m for k, m in self.site_widths(model).items() if not set(k) & self.edges]
        return w + a

    def layer_bits(self, model, continuous=True) -> dict[str, tuple]:
        """Per layer (b_w, b_a): continuous clamped N (differentiable) or the current integers."""
        ww, site_of = self.weight_widths(model), self._site_of(model)

        def val(m):
            if m.frozen > 0 or not continuous:
                return torch.tensor(float(m.integer()))
            return m.clamped().cpu()   # the cost models keep their constants on the CPU (a no-op there)
        return {n: (val(ww[n]), val(site_of[n])) for n in ww}

    def bit_map(self, model):
        return {n: LayerBits(int(w), int(a)) for n, (w, a) in self.layer_bits(model, continuous=False).items()}

    # -- training hooks -------------------------------------------------------------------------
    def setup(self, model, layers):
        from brevitas import config as brevitas_config
        if brevitas_config.JIT_ENABLED:   # TorchScript hides the width modules from the walks below
            raise BitfoldError("AdaQAT's learned bit-widths do not run with BREVITAS_JIT=1 (Brevitas's quantizers "
                               "become TorchScript modules)",
                               "unset BREVITAS_JIT: bitfold's fused quantizers are faster than Brevitas's "
                               "TorchScript path (benchmarks/qat_overhead.py; README, Fast QAT)")
        self.layers = layers
        names = [d.name for d in layers]
        self.edges = set() if self.learn_edges else {names[0], names[-1]}
        learn = self._learnable(model)
        for m in self._all_widths(model):
            if m not in learn:
                # kept at its initial width whatever [min_bits, max_bits] is (a max_bits under the
                # edges' 8 bits would otherwise clamp them down)
                m.n.requires_grad_(False)
                m.lo = m.hi = float(m.n)
        # thresholded outputs: every site except the one feeding the first layer (the model input)
        self.capped = [m for k, m in self.site_widths(model).items() if names[0] not in k and m in learn] \
            if self.out_cap is not None and self.out_cap < self.max_bits else []
        with torch.no_grad():
            for m in self.capped:
                m.n.clamp_(max=float(self.out_cap))
        with torch.no_grad():
            self.c_ref = float(self.cost_model(layers, self.layer_bits(model)).total)
        self._walks.get(model, {}).pop("product", None)   # the fused penalty's plan follows these widths' bounds
        if self.budget is not None and self.c_ref <= 0:
            raise BitfoldError("the cost model gives zero cost at the initial widths")

    def param_groups(self, model, lr, weight_decay):
        bits = {id(m.n) for m in self._all_widths(model)}
        rest = [p for p in model.parameters() if id(p) not in bits]
        learn = [m.n for m in self._learnable(model)]
        if self.bit_opt == "sgd":  # the widths are stepped in after_step, outside the weights' Adam
            return [{"params": rest, "lr": lr, "weight_decay": weight_decay}]
        return [{"params": rest, "lr": lr, "weight_decay": weight_decay},
                {"params": learn, "lr": self.bit_lr, "weight_decay": 0.0}]

    def cost(self, model):
        return self.cost_model(self.layers, self.layer_bits(model))

    def _product_plan(self, model):
        """The fused penalty's constants (:class:`ProductCost`) where the cost model has a product
        form, every width is on the CPU and no width serves two (layer, role) places; else None."""
        coef_of = getattr(self.cost_model, "coef", None)
        if coef_of is None or self.layers is None:
            return None
        ww, site_of = self.weight_widths(model), self._site_of(model)
        names = [d.name for d in self.layers]
        if any(n not in ww or n not in site_of for n in names):
            return None
        order = [ww[n] for n in names] + ([site_of[n] for n in names] if self.cost_model.acts else [])
        if len({id(m) for m in order}) < len(order) or any(m.n.device.type != "cpu" for m in order):
            return None
        return {"widths": order, "acts": bool(self.cost_model.acts),
                "coef": torch.tensor([coef_of(d) for d in self.layers], dtype=torch.int64).to(torch.float32),
                "lo": torch.tensor([m.lo for m in order], dtype=torch.float32),
                "hi": torch.tensor([m.hi for m in order], dtype=torch.float32)}

    def cost_loss(self, model, flags: list[float] | None = None) -> torch.Tensor:
        """The cost penalty; ``flags``: :meth:`_frozen_flags` when the caller has just read them."""
        plan = self._cached(model, "product", lambda: self._product_plan(model)) if self.fuse_penalty else None
        if plan is not None and not any(f > 0 for f in (self._frozen_flags(model) if flags is None else flags)):
            ns = [m.n for m in plan["widths"]]
            ops = qkernels.ops_for(plan["coef"])   # the same node in C++ (bitfold_q.product_cost)
            c = ops.product_cost(plan["coef"], plan["lo"], plan["hi"], plan["acts"], ns) if ops is not None \
                else ProductCost.apply(plan["coef"], plan["lo"], plan["hi"], plan["acts"], *ns)
        else:
            c = self.cost(model).total
        if self.budget is not None:
            return self.lam * torch.relu(c - self.budget) / self.budget
        return self.lam * c / self.c_ref

    def frozen(self, model) -> bool:
        return all(f > 0 for f in self._frozen_flags(model))

    def _frozen_flags(self, model) -> list[float]:
        """Every width's frozen value (0: learning), in :meth:`_all_widths` order, each read from its
        buffer again only after a write (:func:`~bitfold.toolchain.fastquant.frozen_value`)."""
        widths = self._all_widths(model)
        memos = self._cached(model, "frozen", lambda: [{} for _ in widths])
        return [frozen_value(m.frozen, d) for m, d in zip(widths, memos)]

    def extra_loss(self, model, step, batch=None, task_loss=None):
        flags = self._frozen_flags(model)   # (read once a step: ~1.5 us a width)
        if all(f > 0 for f in flags):
            return None
        learn = self._cached(model, "learn", lambda: self._learnable(model))
        if step % 5 == 0:
            for key, m in list(self.weight_widths(model).items()) + list(self.site_widths(model).items()):
                name = "+".join(key) if isinstance(key, tuple) else key
                self.trajectory.append([step, name, "a" if isinstance(key, tuple) else "w", float(m.clamped().detach())])
        loss = self.cost_loss(model, flags)
        if self.estimator == "fd" and batch is not None and learn:
            loss = loss + self._fd_surrogate(model, learn, batch, step)
        return loss

    @torch.no_grad()
    def _fd_losses(self, model, learn, batch, signs):
        import torch.nn.functional as F
        xb, yb = batch
        lows = [m.clamped().floor().clamp(max=self.max_bits - 1) for m in learn]
        out = []
        for direction in (1, -1):
            for m, lo, s in zip(learn, lows, signs):
                m.override = lo + (1.0 if s * direction > 0 else 0.0)
            out.append(float(F.cross_entropy(model(xb), yb)))
        for m in learn:
            m.override = None
        return out

    def _fd_surrogate(self, model, learn, batch, step):
        g = torch.Generator().manual_seed(step)
        signs = (torch.randint(0, 2, (len(learn),), generator=g) * 2 - 1).tolist()
        was = model.training
        model.eval()  # no BN-statistics / scale updates from the probe passes
        l_plus, l_minus = self._fd_losses(model, learn, batch, signs)
        model.train(was)
        return sum((l_plus - l_minus) * s * m.n for m, s in zip(learn, signs))

    def after_step(self, model, step):
        widths = [m.n for m in self._cached(model, "learn", lambda: self._learnable(model))]
        with torch.no_grad():
            ops = qkernels.ops_for(widths[0]) if widths and self.bit_opt == "sgd" else None
            if self.bit_opt == "sgd":
                # frozen widths no longer require grad, so they have none
                live = [n for n in widths if n.grad is not None]
                if ops is not None:   # step and clamp in one C++ call (bitfold_q.width_step), the same floats
                    ops.width_step(live, [n.grad for n in live], self.bit_lr, MAX_BIT_STEP, widths, self.min_bits,
                                   self.max_bits)
                elif live:
                    # multi-tensor operations: the same per-width arithmetic as a loop, in one call each
                    steps = torch._foreach_mul([n.grad for n in live], self.bit_lr)
                    # one clip for all widths (largest move MAX_BIT_STEP per step): the relative sizes,
                    # which carry the cost's relative prices, are kept
                    biggest = float(torch.stack(torch._foreach_abs(steps)).max())
                    k = min(1.0, MAX_BIT_STEP / biggest) if biggest > 0 else 1.0
                    torch._foreach_sub_(live, torch._foreach_mul(steps, k))
                for n in live:
                    n.grad = None
            if widths and ops is None:
                torch._foreach_clamp_min_(widths, self.min_bits)
                torch._foreach_clamp_max_(widths, self.max_bits)
            for m in self.capped:
                m.n.clamp_(max=float(self.out_cap))

    def on_epoch_end(self, model, epoch, epochs):
        if epoch >= epochs - self.finetune_epochs and not self.frozen(model):
            self.freeze(model)

    def freeze(self, model) -> dict[str, LayerBits]:
        """Fix every width to an integer (budget-aware rounding in budget mode)."""
        learn = self._learnable(model)
        ints = {id(m): float(torch.round(m.clamped())) for m in self._all_widths(model)}
        if self.budget is not None:
            ints = self._repair_to_budget(model, learn, ints)
        for m in self._all_widths(model):
            m.frozen.fill_(ints[id(m)])
            m.n.requires_grad_(False)
            m.n.grad = None
        return self.bit_map(model)

    def _cost_of(self, model, ints) -> float:
        ww, site_of = self.weight_widths(model), self._site_of(model)
        bits = {n: (ints[id(ww[n])], ints[id(site_of[n])]) for n in ww}
        return float(self.cost_model(self.layers, bits).total)

    def _repair_to_budget(self, model, learn, ints):
        """Lower the widths rounded up the most until the map fits; then raise while it still fits."""
        ints = dict(ints)
        frac = {id(m): float(m.clamped()) for m in learn}
        cur = self._cost_of(model, ints)
        while cur > self.budget:
            helps = []  # only narrowings that actually lower the cost (a flat table has none)
            for m in learn:
                if ints[id(m)] > self.min_bits:
                    ints[id(m)] -= 1
                    c = self._cost_of(model, ints)
                    ints[id(m)] += 1
                    if c < cur:
                        helps.append((ints[id(m)] - frac[id(m)], m, c))
            if not helps:
                break  # the budget cannot be reached by narrowing: keep the widths (finalize reports it)
            _, m, cur = max(helps, key=lambda t: t[0])
            ints[id(m)] -= 1
        capped = {id(c) for c in self.capped}
        improved = True
        while improved:
            improved = False
            for m in sorted(learn, key=lambda m: ints[id(m)] - frac[id(m)]):
                if ints[id(m)] < (self.out_cap if id(m) in capped else self.max_bits):
                    ints[id(m)] += 1
                    if self._cost_of(model, ints) <= self.budget:
                        improved = True
                        break
                    ints[id(m)] -= 1
        return ints

    def state(self):
        return {"trajectory": self.trajectory, "c_ref": self.c_ref}

    def load_state(self, state):
        self.trajectory = list(state.get("trajectory", []))
        # the penalty's reference cost is that of the initial widths: setup() on a resumed run sees the
        # trained ones (a checkpoint written before it was saved keeps setup()'s value)
        if state.get("c_ref") is not None:
            self.c_ref = float(state["c_ref"])

    def finalize(self, model, out_dir):
        if not self.frozen(model):
            self.freeze(model)
        out_dir = Path(out_dir)
        from bitfold.core.atomic import atomic_path, write_json
        with atomic_path(out_dir / "bit_trajectory.csv") as tmp:
            with open(tmp, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["step", "name", "kind", "bits"])
                w.writerows(self.trajectory)
        self._plot(out_dir / "bit_trajectory.png")
        bm = {k: v.as_dict() for k, v in self.bit_map(model).items()}
        write_json(out_dir / "learned_bitmap.json", bm)
        with torch.no_grad():
            final = float(self.cost_model(self.layers, self.layer_bits(model, continuous=False)).total)
        return {"adaqat": {**self.options(), "cost_ref": self.c_ref, "final_cost": final,
                           "cost_unit": self.cost_model.unit, "out_cap": self.out_cap,
                           "budget_met": None if self.budget is None else bool(final <= self.budget)}}

    def _plot(self, path):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from bitfold.core.atomic import atomic_path
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        series: dict[tuple, list] = {}
        for step, name, kind, bits in self.trajectory:
            series.setdefault((kind, name), []).append((step, bits))
        for (kind, name), pts in sorted(series.items()):
            ax = axes[0 if kind == "w" else 1]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name)
        for ax, t in zip(axes, ("weight widths N_w", "activation widths N_a")):
            ax.set_title(t)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        axes[0].set_ylabel("bits")
        fig.tight_layout()
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=90)
        plt.close(fig)

    def for_export(self, model):
        """A copy with the DoReFa normalisation baked into plain weights (widths must be frozen)."""
        import copy
        if not self.frozen(model):
            raise BitfoldError("AdaQAT widths are not frozen yet; export the run after training finished")
        return bake_parametrizations(copy.deepcopy(model))

