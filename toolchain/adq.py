"""ADQ: adaptive non-uniform weight codebooks + sensitivity-based mixed precision (after arXiv 2510.19760).

Choices made here (and tested):

* Each compute layer has a codebook of ``2^b`` float entries (``b`` = the bit map's ``w``), held
  in buffers so checkpoints restore it bit-exactly. It is initialised at the quantiles
  ``(k + 0.5) / 2^b`` of the layer's weights on the first training forward (equal counts per bin),
  and adapted online: on every training forward each weight is assigned to its nearest entry and
  each non-empty entry moves to ``m * c_k + (1 - m) * mean(assigned weights)`` (``momentum`` m,
  default 0.9; ``--opt ema=false`` keeps the initial codebook, ``--opt init=uniform`` starts from
  evenly spaced entries - the paper's ablations; ``--opt init=signed`` splits the entries between
  the signs with an explicit zero that the EMA keeps at zero). The forward uses
  ``w + (c[assign] - w).detach()`` (straight-through to the latent
  weights). The codebook lives in a torch parametrization of the Brevitas layer's weight; the
  Brevitas weight quantizer itself is off during training.
* Activations: Brevitas' learned-scale uniform quantizer (LSQ-style threshold), as in ``fixed`` -
  the default, because only uniform activations deploy: every back-end multiplies the next layer's
  weights by the activation's *integer* code. ``--opt act=nonuniform`` trains the paper's variant
  instead (:class:`NonUniformAct`): after each ReLU ``2^b`` learned levels (level 0 fixed at 0),
  each input goes to its nearest level (thresholds at the midpoints), with a generalised
  straight-through estimator - the input's gradient passes inside [0, top level] and is cut above,
  each level gets the summed gradient of the outputs assigned to it. Such a model trains and
  evaluates in torch; export refuses it (a non-uniform code would need a per-input table in front
  of every MAC, i.e. 8-bit arithmetic, the cost ADQ's low activation width is meant to save).
* Sensitivity: the empirical **Fisher** trace per layer, ``mean over batches of sum(g^2)`` on the
  latent weights (chosen over Hutchinson's Hessian trace: no double backward through Brevitas'
  rounding functions, one backward per batch). The allocator minimises
  ``sum_l F_l * MSE_l(b_l)`` (F a sum over weights, MSE a mean per weight) - the second-order
  loss increase with the Fisher as Hessian proxy and
  the layer's codebook quantization error at ``b`` bits, measured by fitting that codebook - under a
  budget in any ``CostModel``: start at the widest candidate, repeatedly take the one-bit step that
  adds the least objective per unit of cost saved.
* Deployment (non-uniform weights on real hardware): a b-bit index is not a b-bit
  multiplier. Export snaps every codebook onto a signed integer grid of ``grid_bits`` (default 8,
  one scale per layer = max|c| / (2^(grid_bits-1) - 1); 7 on a layer with 8-bit inputs, whose
  8-bit products could saturate the int8 kernels of CPUs without VNNI) and exports the layer as a
  grid-width Brevitas weight quantizer - so QONNX / QCDQ carry the arithmetic width, and BitOPs counts
  ``grid_bits`` while weight memory counts the index bits (+ the codebook). The index + codebook
  ONNX form (``export_index_form``) replaces each weight initializer by a Gather of an integer
  index tensor from the codebook.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize

from bitfold.toolchain import qkernels
from bitfold.toolchain.bitmap import LayerBits
from bitfold.core.errors import BitfoldError
from bitfold.toolchain.quant import FixedMethod, compute_layers, register_method


def quantile_codebook(w: torch.Tensor, bits: int) -> torch.Tensor:
    k = 2 ** bits
    q = (torch.arange(k, dtype=torch.float64, device=w.device) + 0.5) / k
    return torch.quantile(w.detach().flatten().double(), q).float()


def uniform_codebook(w: torch.Tensor, bits: int) -> torch.Tensor:
    """``2^bits`` evenly spaced entries over [min(w), max(w)] (the ablation of the quantile init)."""
    w = w.detach().flatten()
    return torch.linspace(float(w.min()), float(w.max()), 2 ** bits, device=w.device)


def signed_codebook(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Sign split with an explicit zero: one entry exactly 0, the other ``2^bits - 1`` shared
    between the negative and the positive weights in proportion to their counts (at least one
    each), each side at the quantiles ``(k + 0.5) / n`` of its own weights."""
    w = w.detach().flatten().double()
    k = 2 ** bits - 1
    neg, pos = w[w < 0], w[w > 0]
    n_neg = min(k - 1, max(1, round(k * len(neg) / max(1, len(neg) + len(pos)))))
    parts = [torch.zeros(1, dtype=torch.float64, device=w.device)]
    for side, n in ((neg, n_neg), (pos, k - n_neg)):
        q = (torch.arange(n, dtype=torch.float64, device=w.device) + 0.5) / n
        parts.append(torch.quantile(side, q) if len(side) else torch.zeros(n, dtype=torch.float64, device=w.device))
    return torch.cat(parts).sort().values.float()


