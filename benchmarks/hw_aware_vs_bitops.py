"""Headline benchmark: AdaQAT trained against a board's measured cost table vs against BitOPs,
every point built and measured on the board's own flow.

    python benchmarks/hw_aware_vs_bitops.py [--targets ulx3s-85f host-cpu] [--lams 0.1 0.3 1 3]
                                            [--epochs 10] [--out runs/hw_vs_bitops]

For each target and each lambda, two closed-loop runs (``bitfold run``, one round) differ only in
the cost the bit-width loss sees: ``--cost bitops`` or the board's table. Each trained model is
exported, built (ulx3s-85f: yosys synthesis with the table's folding; host-cpu: TVM) and its cost
measured (LUT4 / latency). Prints both Pareto fronts (accuracy vs measured cost) side by side and
the measured-cost reduction at equal accuracy (board-trained point with accuracy >= the BitOPs
point's - 0.5 pt), and saves hw_vs_bitops.csv + .png into --out.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

INIT = {"ulx3s-85f": "w6a6:all", "host-cpu": "w8a8:all"}
MODEL = {"ulx3s-85f": "mlp", "host-cpu": "mlp"}


def pareto(points):
    """Points (cost, acc) not dominated by a cheaper-or-equal, at-least-as-accurate point."""
    pts = sorted(points, key=lambda p: (p[0], -p[1]))
    front, best = [], -1.0
    for c, a in pts:
        if a > best:
            front.append((c, a))
            best = a
    return front


def reduction_at_equal_accuracy(bitops_pts, board_pts, tol=0.005):
    """For each BitOPs front point: the cheapest board-trained point within tol of its accuracy."""
    out = []
    for c, a in pareto(bitops_pts):
        ok = [bc for bc, ba in board_pts if ba >= a - tol]
        if ok:
            out.append((a, c, min(ok), 1 - min(ok) / c))
    return out


def main():
    from bitfold.app.loop import run_loop
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", nargs="+", default=["ulx3s-85f", "host-cpu"])
    ap.add_argument("--lams", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("runs/hw_vs_bitops"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for board in args.targets:
        table = None
        for lam in args.lams:
            for cost in ("bitops", "board"):
                d = args.out / board / f"{cost}_lam{lam}"
                if d.exists() and not (d / "report.json").is_file():
                    shutil.rmtree(d)
                r = run_loop(d, board, "adaqat", None, 1, MODEL[board], "digits", args.epochs, INIT[board], lam,
                             verify=False, cost="bitops" if cost == "bitops" else None, table=table)
                table = table or d / "round0" / "calibrate" / "table.json"   # one calibration per target
                h = r["history"][0]
                bits = " ".join(f"W{v['w']}A{v['a']}" for v in h["bit_map"].values())
                rows.append({"board": board, "metric": r["metric"], "cost": cost, "lam": lam, "accuracy": h["accuracy"],
                             "measured": h["measured"], "predicted": h["predicted"], "bits": bits})
                print(f"{board:<10} {cost:<7} lam {lam:<5g} acc {h['accuracy']:.2%}  measured {h['measured']:.4g}  "
                      f"predicted {h['predicted']:.4g}  {bits}", flush=True)
    with open(args.out / "hw_vs_bitops.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    summary = {}
    for board in args.targets:
        br = [r for r in rows if r["board"] == board]
        pts = {c: [(r["measured"], r["accuracy"]) for r in br if r["cost"] == c] for c in ("bitops", "board")}
        metric = br[0]["metric"]
        k, u = (1e3, "ms") if metric == "latency" else (1, "LUT")
        print(f"\n{board}: Pareto fronts, accuracy vs measured {metric} ({u})")
        print(f"{'--cost bitops':>28} | {'--cost ' + board:>28}")
        fa, fb = pareto(pts["bitops"]), pareto(pts["board"])
        for i in range(max(len(fa), len(fb))):
            left = f"{fa[i][0] * k:>14.4g} {fa[i][1]:>12.2%}" if i < len(fa) else " " * 27
            right = f"{fb[i][0] * k:>14.4g} {fb[i][1]:>12.2%}" if i < len(fb) else ""
            print(f"{left} | {right}")
        red = reduction_at_equal_accuracy(pts["bitops"], pts["board"])
        for a, c, bc, r in red:
            print(f"  at accuracy {a:.2%} (-0.5 pt): BitOPs-trained {c * k:.4g} {u}, board-trained {bc * k:.4g} {u} "
                  f"-> {r:+.1%} measured-cost reduction")
        if not red:
            print("  no board-trained point within 0.5 pt of a BitOPs front point")
        summary[board] = {"bitops_front": fa, "board_front": fb, "reduction": red}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    _plot(rows, args.targets, args.out / "hw_vs_bitops.png")
    print(f"\nwrote {args.out / 'hw_vs_bitops.csv'}, summary.json and hw_vs_bitops.png")


def _plot(rows, boards, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(boards), figsize=(5.5 * len(boards), 4), squeeze=False)
    for ax, board in zip(axes[0], boards):
        br = [r for r in rows if r["board"] == board]
        k = 1e3 if br[0]["metric"] == "latency" else 1
        for cost, mk in (("bitops", "s"), ("board", "o")):
            pts = [(r["measured"] * k, r["accuracy"]) for r in br if r["cost"] == cost]
            ax.scatter(*zip(*pts), marker=mk, alpha=0.5, label=f"--cost {'bitops' if cost == 'bitops' else board}")
            f = pareto(pts)
            ax.plot(*zip(*f), "-" if cost == "board" else "--")
        ax.set_xlabel(f"measured {br[0]['metric']} ({'ms' if k != 1 else 'LUT4'})")
        ax.set_ylabel("digits test accuracy")
        ax.set_title(board)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
