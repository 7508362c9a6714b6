"""Training-step time: plain torch FP vs Brevitas fixed-bit QAT, measured side by side.

    python benchmarks/qat_overhead.py [--steps 30] [--threads 2]

For the digits CNN (8x8) and ResNet-20 on synthetic 32x32 batches, FP and W4A4 steps are
interleaved in rounds so machine noise hits both alike; the ratio of medians is printed.
"""
from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")


def step_fn(model, x, y):
    opt = torch.optim.Adam(model.parameters(), 1e-3)

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def measure(builds, batch, steps, rounds=5):
    from _timing import interleaved

    from bitfold.toolchain.train import init_activation_stats
    fns = {}
    for name, (model, shape) in builds.items():
        x = torch.randn(batch, *shape)
        y = torch.randint(0, 10, (batch,))
        if getattr(model, "bit_map", None):
            init_activation_stats(model, x, batch)
        model.train()
        fns[name] = step_fn(model, x, y)
    return interleaved(fns, rounds, steps)


def main():
    from bitfold.toolchain.models import build_model
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; median step time over 5 interleaved rounds")
    print(f"{'model':<28}{'FP ms':>10}{'W4A4 ms':>10}{'ratio':>8}")
    for name, shape, batch in (("cnn", (1, 8, 8), 64), ("resnet20", (3, 32, 32), 32)):
        builds = {"fp": (build_model(name, shape, 10, method="float"), shape),
                  "q": (build_model(name, shape, 10, bits="w4a4"), shape)}
        m = measure(builds, batch, args.steps if name == "cnn" else max(3, args.steps // 4))
        print(f"{name + ' ' + 'x'.join(map(str, shape)) + f' b{batch}':<28}{m['fp'] * 1e3:>10.2f}"
              f"{m['q'] * 1e3:>10.2f}{m['q'] / m['fp']:>7.2f}x")


if __name__ == "__main__":
    main()
