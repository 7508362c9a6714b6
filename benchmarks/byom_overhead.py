"""Bring-your-own-model: conversion time, and QAT step time of a converted model vs the same
network hand-built from Brevitas layers, measured side by side.

    python benchmarks/byom_overhead.py [--steps 20]

The float twin of bitfold's digits CNN is converted by ``bitfold.quantize`` (torch.fx + bitfold's
site rules) and compared with ``build_model("cnn", bits="w4a4")`` - the same layers and widths.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")


def main():
    import bitfold
    from bitfold.toolchain.models import build_model
    from bitfold.toolchain.train import init_activation_stats
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(2)
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    conv_t = []
    for _ in range(5):
        fp = build_model("cnn", (1, 8, 8), 10, method="float")
        t = time.perf_counter()
        conv = bitfold.quantize(fp, "fixed", "w4a4", example_input=torch.zeros(1, 1, 8, 8))
        conv_t.append(time.perf_counter() - t)
    hand = build_model("cnn", (1, 8, 8), 10, bits="w4a4")
    assert {k: v for k, v in conv.bit_map.items()} == hand.bit_map
    fns = {}
    for name, m in (("hand-built", hand), ("converted", conv)):
        init_activation_stats(m, x, 64)
        opt = torch.optim.Adam(m.parameters(), 1e-3)

        def fn(m=m, opt=opt):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        fns[name] = fn
    from _timing import interleaved
    med = interleaved(fns, 7, args.steps)
    print(f"conversion (torch.fx trace + rewrite), digits CNN: median {statistics.median(conv_t) * 1e3:.0f} ms")
    print(f"QAT step: hand-built {med['hand-built'] * 1e3:.2f} ms, converted {med['converted'] * 1e3:.2f} ms -> "
          f"{med['converted'] / med['hand-built']:.2f}x")


if __name__ == "__main__":
    main()
