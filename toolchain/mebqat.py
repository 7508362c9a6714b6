"""MEBQAT: one meta-trained model that runs at any bit-width (after arXiv 2207.10188).

Choices made here:

* Every quantizer's width is a :class:`SwitchableBitWidth` buffer, so the *same weights* run at
  any width by writing buffers (:meth:`MEBQATMethod.set_map`) - per layer, at run time.
* Meta-training: each optimizer step runs ``tasks_per_step`` (w, a) tasks on the batch and
  averages their gradients into the shared weights (one step). Every step holds the
  high-precision task (``high_bits``, default 16 bit: the stand-in for FP, which keeps every task
  on the same quantizer path) and the lowest-width task, the others drawn from the candidate pairs
  (``sandwich``, default on, as in the authors' code); the quantized tasks learn the
  high-precision task's output distribution (``distill``, default on: KL to its detached softmax).
  ``--opt sandwich=false`` / ``distill=false`` restore uniform draws and label losses
  (ablations). First and last layer stay at their widths
  in the run's bit map (8 bit by default), as in the dedicated-QAT baseline.
* Quantizers (``quantizer``): ``"lsq"`` - learned weight threshold (initialised from max |w|) and
  learned activation clipping; ``"dorefa"`` - tanh-normalised weights on a constant grid (as
  AdaQAT) with PACT activations. A learned threshold is bit-width independent; the step is
  threshold / (2^(b-1) - 1), so switching widths needs no other state.
* BatchNorm is shared across widths; before evaluating or exporting at a width, its running
  statistics are re-estimated on a few training batches at that width (``reestimate_bn``) -
  the usual practice for any-precision networks, cheap, and no retraining.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize

from bitfold.toolchain.bitmap import LayerBits
from bitfold.core.errors import BitfoldError
from bitfold.toolchain.quant import QuantMethod, act_sites, bake_parametrizations, compute_layers, register_method

DEFAULT_CANDIDATES = (2, 3, 4, 5, 6, 8)


class SwitchableBitWidth(nn.Module):
    """An integer bit-width held in a buffer; written at run time to switch the quantizer."""

    def __init__(self, bit_width):
        super().__init__()
        self.register_buffer("bits", torch.tensor(float(bit_width)))

    def forward(self):
        return self.bits


def _bw(proxy) -> SwitchableBitWidth:
    return next(m for m in proxy.modules() if isinstance(m, SwitchableBitWidth))


def _quantizers(kind: str):
    from brevitas.core.scaling import ScalingImplType
    from brevitas.quant.scaled_int import Int8ActPerTensorFloat, Int8WeightPerTensorFloat, Uint8ActPerTensorFloat
    w_attrs = {"bit_width_impl": SwitchableBitWidth}
    if kind == "lsq":
        w_attrs["scaling_impl_type"] = ScalingImplType.PARAMETER_FROM_STATS
    else:
        w_attrs.update(scaling_impl_type=ScalingImplType.CONST, scaling_init=1.0)
    weight = type(f"MEBQAT{kind}Weight", (Int8WeightPerTensorFloat,), w_attrs)
    act_u = type("MEBQATActU", (Uint8ActPerTensorFloat,), {"bit_width_impl": SwitchableBitWidth})
    act_s = type("MEBQATActS", (Int8ActPerTensorFloat,), {"bit_width_impl": SwitchableBitWidth})
    return weight, act_u, act_s


@torch.no_grad()
def reestimate_bn(model: nn.Module, x: torch.Tensor, batches: int = 8, batch_size: int = 128) -> None:
    """Re-estimate BatchNorm running statistics (cumulative average) at the current widths."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    dev = next(model.parameters()).device
    for i in range(batches):
        xb = x[(i * batch_size) % len(x):][:batch_size]
        model(xb.to(dev))
    for bn, m in zip(bns, saved):
        bn.momentum = m
    model.eval()


