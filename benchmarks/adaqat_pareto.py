"""AdaQAT lambda sweep on digits: accuracy vs BitOPs, against uniform fixed-width baselines.

    python benchmarks/adaqat_pareto.py [--epochs 15] [--out runs/pareto] [--estimators]

Prints a table and writes pareto.csv + pareto.png into --out. With --estimators, both bit-width
gradient estimators (STE, finite differences) are run at the same lambdas, side by side.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def main():
    from bitfold.app.sweep import train_runs
    from bitfold.toolchain.runs import TrainConfig
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--out", type=Path, default=Path("runs/pareto"))
    ap.add_argument("--lams", type=float, nargs="+", default=[0.0, 0.03, 0.1, 0.3, 1.0, 3.0])
    ap.add_argument("--estimators", action="store_true", help="also run the finite-difference estimator")
    ap.add_argument("--scheduler", default=None, help="Dask scheduler HOST:PORT; 'inprocess' runs here "
                    "(default: a local cluster on the free cores)")
    args = ap.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    jobs, keys = [], []
    for bits in ("w8a8", "w4a4", "w3a3", "w2a2"):
        jobs.append((TrainConfig(model="cnn", bits=bits, epochs=args.epochs), args.out / f"fixed_{bits}"))
        keys.append(("fixed", bits, ""))
    for est in (["ste", "fd"] if args.estimators else ["ste"]):
        for lam in args.lams:
            jobs.append((TrainConfig(model="cnn", bits="w8a8", method="adaqat", epochs=args.epochs,
                                     method_options={"lam": lam, "estimator": est}), args.out / f"adaqat_{est}_{lam}"))
            keys.append((f"adaqat-{est}", "w8a8 init", lam))
    # the penalty grid: one Dask task per run (bitfold.app.sweep.train_runs)
    rows = [(*k, m["accuracy"], m["bitops"], _map(m)) for k, m in zip(keys, train_runs(jobs, args.scheduler))]
    print(f"{'method':<12}{'bits':<11}{'lambda':>7}{'acc':>9}{'BitOPs':>11}  per-layer W/A")
    for r in rows:
        print(f"{r[0]:<12}{r[1]:<11}{str(r[2]):>7}{r[3]:>9.2%}{r[4]:>11.3g}  {r[5]}")
    with open(args.out / "pareto.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "bits", "lambda", "accuracy", "bitops", "map"])
        w.writerows(rows)
    _plot(rows, args.out / "pareto.png")
    print(f"wrote {args.out / 'pareto.csv'} and {args.out / 'pareto.png'}")


def _map(m):
    return " ".join(f"{r['name']}:{r['w']}/{r['a']}" for r in m["layers"])


def _plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({r[0] for r in rows}):
        pts = sorted((r[4], r[3]) for r in rows if r[0] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("BitOPs")
    ax.set_ylabel("digits test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
