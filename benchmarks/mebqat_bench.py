"""MEBQAT vs dedicated fixed-width QAT on digits, and the meta-training step cost.

    python benchmarks/mebqat_bench.py [--epochs 15] [--out runs/mebqat_bench]

1. Step time: one MEBQAT step (K sampled bit-width tasks) vs one fixed W4A4 step, interleaved
   rounds, ratio total and per task.
2. Accuracy: one MEBQAT model (trained once) evaluated at each (w, a) pair vs a dedicated
   fixed-width run per pair (same epochs, first/last layer 8 bit in both).
"""
from __future__ import annotations

import argparse
import shutil
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


def step_times(rounds=5, steps=10):
    from bitfold.toolchain.describe import describe_layers
    from bitfold.toolchain.models import build_model
    from bitfold.toolchain.train import init_activation_stats
    import torch.nn.functional as F
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    fns = {}
    for name, method in (("fixed", "fixed"), ("mebqat", "mebqat")):
        torch.manual_seed(0)
        m = build_model("cnn", (1, 8, 8), 10, bits="w4a4", method=method)
        init_activation_stats(m, x, 64)
        qm = m.quant_method
        qm.setup(m, describe_layers(m, (1, 8, 8)))
        opt = torch.optim.Adam(m.parameters(), 1e-3)
        state = {"s": 0}

        def fn(m=m, qm=qm, opt=opt, state=state):
            opt.zero_grad()
            if qm.backward_step(m, m, x, y, state["s"]) is None:
                F.cross_entropy(m(x), y).backward()
            opt.step()
            state["s"] += 1
        fns[name] = (fn, qm)
    from _timing import interleaved
    med = interleaved({k: fn for k, (fn, _) in fns.items()}, rounds, steps)
    k = fns["mebqat"][1].tasks_per_step
    return med, k


def main():
    from bitfold.app.sweep import train_runs
    from bitfold.toolchain.runs import TrainConfig
    from bitfold.toolchain.select_bits import eval_table
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--out", type=Path, default=Path("runs/mebqat_bench"))
    ap.add_argument("--pairs", default="2x2,3x3,4x4,8x8,2x4,4x2")
    ap.add_argument("--scheduler", default=None, help="Dask scheduler HOST:PORT; 'inprocess' runs here "
                    "(default: a local cluster on the free cores)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    med, k = step_times()
    r = med["mebqat"] / med["fixed"]
    print(f"step time: fixed {med['fixed'] * 1e3:.2f} ms, mebqat ({k} tasks) {med['mebqat'] * 1e3:.2f} ms -> "
          f"{r:.2f}x total, {r / k:.2f}x per task")
    if args.out.exists():
        shutil.rmtree(args.out)
    pairs = [tuple(int(v) for v in p.split("x")) for p in args.pairs.split(",")]
    # the meta model and every dedicated run: one Dask task each (bitfold.app.sweep.train_runs)
    runs = train_runs([(TrainConfig(model="cnn", bits="w8a8", method="mebqat", epochs=args.epochs), args.out / "meta")]
                      + [(TrainConfig(model="cnn", bits=f"w{w}a{a}", epochs=args.epochs), args.out / f"fixed_w{w}a{a}")
                         for w, a in pairs], args.scheduler)
    meta = {(r["w"], r["a"]): r["accuracy"] for r in eval_table(args.out / "meta", pairs)}
    print(f"{'w/a':<6}{'dedicated fixed':>16}{'MEBQAT (one model)':>20}{'diff':>8}")
    for (w, a), m in zip(pairs, runs[1:]):
        print(f"W{w}A{a:<4}{m['accuracy']:>16.2%}{meta[(w, a)]:>20.2%}{(meta[(w, a)] - m['accuracy']) * 100:>+7.2f}")


if __name__ == "__main__":
    main()