@register_method("mebqat")
class MEBQATMethod(QuantMethod):
    weight_bits_range = (2, 8)
    act_bits_range = (2, 8)

    def __init__(self, per_channel: bool = False, quantizer: str = "lsq", candidates=DEFAULT_CANDIDATES,
                 tasks_per_step: int = 3, high_bits: int = 16, sandwich: bool = True, distill: bool = True):
        if per_channel:
            raise BitfoldError("mebqat uses per-tensor learned thresholds", "drop --per-channel")
        super().__init__(per_channel=False)
        if quantizer not in ("lsq", "dorefa"):
            raise BitfoldError(f"unknown MEBQAT quantizer {quantizer!r}", "choose lsq or dorefa")
        cands = sorted({int(c) for c in candidates})
        if not cands or any(not 2 <= c <= 8 for c in cands):
            raise BitfoldError(f"MEBQAT candidates {candidates} must be integers in 2..8")
        if tasks_per_step < 1:
            raise BitfoldError("tasks_per_step must be >= 1")
        self.quantizer, self.candidates, self.tasks_per_step = quantizer, cands, int(tasks_per_step)
        self.high_bits = int(high_bits)
        for k, v in (("sandwich", sandwich), ("distill", distill)):
            if not isinstance(v, bool):
                raise BitfoldError(f"MEBQAT {k} must be true or false, got {v!r}", f"--opt {k}=false")
        self.sandwich, self.distill = sandwich, distill
        self._wq, self._aq_u, self._aq_s = _quantizers(quantizer)
        self.edges: set[str] = set()
        # model -> (its switches, its edge layers): module walks, cached per model (walking a model's
        # modules at every task cost more than the task's quantizers on a small network)
        self._walks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def options(self) -> dict:
        return {"quantizer": self.quantizer, "candidates": self.candidates, "tasks_per_step": self.tasks_per_step,
                "high_bits": self.high_bits, "sandwich": self.sandwich, "distill": self.distill}

    def weight_kwargs(self, layer, bits):
        return {"weight_quant": self._wq, "weight_bit_width": bits}

    def act_kwargs(self, site, bits, signed):
        return {"act_quant": self._aq_s if signed else self._aq_u, "bit_width": bits, "collect_stats_steps": 16}

    def prepare_layer(self, name, layer, bits):
        if self.quantizer == "dorefa":
            from bitfold.toolchain.adaqat import TanhNormalize
            parametrize.register_parametrization(layer, "weight", TanhNormalize())
        return layer

    # -- switching -------------------------------------------------------------------------------
    def _walk(self, model) -> tuple[list, list, set[str]]:
        """([(layer, its weight width)], [(first layer fed, the site's width)], {first, last layer})."""
        if model not in self._walks:
            layers = compute_layers(model)
            names = list(layers)
            self._walks[model] = ([(n, _bw(l.weight_quant)) for n, l in layers.items()],
                                  [(f[0], _bw(s.act_quant)) for f, s in act_sites(model).items()],
                                  {names[0], names[-1]})
        return self._walks[model]

    def edge_layers(self, model) -> set[str]:
        """The first and last compute layers: they keep the run's widths in every task."""
        return self._walk(model)[2]

    def set_map(self, model, bit_map) -> None:
        """Write every layer's weight width and every site's width from ``{layer: LayerBits}`` (any
        width: the high-precision task's 16 bit included)."""
        weights, sites, _ = self._walk(model)
        for name, bw in weights:
            bw.bits.fill_(float(bit_map[name].w))
        for first, bw in sites:
            bw.bits.fill_(float(bit_map[first].a))

    def uniform_map(self, model, w: int, a: int) -> dict:
        """(w, a) on every layer except the first/last, which keep the run's widths."""
        base, edges = model.bit_map, self.edge_layers(model)
        return {n: (base[n] if n in edges else LayerBits(w, a)) for n in base}

    def bit_map(self, model):
        out = {}
        sites = {f: s for k, s in act_sites(model).items() for f in k}
        for name, layer in compute_layers(model).items():
            out[name] = LayerBits(int(_bw(layer.weight_quant).bits), int(_bw(sites[name].act_quant).bits))
        return out

    # -- meta-training ---------------------------------------------------------------------------
    def tasks(self, step: int) -> list[tuple[int, int]]:
        """This step's (w, a) tasks. With ``sandwich`` (and >= 2 tasks a step) the high-precision
        task and the lowest-width task come first in every step, the rest drawn from the other
        pairs; otherwise all are drawn from candidates^2 + the high-precision task."""
        g = torch.Generator().manual_seed(1000003 + step)
        high, low = (self.high_bits, self.high_bits), (self.candidates[0], self.candidates[0])
        pool = [(w, a) for w in self.candidates for a in self.candidates] + [high]
        if self.sandwich and self.tasks_per_step >= 2:
            fixed = [high] + ([low] if low != high else [])
            rest = [p for p in pool if p not in fixed]
            idx = torch.randperm(len(rest), generator=g)[: max(0, self.tasks_per_step - len(fixed))].tolist()
            return fixed + [rest[i] for i in idx]
        idx = torch.randperm(len(pool), generator=g)[: self.tasks_per_step].tolist()
        return [pool[i] for i in idx]

    def backward_step(self, net, model, x, y, step):
        """One meta step: each task's loss backpropagated into the shared weights (averaged). With
        ``distill``, a quantized task that follows the high-precision one in the step learns the
        high-precision task's output distribution (KL to its detached softmax) instead of the labels."""
        base = model.bit_map
        total, teacher = 0.0, None
        tasks = self.tasks(step)
        edges = self.edge_layers(model)
        for w, a in tasks:
            m = {n: (base[n] if n in edges else LayerBits(w, a)) for n in base}
            self.set_map(model, m)
            logits = net(x)
            if (w, a) == (self.high_bits, self.high_bits):
                loss = F.cross_entropy(logits, y)
                teacher = logits.detach() if self.distill else None
            elif teacher is not None:
                loss = F.kl_div(F.log_softmax(logits, 1), F.softmax(teacher, 1), reduction="batchmean")
            else:
                loss = F.cross_entropy(logits, y)
            loss = loss / len(tasks)
            loss.backward()
            total += float(loss)
        self.set_map(model, base)
        return torch.tensor(total)

    def deploy(self, model, bit_map, x_calib):
        self.set_map(model, bit_map)
        model.bit_map = dict(bit_map)
        reestimate_bn(model, x_calib)
        return model

    def for_export(self, model):
        import copy
        m = copy.deepcopy(model)
        return bake_parametrizations(m)
