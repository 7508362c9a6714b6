"""Training-step time of AdaQAT (learned widths, cost loss) vs the fixed-width model.

    python benchmarks/adaqat_overhead.py [--steps 20] [--threads 2] [--model cnn|mlp] [--size 8] [--parts]

Both models (batch 64; default the CNN at 8x8) are stepped as the trainer steps them (fused quantizers,
the method's parameter groups) in interleaved rounds; the ratio of medians is printed for the STE
estimator (default) and the finite-difference estimator (2 extra forwards). ``--parts``: two more
AdaQAT rows, without its cost penalty, and without the penalty and the widths' own step - what those
two per-step parts cost - and one with the penalty as the cost model's graph instead of one node
(``fuse_penalty=False``: the path before ProductCost). Target: AdaQAT(ste) <= 1.25x fixed.
"""
from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")


def make_step(name, shape, batch, method, penalty=True, width_step=True, fuse_penalty=True, **opts):
    from bitfold.toolchain.describe import describe_layers
    from bitfold.toolchain.fastquant import fast_quant
    from bitfold.toolchain.models import build_model
    from bitfold.toolchain.train import init_activation_stats, make_optimizer
    torch.manual_seed(0)
    model = build_model(name, shape, 10, bits="w8a8" if method == "adaqat" else "w4a4", method=method, **opts)
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    init_activation_stats(model, x, batch)
    qm = model.quant_method
    qm.setup(model, describe_layers(model, shape))
    if hasattr(qm, "fuse_penalty"):
        qm.fuse_penalty = fuse_penalty
    opt = make_optimizer(qm.param_groups(model, 1e-3, 0.0))
    fused = fast_quant(model)
    fused.__enter__()      # for as long as the step function lives (it holds `fused`)
    state = {"step": 0, "fused": fused}

    def step():
        loss = F.cross_entropy(model(x), y)
        extra = qm.extra_loss(model, state["step"], (x, y), loss) if penalty else None
        total = loss if extra is None else loss + extra
        opt.zero_grad()
        total.backward()
        opt.step()
        if width_step:
            qm.after_step(model, state["step"])
        state["step"] += 1
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="cnn", choices=["cnn", "mlp"])
    ap.add_argument("--size", type=int, default=8, help="input height and width")
    ap.add_argument("--parts", action="store_true", help="also AdaQAT without its penalty / width step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shape, batch, net = (1, args.size, args.size), 64, args.model
    fns = {"fixed": make_step(net, shape, batch, "fixed"),
           "adaqat-ste": make_step(net, shape, batch, "adaqat", estimator="ste"),
           "adaqat-fd": make_step(net, shape, batch, "adaqat", estimator="fd")}
    if args.parts:
        fns["ste-graph-penalty"] = make_step(net, shape, batch, "adaqat", fuse_penalty=False, estimator="ste")
        fns["ste-no-penalty"] = make_step(net, shape, batch, "adaqat", penalty=False, estimator="ste")
        fns["ste-neither"] = make_step(net, shape, batch, "adaqat", penalty=False, width_step=False, estimator="ste")
    from _timing import interleaved
    med = interleaved(fns, args.rounds, args.steps)
    print(f"{net} {args.size}x{args.size}, batch {batch}, {args.threads} threads, median of {args.rounds} "
          "interleaved rounds")
    for k, v in med.items():
        print(f"{k:<15} {v * 1e3:8.2f} ms/step   {v / med['fixed']:.2f}x fixed")


if __name__ == "__main__":
    main()
