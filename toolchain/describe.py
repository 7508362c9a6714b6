"""Layer descriptions: the one graph walk over a (Brevitas or float) model that export, the cost
models and the backends share.

A forward pass on one example records, for every compute layer, its kind, shapes, MACs and
weight count, and which activation site feeds it.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from bitfold.hw_models.layers import LayerDesc
from bitfold.toolchain.quant import act_sites, compute_layers


def describe_layers(model: nn.Module, input_shape: Sequence[int]) -> list[LayerDesc]:
    layers = compute_layers(model)
    site_of = {}
    for key in act_sites(model):
        for layer in key:
            site_of[layer] = key
    shapes: dict[str, tuple] = {}
    hooks = []
    for name, mod in layers.items():
        def hook(m, inp, out, name=name):
            x = inp[0]
            x = getattr(x, "value", x)  # QuantTensor -> tensor
            shapes[name] = (tuple(x.shape[1:]), tuple(out.shape[1:]))
        hooks.append(mod.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            p = next(model.parameters())
            model(torch.zeros((1, *input_shape), dtype=p.dtype, device=p.device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    out = []
    for name, mod in layers.items():
        in_s, out_s = shapes[name]
        wc = mod.weight.numel()
        if isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            macs = (mod.in_channels // mod.groups) * kh * kw * out_s[0] * out_s[1] * out_s[2]
            d = LayerDesc(name, "conv", in_s, out_s, mod.in_channels, mod.out_channels, (kh, kw),
                          tuple(mod.stride), mod.groups, int(macs), wc, site_of.get(name))
        elif isinstance(mod, nn.Linear):
            d = LayerDesc(name, "linear", in_s, out_s, mod.in_features, mod.out_features, (1, 1), (1, 1), 1,
                          mod.in_features * mod.out_features, wc, site_of.get(name))
        else:  # pragma: no cover - builders only create Conv2d/Linear
            raise TypeError(f"unsupported compute layer {type(mod).__name__}")
        out.append(d)
    return out
