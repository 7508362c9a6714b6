"""Training-step time of AdaQAT (learned widths, cost loss) vs the fixed-width Brevitas model.

    python benchmarks/adaqat_overhead.py [--steps 20] [--threads 2]

Both models (digits CNN, batch 64) are stepped in interleaved rounds; the ratio of medians is
printed for the STE estimator (default) and the finite-difference estimator (2 extra forwards).
Target: AdaQAT(ste) <= 1.25x fixed.
"""
from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")


def make_step(name, shape, batch, method, **opts):
    from bitfold.toolchain.describe import describe_layers
    from bitfold.toolchain.models import build_model
    from bitfold.toolchain.train import init_activation_stats
    torch.manual_seed(0)
    model = build_model(name, shape, 10, bits="w8a8" if method == "adaqat" else "w4a4", method=method, **opts)
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    init_activation_stats(model, x, batch)
    qm = model.quant_method
    qm.setup(model, describe_layers(model, shape))
    opt = torch.optim.Adam(qm.param_groups(model, 1e-3, 0.0))
    state = {"step": 0}

    def step():
        loss = F.cross_entropy(model(x), y)
        extra = qm.extra_loss(model, state["step"], (x, y), loss)
        total = loss if extra is None else loss + extra
        opt.zero_grad()
        total.backward()
        opt.step()
        qm.after_step(model, state["step"])
        state["step"] += 1
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shape, batch = (1, 8, 8), 64
    fns = {"fixed": make_step("cnn", shape, batch, "fixed"),
           "adaqat-ste": make_step("cnn", shape, batch, "adaqat", estimator="ste"),
           "adaqat-fd": make_step("cnn", shape, batch, "adaqat", estimator="fd")}
    from _timing import interleaved
    med = interleaved(fns, args.rounds, args.steps)
    print(f"digits CNN, batch {batch}, {args.threads} threads, median of {args.rounds} interleaved rounds")
    for k, v in med.items():
        print(f"{k:<12} {v * 1e3:8.2f} ms/step   {v / med['fixed']:.2f}x fixed")


if __name__ == "__main__":
    main()