INITS = {"quantile": quantile_codebook, "uniform": uniform_codebook, "signed": signed_codebook}


def assign(w: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook entry for every weight (codebook sorted ascending)."""
    c = codebook.sort().values if not bool((codebook[1:] >= codebook[:-1]).all()) else codebook
    mids = (c[1:] + c[:-1]) / 2
    w = w.detach()
    # the compiled block-wise search: the same index as torch.bucketize (ties go left); measured on
    # 1 thread: 14x torch.bucketize at 255 midpoints x 50 k weights, 1.2-8x the loop below at 1-15
    idx = qkernels.bucketize(w, mids)
    if idx is not None:
        return idx
    if len(mids) > 15:
        return torch.bucketize(w, mids)
    # up to 4 bits: the number of midpoints below each weight, counted one midpoint at a time (the
    # same index as bucketize - ties go left - and on a 2-core CPU 1.3-5x faster than its per-element
    # binary search at 15 midpoints or fewer; slower beyond)
    below = (w > mids[0]).to(torch.uint8)
    for m in mids[1:]:
        below += w > m
    return below.long()


def lloyd_mse(w: torch.Tensor, bits: int, iters: int = 8) -> float:
    """Mean squared error of a 2^bits-entry codebook fitted to ``w`` (quantile init + Lloyd steps)."""
    w = w.detach().flatten()
    c = quantile_codebook(w, bits)
    for _ in range(iters):
        idx = assign(w, c)
        sums = torch.zeros_like(c).index_add_(0, idx, w)
        cnt = torch.zeros_like(c).index_add_(0, idx, torch.ones_like(w))
        c = torch.where(cnt > 0, sums / cnt.clamp_min(1), c).sort().values
    return float(((w - c[assign(w, c)]) ** 2).mean())


class CodebookWeight(nn.Module):
    """Parametrization: weight -> its nearest codebook entry (STE), codebook adapted by EMA."""

    def __init__(self, bits: int, momentum: float, init: str = "quantile"):
        super().__init__()
        self.bits, self.momentum, self.init = int(bits), float(momentum), init
        self.register_buffer("codebook", torch.zeros(2 ** self.bits))
        self.register_buffer("initialized", torch.tensor(False))

    def forward(self, w):
        if not bool(self.initialized):
            with torch.no_grad():
                self.codebook.copy_(INITS[self.init](w, self.bits))
                self.initialized.fill_(True)
        d = qkernels.codebook_delta(w, self.codebook)   # q - w in one pass, or None: the operations
        if d is None:
            d = (self.codebook[assign(w, self.codebook)] - w).detach()
        return w + d

    @torch.no_grad()
    def ema_update(self, w: torch.Tensor) -> None:
        """Move each non-empty entry toward the mean of the weights assigned to it.

        Called once per optimizer step (``ADQMethod.after_step``), not per forward: a parametrization
        is evaluated at every access of ``layer.weight``, which would make the update count depend on
        how often a library reads the weight.
        """
        if not bool(self.initialized):
            self.forward(w)
        if qkernels.codebook_ema(w, self.codebook, self.momentum, self.init == "signed"):
            return                          # the operations below, in one pass (bit for bit)
        flat = w.detach().flatten()
        fi = assign(flat, self.codebook)
        sums = torch.zeros_like(self.codebook).index_add_(0, fi, flat)
        cnt = torch.zeros_like(self.codebook).index_add_(0, fi, torch.ones_like(flat))
        upd = self.momentum * self.codebook + (1 - self.momentum) * sums / cnt.clamp_min(1)
        move = cnt > 0
        if self.init == "signed":          # the explicit zero stays exactly zero
            move &= self.codebook != 0
        self.codebook.copy_(torch.where(move, upd, self.codebook).sort().values)


class NonUniformAct(nn.Module):
    """ReLU then ``2^bits`` learned levels (ADQ's non-uniform activations; see the module docstring).

    Levels start on the uniform grid ``k * t / (2^bits - 1)``, ``t`` the 99.9th percentile of the
    first training batch (so that at step 0 it is the uniform quantizer it is compared with); level 0
    stays 0 (a ReLU's zeros stay exact)."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = int(bits)
        self.levels = nn.Parameter(torch.linspace(0.0, 1.0, 2 ** self.bits)[1:].clone())  # level 0 = 0
        self.register_buffer("initialized", torch.tensor(False))

    def forward(self, x):
        x = torch.relu(x)
        if not bool(self.initialized) and self.training:
            with torch.no_grad():
                t = float(torch.quantile(x.detach().flatten()[:1_000_000].float(), 0.999).clamp_min(1e-6))
                self.levels.copy_(torch.arange(1, 2 ** self.bits, dtype=x.dtype, device=x.device)
                                  * t / (2 ** self.bits - 1))
                self.initialized.fill_(True)
        lv = torch.cat([self.levels.new_zeros(1), self.levels.abs()]).sort().values
        idx = torch.bucketize(x.detach(), (lv[1:] + lv[:-1]) / 2)
        inside = (x.detach() <= lv[-1]).to(x.dtype)
        return lv[idx] + (x - x.detach()) * inside


def _cb(layer) -> CodebookWeight:
    return layer.parametrizations.weight[0]


@register_method("adq")
class ADQMethod(FixedMethod):
    weight_bits_range = (1, 8)

    def __init__(self, per_channel: bool = False, momentum: float = 0.9, grid_bits: int = 8,
                 init: str = "quantile", ema: bool = True, act: str = "uniform"):
        if per_channel:
            raise BitfoldError("adq codebooks are per layer", "drop --per-channel")
        super().__init__(per_channel=False)
        if not 0.0 <= momentum < 1.0:
            raise BitfoldError(f"ADQ momentum {momentum} must be in [0, 1)")
        if not 2 <= grid_bits <= 8:
            raise BitfoldError(f"ADQ grid_bits {grid_bits} must be in 2..8")
        if init not in INITS:
            raise BitfoldError(f"unknown ADQ codebook init {init!r}", f"choose one of: {', '.join(INITS)}")
        if not isinstance(ema, bool):
            raise BitfoldError(f"ADQ ema must be true or false, got {ema!r}", "--opt ema=false")
        if act not in ("uniform", "nonuniform"):
            raise BitfoldError(f"unknown ADQ activation quantizer {act!r}", "--opt act=uniform (default, exports) "
                               "or act=nonuniform (learned levels; torch only)")
        self.momentum, self.grid_bits, self.init, self.ema = float(momentum), int(grid_bits), init, ema
        self.act = act
        self._codebooks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its layers' codebooks

    def options(self):
        out = {"momentum": self.momentum, "grid_bits": self.grid_bits, "init": self.init, "ema": self.ema}
        if self.act != "uniform":   # configs of uniform runs read as before the option existed
            out["act"] = self.act
        return out

    def act_module(self, site, bits, relu):
        if self.act == "nonuniform" and relu and bits > 1:
            return NonUniformAct(bits)
        return super().act_module(site, bits, relu)

    def weight_kwargs(self, layer, bits):
        return {"weight_quant": None}  # the codebook parametrization quantizes; see for_export

    def prepare_layer(self, name, layer, bits):
        parametrize.register_parametrization(layer, "weight", CodebookWeight(bits.w, self.momentum, self.init))
        return layer

    def after_step(self, model, step):
        if not self.ema:         # ablation: the codebook stays where it was initialised
            return
        if model not in self._codebooks:   # walked once per model, not at every step
            self._codebooks[model] = [(_cb(l), l.parametrizations.weight) for l in compute_layers(model).values()]
        for cb, pw in self._codebooks[model]:
            cb.ema_update(pw.original)

    def grid_of(self, bits: LayerBits) -> int:
        """The snapped grid width of a layer: ``grid_bits``, at most 7 when its inputs have 8 bits."""
        return min(self.grid_bits, 7) if bits.a >= 8 else self.grid_bits

    def cost_bits(self, model):
        """Per layer (arithmetic w, a) for compute-cost models: the snapped grid, not the index."""
        return {n: (self.grid_of(b), b.a) for n, b in model.bit_map.items()}

    # -- export -----------------------------------------------------------------------------------
    def snapped_codebooks(self, model, bit_map=None) -> dict[str, tuple[torch.Tensor, float]]:
        """Per layer: codebook values snapped to the layer's signed grid (:meth:`grid_of`), and the
        grid scale (``bit_map``: the model's, when ``model`` is a copy that lost it)."""
        out = {}
        bit_map = model.bit_map if bit_map is None else bit_map
        for name, layer in compute_layers(model).items():
            qmax = 2 ** (self.grid_of(bit_map[name]) - 1) - 1
            c = _cb(layer).codebook
            scale = float(c.abs().max().clamp_min(1e-12)) / qmax
            out[name] = (torch.round(c / scale).clamp(-qmax, qmax) * scale, scale)
        return out

    def for_export(self, model):
        """A copy whose layers hold the snapped codebook values behind a ``grid_bits`` Brevitas quantizer."""
        if any(isinstance(m, NonUniformAct) for m in model.modules()):
            raise BitfoldError("this ADQ run has non-uniform activations (act=nonuniform): no integer back-end "
                               "can execute them, so it is not exported",
                               "train with --method adq --opt act=uniform (the default) to deploy")
        import copy

        import brevitas.nn as qnn
        from brevitas.core.scaling import ScalingImplType
        from brevitas.quant.scaled_int import Int8WeightPerTensorFloat

        from bitfold.toolchain.convert import set_module
        m = copy.deepcopy(model)
        snapped = self.snapped_codebooks(m, model.bit_map)
        for name, old in compute_layers(m).items():
            grid = self.grid_of(model.bit_map[name])
            qmax = 2 ** (grid - 1) - 1
            cb, scale = snapped[name]
            w = cb[assign(old.weight, _cb(old).codebook)]
            quant = type("ADQGrid", (Int8WeightPerTensorFloat,),
                         {"scaling_impl_type": ScalingImplType.CONST, "scaling_init": scale * qmax})
            kw = dict(weight_quant=quant, weight_bit_width=grid, return_quant_tensor=False,
                      bias=old.bias is not None)
            if isinstance(old, nn.Conv2d):
                new = qnn.QuantConv2d(old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                                      old.dilation, old.groups, **kw)
            else:
                new = qnn.QuantLinear(old.in_features, old.out_features, **kw)
            with torch.no_grad():
                new.weight.copy_(w)
                if old.bias is not None:
                    new.bias.copy_(old.bias)
            new._bitfold_layer = name
            new._adq_index = assign(old.weight, _cb(old).codebook).to(torch.uint8)
            new._adq_codebook = cb
            set_module(m, name, new)
        m.bit_map = {n: LayerBits(self.grid_of(b), b.a) for n, b in model.bit_map.items()}
        m.index_bits = {n: b.w for n, b in model.bit_map.items()}
        m.quant_method = None
        return m


def fisher_sensitivity(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batches: int = 8,
                       batch_size: int = 64) -> dict[str, float]:
    """Empirical Fisher trace per compute layer: mean over batches of sum(grad^2) of its weights."""
    layers = compute_layers(model)
    params = {n: (l.parametrizations.weight.original if parametrize.is_parametrized(l, "weight") else l.weight)
              for n, l in layers.items()}
    acc = {n: 0.0 for n in layers}
    model.eval()
    for i in range(batches):
        xb, yb = x[i * batch_size:(i + 1) * batch_size], y[i * batch_size:(i + 1) * batch_size]
        if len(xb) == 0:
            break
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()
        for n, p in params.items():
            acc[n] += float((p.grad ** 2).sum()) / batches
    model.zero_grad(set_to_none=True)
    return acc


def allocate(layers, weights: dict[str, torch.Tensor], sensitivity: dict[str, float], cost_model, budget: float,
             candidates=(2, 3, 4, 5, 6, 8), fixed: dict[str, LayerBits] | None = None, a_bits: dict | None = None):
    """Greedy bit allocation: minimise sum F_l * MSE_l(b_l) subject to cost <= budget.

    ``F_l`` is the Fisher trace (already a sum over the layer's weights) and ``MSE_l`` the mean
    squared codebook error per weight, so ``F_l * MSE_l`` estimates the loss increase
    ``sum_i g_i^2 * d_i^2``; multiplying by the layer's size again would count it twice."""
    fixed = fixed or {}
    cands = sorted(candidates)
    mse = {n: {b: lloyd_mse(w, b) for b in cands} for n, w in weights.items() if n not in fixed}
    bits = {d.name: (fixed[d.name].w if d.name in fixed else cands[-1]) for d in layers}
    a = a_bits or {d.name: 8 for d in layers}

    def cost(bm):
        return float(cost_model(layers, {n: (bm[n], a[n]) for n in bm}).total)

    def obj(n, b):
        return sensitivity[n] * mse[n][b]

    cur = cost(bits)
    while cur > budget:
        best = None
        for n in mse:
            i = cands.index(bits[n])
            if i == 0:
                continue
            nb = cands[i - 1]
            trial = dict(bits, **{n: nb})
            c = cost(trial)
            if c >= cur:
                continue
            score = (obj(n, nb) - obj(n, bits[n])) / (cur - c)
            if best is None or score < best[0]:
                best = (score, n, nb, c)
        if best is None:
            raise BitfoldError(f"no allocation from {cands} fits the budget {budget:g} (reached {cur:g})",
                               "raise the budget or allow narrower widths")
        _, n, nb, cur = best
        bits[n] = nb
    return {n: LayerBits(b, a[n]) for n, b in bits.items()}, cur


def allocate_run(run_dir, cost: str, budget: float, candidates=(2, 3, 4, 5, 6, 8), out_path=None) -> dict:
    """``bitfold allocate``: Fisher sensitivities of a trained ADQ run -> a bit map under ``budget``."""
    from pathlib import Path

    from bitfold.hw_models.cost import get_cost_model

    from bitfold.core.atomic import write_json
    from bitfold.toolchain.bitmap import bitmap_to_json
    from bitfold.toolchain.runs import dataset_of
    from bitfold.toolchain.describe import describe_layers
    from bitfold.toolchain.runs import load_run
    cfg, model, _ = load_run(run_dir)
    method = model.quant_method
    if not isinstance(method, ADQMethod):
        raise BitfoldError(f"run {run_dir} was trained with --method {cfg.method}", "allocate needs a --method adq run")
    cm = get_cost_model(cost)
    ds = dataset_of(cfg)
    layers = describe_layers(model, ds.input_shape)
    names = [d.name for d in layers]
    edges = {names[0]: model.bit_map[names[0]], names[-1]: model.bit_map[names[-1]]}
    sens = fisher_sensitivity(model, ds.x_train, ds.y_train)
    lat = {n: l.parametrizations.weight.original.detach() for n, l in compute_layers(model).items()}
    a_bits = {n: b.a for n, b in model.bit_map.items()}
    if cm.name != "weight_bits":
        # compute cost runs at the snapped grid width whatever the index width: only memory can move
        probe = {n: (method.grid_of(LayerBits(1, a_bits[n])), a_bits[n]) for n in names}
        if float(cm(layers, probe).total) > budget:
            raise BitfoldError(f"{cost} of an ADQ model does not depend on the index width (arithmetic runs on the "
                               f"{method.grid_bits}-bit grid) and already exceeds {budget:g}",
                               "budget weight memory instead: --cost weight_bits")
        cm_alloc = _IndexAsWeightBits(cm, method.grid_of)
    else:
        cm_alloc = cm
    bit_map, final = allocate(layers, lat, sens, cm_alloc, budget, candidates, fixed=edges, a_bits=a_bits)
    out_path = Path(out_path or Path(run_dir) / f"allocated_{cost}_{budget:g}.json")
    write_json(out_path, bitmap_to_json(bit_map))
    report = {"cost": cost, "budget": budget, "final_cost": final, "sensitivity": sens,
              "bit_map": bitmap_to_json(bit_map), "path": str(out_path)}
    write_json(out_path.with_name(out_path.stem + ".report.json"), report)
    return report


class _IndexAsWeightBits:
    """Presents a compute-cost model to the allocator with the grid width in place of the index width."""

    def __init__(self, cm, grid_of):
        self.cm, self.grid_of = cm, grid_of
        self.name, self.unit = cm.name, cm.unit

    def __call__(self, layers, bits):
        return self.cm(layers, {n: (self.grid_of(LayerBits(w, a)), a) for n, (w, a) in bits.items()})
