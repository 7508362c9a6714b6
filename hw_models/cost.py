"""The cost-model protocol and the two analytic baselines (BitOPs, weight memory).

A cost model takes the model's layer descriptions (:func:`bitfold.toolchain.describe.describe_layers`)
and per-layer ``(b_w, b_a)`` as tensors, and returns a differentiable scalar plus a per-layer
breakdown. Measured per-board tables implement the same protocol, so a training loss never knows
which one it is using.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch

from bitfold.core.errors import BitfoldError

Bits = Mapping[str, tuple]  # layer -> (b_w, b_a), floats or 0-d tensors


@dataclass
class CostResult:
    total: torch.Tensor
    per_layer: dict[str, torch.Tensor]
    unit: str

    def as_floats(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.per_layer.items()}


@runtime_checkable
class CostModel(Protocol):
    name: str
    unit: str

    def __call__(self, layers: Sequence, bits: Bits) -> CostResult: ...


def _t(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.tensor(float(x))


class _PerLayerCost:
    """A cost that is a sum over layers of ``fn(layer, b_w, b_a)``. ``coef``/``acts``: where ``fn``
    is the product ``coef(layer) * b_w * b_a`` (``acts``) or ``coef(layer) * b_w``, written in
    that order, its form - a training loss may then evaluate it as one fused node (AdaQAT's
    penalty: :class:`bitfold.toolchain.adaqat.ProductCost`)."""

    def __init__(self, name: str, unit: str, fn: Callable, coef: Callable | None = None, acts: bool = True):
        self.name, self.unit, self._fn = name, unit, fn
        self.coef, self.acts = coef, acts

    def __call__(self, layers, bits) -> CostResult:
        per = {}
        for d in layers:
            bw, ba = bits[d.name]
            per[d.name] = self._fn(d, _t(bw), _t(ba))
        total = torch.stack(list(per.values())).sum() if per else torch.tensor(0.0)
        return CostResult(total, per, self.unit)

    def __repr__(self):
        return f"CostModel({self.name}, {self.unit})"


bitops = _PerLayerCost("bitops", "BitOPs", lambda d, bw, ba: d.macs * bw * ba, coef=lambda d: d.macs)
weight_bits = _PerLayerCost("weight_bits", "bit", lambda d, bw, ba: d.weight_count * bw,
                            coef=lambda d: d.weight_count, acts=False)

COST_MODELS: dict[str, CostModel] = {"bitops": bitops, "weight_bits": weight_bits}


def register_cost_model(model: CostModel) -> CostModel:
    COST_MODELS[model.name] = model
    return model


def get_cost_model(name: str) -> CostModel:
    """A registered cost model, a board's table (``ulx3s-85f``), or a table file (``path/to/table.json``)."""
    if name in COST_MODELS:
        return COST_MODELS[name]
    if name == "energy" or name.startswith("energy-"):
        from bitfold.hw_models.energy import load_energy
        return load_energy(name)
    if name.endswith(".json"):
        from bitfold.hw_models.table import load_table_file
        return load_table_file(name)
    from bitfold.boards import known_boards
    if name in known_boards():
        from bitfold.hw_models.table import find_table
        table = find_table(name)
        if table is not None:
            return table
        raise BitfoldError(f"no cost table for board {name!r} yet",
                           f"measure one with `bitfold hw measure --board {name}` (then `bitfold hw fit`), "
                           f"or use one of: {', '.join(COST_MODELS)}")
    raise BitfoldError(f"unknown cost model {name!r}",
                       f"choose one of: {', '.join(COST_MODELS)}, energy, or a board name")


def model_costs(layers, bit_map) -> dict:
    """BitOPs and weight memory of a fixed integer bit map (``{layer: LayerBits}``), as plain numbers."""
    bits = {k: (v.w, v.a) for k, v in bit_map.items()}
    return {"bitops": float(bitops(layers, bits).total), "weight_bits": float(weight_bits(layers, bits).total)}
