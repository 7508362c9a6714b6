"""One-layer probe models: the smallest bitfold model (input quantizer + one Conv/Linear) at given
widths, calibrated and ready to export. The backends' measurement drivers build cost-table rows
from them."""
from __future__ import annotations

import torch
import torch.nn as nn


class OneLayer(nn.Module):
    def __init__(self, qb, kind, shape, unsigned_input: bool = False):
        super().__init__()
        self.inp = qb.act("layer", relu=unsigned_input)
        if kind == "conv":
            cin, cout, _ = shape
            self.layer = qb.conv("layer", cin, cout, 3, padding=1)
        else:
            self.layer = qb.linear("layer", shape[0], shape[1])

    def forward(self, x):
        return self.layer(self.inp(x))


def one_layer_model(kind, shape, b_w, b_a, unsigned_input: bool = False):
    """``unsigned_input``: the input quantizer after a ReLU (a hidden layer's input, unsigned codes)
    instead of a signed one (a network's first layer)."""
    from bitfold.toolchain.bitmap import LayerBits
    from bitfold.toolchain.quant import LayerBuilder, get_method
    from bitfold.toolchain.train import init_activation_stats
    torch.manual_seed(0)
    qm = get_method("fixed")
    m = OneLayer(LayerBuilder(qm, {"layer": LayerBits(b_w, b_a)}), kind, shape, unsigned_input)
    m.bit_map, m.quant_method = {"layer": LayerBits(b_w, b_a)}, qm
    in_shape = (shape[0], shape[2], shape[2]) if kind == "conv" else (shape[0],)
    init_activation_stats(m, torch.randn(64, *in_shape), 64)
    return m.eval(), in_shape
