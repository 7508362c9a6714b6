"""Headline benchmark: does a measured board cost in the bit-width loss beat BitOPs? On Fashion-MNIST.

    python benchmarks/hw_aware_vs_bitops.py [--targets host-cpu ulx3s-85f] [--model mlp|cnn]
        [--seeds 0 1 2] [--epochs 4] [--subset TRAIN,TEST] [--widths 2 3 4 6 8] [--lams 0.3 1 3]
        [--fps N] [--out runs/hw_vs_bitops] [--quick]

Per target and seed, three families of points, each trained on Fashion-MNIST, exported, built with
the board's own flow and *measured* there (host-cpu: TVM build, median latency; open-flow boards:
yosys synthesis LUT4 of the build the board's loop makes):

* uniform fixed widths ``W_b A_b`` on every layer (first and last included), b in ``--widths``;
* AdaQAT trained on BitOPs, every layer's W and A free (2..8), one point per lambda;
* AdaQAT trained on the board's cost table, same everything else.

Prints per configuration mean +- sd over the seeds (accuracy and measured cost), the Pareto fronts of
mean accuracy vs mean measured cost, and - for each BitOPs-trained configuration - the cheapest
board-trained one whose mean accuracy is at least as high up to the seed spread (the larger of the
two sds), with the measured-cost reduction. Writes points.csv, summary.json and hw_vs_bitops.png.
Each point is one task of ``bitfold.app.sweep`` (the engine of ``bitfold sweep``): on a local Dask
cluster by default, ``--scheduler HOST:PORT`` for an existing one, ``inprocess`` to run here; its
directory keeps its result, so an interrupted run resumes.
``--quick``: 2000/500 samples, 1 epoch, 1 seed, widths 2 and 8, lambda 1 - the end-to-end check
the test suite runs.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

#: AdaQAT's starting widths per metric (every layer free): the widest the width range allows
INIT = "w8a8:all"


FAMILIES = ("uniform", "bitops", "board")


def configs(widths, lams, families=FAMILIES):
    out = [(f"uniform W{b}A{b}", {"method": "fixed", "bits": f"w{b}a{b}:all"}) for b in widths] \
        if "uniform" in families else []
    for cost in ("bitops", "board"):
        if cost in families:
            out += [(f"{cost} lam={lam:g}", {"method": "adaqat", "bits": INIT, "cost": cost, "lam": lam})
                    for lam in lams]
    return out


def point(board, label, spec, seed, args):
    """One configuration at one seed as a sweep point (bitfold.app.sweep: train, export, build, measure)."""
    from bitfold.app.sweep import Point
    kw = {}
    if spec["method"] == "adaqat":
        kw = {"cost": spec["cost"], "lam": spec["lam"],
              "options": (("finetune_epochs", 1 if args.epochs > 1 else 0), ("learn_edges", True))}
    return Point(board.name, method=spec["method"], model=args.model, data="fashion-mnist", bits=spec["bits"],
                 epochs=args.epochs, seed=seed, subset=args.subset,
                 fps=args.fps if board.backend != "tvm" else None, verify=not (args.quick or args.no_verify), **kw)


def summarize(rows):
    """Per (board, label): mean and sd over seeds of accuracy and measured cost."""
    out = {}
    for r in rows:
        out.setdefault((r["board"], r["label"]), []).append(r)
    stats = []
    for (board, label), rs in out.items():
        acc = [r["accuracy"] for r in rs]
        cost = [r["measured"] for r in rs]
        sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
        stats.append({"board": board, "label": label, "family": rs[0]["family"], "seeds": len(rs),
                      "acc_mean": statistics.fmean(acc), "acc_sd": sd(acc),
                      "cost_mean": statistics.fmean(cost), "cost_sd": sd(cost), "metric": rs[0]["metric"]})
    return stats


def reductions(stats):
    """For each BitOPs-trained configuration: the cheapest board-trained one with mean accuracy >=
    its mean minus the seed spread (larger sd of the two), and the measured-cost reduction."""
    out = []
    for b in (s for s in stats if s["family"] == "bitops"):
        ok = [s for s in stats if s["family"] == "board" and s["board"] == b["board"]
              and s["acc_mean"] >= b["acc_mean"] - max(b["acc_sd"], s["acc_sd"])]
        if ok:
            best = min(ok, key=lambda s: s["cost_mean"])
            out.append({"board": b["board"], "bitops": b["label"], "board_trained": best["label"],
                        "bitops_acc": b["acc_mean"], "board_acc": best["acc_mean"],
                        "bitops_cost": b["cost_mean"], "board_cost": best["cost_mean"],
                        "reduction": 1 - best["cost_mean"] / b["cost_mean"]})
        else:
            out.append({"board": b["board"], "bitops": b["label"], "board_trained": None, "reduction": None})
    return out


def main(argv=None):
    from bitfold.app.sweep import pareto as sweep_pareto
    from bitfold.app.sweep import point_key, run_sweep
    from bitfold.boards import load_board
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", nargs="+", default=["host-cpu", "ulx3s-85f"])
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--subset", default=None, help="TRAIN,TEST sample counts (default: all 60k / 10k)")
    ap.add_argument("--widths", type=int, nargs="+", default=[2, 3, 4, 6, 8])
    ap.add_argument("--lams", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    ap.add_argument("--out", type=Path, default=Path("runs/hw_vs_bitops"))
    ap.add_argument("--fps", type=float, default=None,
                    help="FPGA targets: the rate every point is folded for, and the board table prices")
    ap.add_argument("--no-verify", action="store_true", help="FPGA: skip the verilator simulation of each build")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES,
                    help="which point families to run (a later run with all of them into the same --out reuses "
                         "the points already measured, e.g. the table-independent ones run while a table is re-measured)")
    ap.add_argument("--scheduler", default=None, help="Dask scheduler HOST:PORT; 'inprocess' runs here "
                    "(default: a local cluster on the free cores)")
    ap.add_argument("--workers", type=int, default=None, help="local cluster: worker processes")
    args = ap.parse_args(argv)
    if args.quick:
        args.subset, args.epochs, args.seeds, args.widths, args.lams = "2000,500", 1, [0], [2, 8], [1.0]
    args.subset = tuple(int(v) for v in args.subset.split(",")) if args.subset else None
    args.out.mkdir(parents=True, exist_ok=True)
    labels = {}
    for name in args.targets:
        board = load_board(name)
        for seed in args.seeds:
            for label, spec in configs(args.widths, args.lams, args.families):
                labels[point(board, label, spec, seed, args)] = label
    # every point is one Dask task (CPU latencies are timed one at a time after the parallel phase)
    sweep = run_sweep(list(labels), args.out, scheduler=args.scheduler, workers=args.workers)
    for f in sweep["failed"]:       # e.g. a build that does not fit the board: named, left out of the table
        print(f"point not measured: {f['point']}: {f['error']}", flush=True)
    by_key = {r["key"]: r for r in sweep["rows"]}
    rows = []
    for p, label in labels.items():
        r = by_key.get(point_key(p))
        if r is None:
            continue
        rows.append({"board": p.board, "metric": r["metric"], "label": label, "family": label.split()[0],
                     "seed": p.seed, "accuracy": r["accuracy"], "measured": r["measured"], "bitops": r["bitops"],
                     "bits": r["bits"]})
        print(f"{p.board:<10} seed {p.seed} {label:<16} acc {r['accuracy']:.2%}  measured {r['measured']:.4g}  "
              f"{r['bits']}", flush=True)
    with open(args.out / "points.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    stats = summarize(rows)
    red = reductions(stats)
    if not rows:
        raise SystemExit("no point was measured")
    args.targets = [t for t in args.targets if any(r["board"] == t for r in rows)]
    for name in args.targets:
        st = [s for s in stats if s["board"] == name]
        k, u = (1e3, "ms") if st[0]["metric"] == "latency" else (1, st[0]["metric"].upper())
        print(f"\n{name}: Fashion-MNIST {args.model}, {len(args.seeds)} seed(s), mean +- sd; measured {st[0]['metric']} ({u})")
        front = {s["label"] for s in [p[2] for p in sweep_pareto([(s["cost_mean"], s["acc_mean"], s) for s in st])]}
        for s in sorted(st, key=lambda s: s["cost_mean"]):
            print(f"  {s['label']:<16} acc {s['acc_mean']:.2%} +- {s['acc_sd']:.2%}   cost {s['cost_mean'] * k:.4g} "
                  f"+- {s['cost_sd'] * k:.2g} {u}{'   (front)' if s['label'] in front else ''}")
        for r in (r for r in red if r["board"] == name):
            if r["board_trained"] is None:
                print(f"  {r['bitops']}: no board-trained configuration within the seed spread of its accuracy")
            else:
                print(f"  {r['bitops']} ({r['bitops_acc']:.2%}, {r['bitops_cost'] * k:.4g} {u}) vs "
                      f"{r['board_trained']} ({r['board_acc']:.2%}, {r['board_cost'] * k:.4g} {u}): "
                      f"{r['reduction']:+.1%} measured-cost reduction")
    (args.out / "summary.json").write_text(json.dumps({"stats": stats, "reductions": red, "failed": sweep["failed"],
                                                       "args": {k: v for k, v in vars(args).items() if k != "out"}},
                                                      indent=1, default=str))
    _plot(stats, args.targets, args.out / "hw_vs_bitops.png")
    print(f"\nwrote {args.out / 'points.csv'}, summary.json and hw_vs_bitops.png")
    return {"stats": stats, "reductions": red}


def _plot(stats, boards, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(boards), figsize=(5.5 * len(boards), 4), squeeze=False)
    for ax, name in zip(axes[0], boards):
        st = [s for s in stats if s["board"] == name]
        k = 1e3 if st[0]["metric"] == "latency" else 1
        for fam, mk in (("uniform", "^"), ("bitops", "s"), ("board", "o")):
            pts = [s for s in st if s["family"] == fam]
            if not pts:
                continue
            ax.errorbar([s["cost_mean"] * k for s in pts], [s["acc_mean"] for s in pts],
                        xerr=[s["cost_sd"] * k for s in pts], yerr=[s["acc_sd"] for s in pts], fmt=mk, alpha=0.7,
                        label={"uniform": "uniform W=A", "bitops": "AdaQAT on BitOPs", "board": f"AdaQAT on {name}"}[fam])
        ax.set_xlabel(f"measured {st[0]['metric']} ({'ms' if k != 1 else st[0]['metric'].upper()})")
        ax.set_ylabel("Fashion-MNIST test accuracy")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
