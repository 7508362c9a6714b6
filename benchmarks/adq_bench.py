"""ADQ on digits: accuracy vs average weight bits against fixed uniform, and step overhead.

    python benchmarks/adq_bench.py [--epochs 15] [--seeds 0 1 2] [--out runs/adq_bench]

Average bits = weight memory / weight count over the whole network (first/last layer at 8 bit
in every row). Rows: fixed uniform W2/W3/W4 (A4), adq uniform W2/W3/W4 (A4), and adq with a
Fisher allocation under an average of 3 bits (trained W4 -> allocate -> continue training).
"""
from __future__ import annotations

import argparse
import json
import shutil
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


def step_ratio(rounds=7, steps=15):
    from _timing import train_step_times
    return train_step_times({"fixed": ("fixed", {}), "adq": ("adq", {})}, "w3a4", rounds=rounds, steps=steps)


def main():
    from bitfold.app.sweep import train_runs
    from bitfold.toolchain.adq import allocate_run
    from bitfold.toolchain.runs import TrainConfig
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--out", type=Path, default=Path("runs/adq_bench"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="every row is trained once per seed; the table gives mean, std and each seed")
    ap.add_argument("--scheduler", default=None, help="Dask scheduler HOST:PORT; 'inprocess' runs here "
                    "(default: a local cluster on the free cores)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    med = step_ratio()
    print(f"step time: fixed {med['fixed'] * 1e3:.2f} ms, adq {med['adq'] * 1e3:.2f} ms -> "
          f"{med['adq'] / med['fixed']:.2f}x")
    if args.out.exists():
        shutil.rmtree(args.out)
    res: dict[str, list] = {}

    def avg_bits(m):
        return sum(r["weight_bits"] for r in m["layers"]) / sum(r["weights"] for r in m["layers"])

    # phase 1: every seed's fixed and uniform-ADQ runs, one Dask task each (bitfold.app.sweep.train_runs)
    jobs, names = [], []
    for seed in args.seeds:
        for method in ("fixed", "adq"):
            for w in (2, 3, 4):
                bits = {"*": {"w": w, "a": 4}, "convs.0": {"w": 8, "a": 8}, "head": {"w": 8, "a": 8}}
                jobs.append((TrainConfig(model="cnn", bits=bits, method=method, epochs=args.epochs, seed=seed),
                             args.out / f"seed{seed}" / f"{method}_w{w}"))
                names.append(f"{method} uniform W{w}A4")
    for name, m in zip(names, train_runs(jobs, args.scheduler)):
        res.setdefault(name, []).append((avg_bits(m), m["accuracy"]))
    # phase 2: allocate from each seed's ADQ W4 run (here), then continue those runs (tasks again)
    jobs = []
    for seed in args.seeds:
        out = args.out / f"seed{seed}"
        total_w = sum(r["weights"] for r in json.loads((out / "adq_w4" / "metrics.json").read_text())["layers"])
        rep = allocate_run(out / "adq_w4", "weight_bits", 3.0 * total_w, out_path=out / "alloc.json")
        jobs.append((TrainConfig(model="cnn", bits=rep["bit_map"], method="adq", epochs=max(1, args.epochs // 2),
                                 init_from=str(out / "adq_w4"), seed=seed), out / "adq_alloc"))
        print(f"seed {seed}: allocation " + " ".join(f"{k}:{v['w']}" for k, v in rep["bit_map"].items()), flush=True)
    for m in train_runs(jobs, args.scheduler):
        res.setdefault("adq Fisher-allocated <=3 avg bits", []).append((avg_bits(m), m["accuracy"]))
    print(f"{'configuration':<40}{'avg w bits':>11}{'test acc (mean over ' + str(len(args.seeds)) + ' seeds)':>32}  per seed")
    rows = []
    for name, v in res.items():
        b = sum(x[0] for x in v) / len(v)
        accs = [x[1] for x in v]
        mean = sum(accs) / len(accs)
        sd = (sum((a - mean) ** 2 for a in accs) / max(1, len(accs) - 1)) ** 0.5
        rows.append((name, b, mean))
        print(f"{name:<40}{b:>11.2f}{mean:>22.2%} +- {sd:.2%}  " + " ".join(f"{a:.2%}" for a in accs))
    _plot(rows, args.out / "adq_vs_fixed.png")
    print(f"wrote {args.out / 'adq_vs_fixed.png'}")


def _plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for prefix, mk in (("fixed", "o-"), ("adq uniform", "s-")):
        pts = sorted((b, a) for n, b, a in rows if n.startswith(prefix))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], mk, label=prefix)
    alloc = [(b, a) for n, b, a in rows if "allocated" in n]
    ax.plot([p[0] for p in alloc], [p[1] for p in alloc], "r*", ms=12, label="adq allocated")
    ax.set_xlabel("average weight bits")
    ax.set_ylabel("digits test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
