"""Model registry. Each model is a function ``(builder, input_shape, num_classes) -> nn.Module``
that gets all compute layers and activation sites from the builder, so the same code builds the
float twin (:class:`~bitfold.toolchain.quant.FloatBuilder`) and any quantized variant.

Layer names passed to the builder equal the modules' attribute paths; they are the keys of the
bit map.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from bitfold.toolchain.bitmap import BitMap, LayerBits
from bitfold.core.errors import BitfoldError
from bitfold.toolchain.quant import FloatBuilder, LayerBuilder, QuantMethod, get_method

MODELS: dict[str, Callable] = {}


def register_model(name: str):
    def deco(fn):
        MODELS[name] = fn
        return fn
    return deco


class MLP(nn.Module):
    """TFC-like multilayer perceptron: input quantizer, 3 hidden layers of 64, BN + quantized ReLU
    (dropout after the input quantizer and every hidden activation when ``dropout`` > 0; with
    ``center`` the input in [0, 1] is mapped to [-1, 1] before its quantizer, as FINN's classics do,
    so that a 1-bit (sign) input quantizer sees both signs)."""

    def __init__(self, qb, input_shape, num_classes, hidden=(64, 64, 64), dropout: float = 0.0,
                 center: bool = False):
        super().__init__()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.center = center
        in_f = 1
        for d in input_shape:
            in_f *= d
        widths = [in_f, *hidden]
        self.inp = qb.act("fcs.0", relu=False)
        self.fcs = nn.ModuleList()
        self.bns = nn.ModuleList()
        self.acts = nn.ModuleList()
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            self.fcs.append(qb.linear(f"fcs.{i}", a, b, bias=False))
            self.bns.append(nn.BatchNorm1d(b))
            self.acts.append(qb.act(f"fcs.{i + 1}" if i + 1 < len(hidden) else "head"))
        self.head = qb.linear("head", widths[-1], num_classes, bias=True)

    def forward(self, x):
        x = torch.flatten(x, 1)
        x = self.drop(self.inp(2.0 * x - 1.0 if self.center else x))
        for fc, bn, act in zip(self.fcs, self.bns, self.acts):
            x = self.drop(act(bn(fc(x))))
        return self.head(x)


class CNN(nn.Module):
    """Small conv net for 8x8 (digits), 28x28 (MNIST) and 32x32 (CIFAR) inputs.

    conv-BN-quantReLU blocks of 16/32/64 channels, 2x2 max-pooling after the 2nd and 3rd block
    (and after the 1st when the input is at least 16 pixels wide), then one linear classifier.
    """

    def __init__(self, qb, input_shape, num_classes, channels=(16, 32, 64)):
        super().__init__()
        c_in, h, _ = input_shape
        names = [f"convs.{i}" for i in range(len(channels))] + ["head"]
        self.inp = qb.act(names[0], relu=False)
        self.convs, self.bns, self.acts, self.pools = (nn.ModuleList() for _ in range(4))
        for i, c in enumerate(channels):
            self.convs.append(qb.conv(names[i], c_in, c, 3, padding=1))
            self.bns.append(nn.BatchNorm2d(c))
            self.acts.append(qb.act(names[i + 1]))
            pool = i > 0 or h >= 16
            self.pools.append(nn.MaxPool2d(2) if pool else nn.Identity())
            h = h // 2 if pool else h
            c_in = c
        self.head = qb.linear("head", c_in * h * h, num_classes)

    def forward(self, x):
        x = self.inp(x)
        for conv, bn, act, pool in zip(self.convs, self.bns, self.acts, self.pools):
            x = pool(act(bn(conv(x))))
        return self.head(torch.flatten(x, 1))


class BasicBlock(nn.Module):
    """CIFAR ResNet basic block; projection shortcut (1x1 conv + BN) when the shape changes."""

    def __init__(self, qb, prefix, in_ch, out_ch, stride, next_feeds):
        super().__init__()
        self.conv1 = qb.conv(f"{prefix}.conv1", in_ch, out_ch, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.act1 = qb.act(f"{prefix}.conv2")
        self.conv2 = qb.conv(f"{prefix}.conv2", out_ch, out_ch, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(out_ch)
        if stride != 1 or in_ch != out_ch:
            self.shortcut = qb.conv(f"{prefix}.shortcut", in_ch, out_ch, 1, stride, 0)
            self.shortcut_bn = nn.BatchNorm2d(out_ch)
        else:
            self.shortcut = None
        self.act2 = qb.act(next_feeds)  # the block output feeds the next block (or the pool/head)

    def forward(self, x):
        y = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        s = x if self.shortcut is None else self.shortcut_bn(self.shortcut(x))
        return self.act2(y + s)


class ResNet20(nn.Module):
    """ResNet-20 for CIFAR (He et al. 2016): 3 stages x 3 basic blocks, 16/32/64 channels."""

    def __init__(self, qb, input_shape, num_classes, blocks=3, widths=(16, 32, 64)):
        super().__init__()
        self.inp = qb.act("conv0", relu=False)
        self.conv0 = qb.conv("conv0", input_shape[0], widths[0], 3, 1, 1)
        self.bn0 = nn.BatchNorm2d(widths[0])
        plan = []  # (prefix, in, out, stride)
        in_ch = widths[0]
        for s, w in enumerate(widths):
            for b in range(blocks):
                plan.append((f"layer{s + 1}.{b}", in_ch, w, 2 if (b == 0 and s > 0) else 1))
                in_ch = w

        def feeds_of(i):  # the layers that read block i's input
            prefix, cin, cout, stride = plan[i]
            f = [f"{prefix}.conv1"]
            if stride != 1 or cin != cout:
                f.append(f"{prefix}.shortcut")
            return tuple(f)

        self.act0 = qb.act(feeds_of(0))
        layers = {}
        for i, (prefix, cin, cout, stride) in enumerate(plan):
            nxt = feeds_of(i + 1) if i + 1 < len(plan) else ("head",)
            layers.setdefault(prefix.split(".")[0], []).append(
                BasicBlock(qb, prefix, cin, cout, stride, nxt))
        self.layer1, self.layer2, self.layer3 = (nn.Sequential(*layers[k]) for k in ("layer1", "layer2", "layer3"))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.pool_q = qb.act("head", relu=False)  # the average is off-grid: quantize it again
        self.head = qb.linear("head", widths[-1], num_classes)

    def forward(self, x):
        x = self.act0(self.bn0(self.conv0(self.inp(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.head(torch.flatten(self.pool_q(self.pool(x)), 1))


class CNV(nn.Module):
    """FINN's CNV (Umuroglu et al., FINN, 2017) for 32x32 inputs: six 3x3 convolutions without
    padding (64, 64, 128, 128, 256, 256 channels; 2x2 max-pooling after the 2nd and 4th), two fully
    connected layers of 512 and the classifier; BN + quantized activation after every hidden layer."""

    CONVS = ((64, False), (64, True), (128, False), (128, True), (256, False), (256, False))
    FCS = (512, 512)

    def __init__(self, qb, input_shape, num_classes):
        super().__init__()
        c_in, h, w = input_shape
        for _, pool in self.CONVS:
            h, w = h - 2, w - 2
            h, w = (h // 2, w // 2) if pool else (h, w)
        if min(h, w) < 1:
            raise BitfoldError(f"cnv needs inputs of at least 32x32 pixels (CIFAR-10), got {input_shape[1]}x{input_shape[2]}",
                               "use --model tfc|sfc|lfc or cnn for 28x28 data sets")
        names = [f"convs.{i}" for i in range(len(self.CONVS))] + [f"fcs.{i}" for i in range(len(self.FCS))] + ["head"]
        self.inp = qb.act(names[0], relu=False)
        self.convs, self.cbns, self.cacts, self.pools = (nn.ModuleList() for _ in range(4))
        for i, (c, pool) in enumerate(self.CONVS):
            self.convs.append(qb.conv(names[i], c_in, c, 3))
            self.cbns.append(nn.BatchNorm2d(c))
            self.cacts.append(qb.act(names[i + 1]))
            self.pools.append(nn.MaxPool2d(2) if pool else nn.Identity())
            c_in = c
        f_in = c_in * h * w
        self.fcs, self.fbns, self.facts = (nn.ModuleList() for _ in range(3))
        for i, f in enumerate(self.FCS):
            k = len(self.CONVS) + i
            self.fcs.append(qb.linear(names[k], f_in, f, bias=False))
            self.fbns.append(nn.BatchNorm1d(f))
            self.facts.append(qb.act(names[k + 1]))
            f_in = f
        self.head = qb.linear("head", f_in, num_classes)

    def forward(self, x):
        x = self.inp(x)
        for conv, bn, act, pool in zip(self.convs, self.cbns, self.cacts, self.pools):
            x = pool(act(bn(conv(x))))
        x = torch.flatten(x, 1)
        for fc, bn, act in zip(self.fcs, self.fbns, self.facts):
            x = act(bn(fc(x)))
        return self.head(x)


def _fc_classic(hidden):
    """FINN's fully connected classics (FINN paper, BNN-PYNQ): ``hidden`` layers, dropout 0.2, input
    mapped from [0, 1] to [-1, 1] (MNIST-like data)."""
    def factory(qb, input_shape, num_classes):
        return MLP(qb, input_shape, num_classes, hidden=hidden, dropout=0.2, center=True)
    return factory


register_model("mlp")(MLP)
#: FINN's classic networks (widths as in FINN's examples: W1A1, W1A2, W2A2 - `--bits w1a1:all`); 1-bit
#: weights and activations are bipolar, the activations at FINN's scale 1 (see FixedMethod).
register_model("tfc")(_fc_classic((64, 64, 64)))
register_model("sfc")(_fc_classic((256, 256, 256)))
register_model("lfc")(_fc_classic((1024, 1024, 1024, 1024)))
register_model("cnv")(CNV)
register_model("cnn")(CNN)
register_model("resnet20")(ResNet20)


def layer_names(model_name: str, input_shape, num_classes) -> list[str]:
    fb = FloatBuilder()
    _factory(model_name)(fb, tuple(input_shape), num_classes)
    return fb.layer_names


def _factory(name):
    if name not in MODELS:
        raise BitfoldError(f"unknown model {name!r}", f"choose one of: {', '.join(MODELS)}")
    return MODELS[name]


def build_model(name: str, input_shape, num_classes: int, bits="w8a8",
                method: str | QuantMethod = "fixed", weights: str | None = None, **method_options) -> nn.Module:
    """Build a registered model.

    ``method="float"`` gives the plain-torch twin; otherwise ``bits`` (shorthand, dict, JSON path
    or :class:`BitMap`) is resolved against the model's layers and the method's quantizers are used.
    The resolved map is kept on the model as ``model.bit_map`` (``{layer: LayerBits}``).
    ``name`` may also be a user model ``path/to/file.py:factory`` (converted by
    :func:`bitfold.toolchain.convert.quantize`), optionally started from float ``weights``.
    """
    input_shape = tuple(input_shape)
    from bitfold.toolchain.convert import build_user_float, is_user_model, quantize
    if is_user_model(name):
        float_model = build_user_float(name, input_shape, num_classes, weights)
        if method == "float":
            float_model.bit_map = None
            float_model.model_name = name
            return float_model
        model = quantize(float_model, method, bits, torch.zeros((1, *input_shape)), **method_options)
        model.model_name = name
        return model
    if weights:
        raise BitfoldError("--weights applies to user models (--model file.py:factory)",
                           "zoo models start from random initialisation")
    factory = _factory(name)
    if method == "float":
        fb = FloatBuilder()
        model = factory(fb, input_shape, num_classes)
        model.bit_map = None
    else:
        names = layer_names(name, input_shape, num_classes)
        resolved = BitMap.parse(bits).resolve(names)
        qm = method if isinstance(method, QuantMethod) else get_method(method, **method_options)
        for lname, lb in resolved.items():
            lo, hi = qm.weight_bits_range
            if not lo <= lb.w <= hi:
                raise BitfoldError(f"method {qm.name!r} cannot quantize weights of {lname} to {lb.w} bit",
                                   f"use {lo}..{hi}")
        model = factory(LayerBuilder(qm, resolved), input_shape, num_classes)
        model.bit_map = resolved
        model.quant_method = qm
    # developer check: bit-map names must be the modules' attribute paths
    for path, mod in model.named_modules():
        if hasattr(mod, "_bitfold_layer") and mod._bitfold_layer != path:
            raise AssertionError(f"model {name}: layer named {mod._bitfold_layer!r} lives at {path!r}")
    model.model_name = name
    return model


def bits_of(model) -> dict[str, LayerBits]:
    return dict(model.bit_map or {})
