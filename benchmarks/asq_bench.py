"""ASQ on digits: accuracy at W4A4 and W3A3 against FP, fixed uniform, ASQ without its adapter
and ASQ with power-of-two (POT) instead of POST weights; deployed accuracy of the folded (QCDQ)
and dynamic (adapter in ONNX) exports; training step time against fixed-bit Brevitas.

    python benchmarks/asq_bench.py [--epochs 15] [--seeds 0 1 2] [--out runs/asq_bench]

Every row is trained once per seed (same seed, same data order across rows); the table gives
the mean, the spread and each seed. First/last layers stay at 8 bit in every quantized row
(bitfold's w4a4 shorthand). Exports run through bitfold's verification (torch vs onnxruntime).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

ROWS = {"asq": ("asq", {}), "asq, no adapter (beta=1)": ("asq", {"adapter": False}),
        "asq, POT weights": ("asq", {"levels": "pot"}), "fixed uniform": ("fixed", {})}


def main():
    from bitfold.export.dynamic import export_dynamic_run
    from bitfold.export.onnx_export import export_run
    from bitfold.app.sweep import train_runs
    from bitfold.toolchain.runs import TrainConfig
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("runs/asq_bench"))
    ap.add_argument("--scheduler", default=None, help="Dask scheduler HOST:PORT; 'inprocess' runs here "
                    "(default: a local cluster on the free cores)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from _timing import train_step_times
    med = train_step_times({"fixed": ("fixed", {}), "asq": ("asq", {}), "asq-noadapt": ("asq", {"adapter": False})},
                           "w4a4")
    print(f"step time: fixed {med['fixed'] * 1e3:.2f} ms, asq {med['asq'] * 1e3:.2f} ms "
          f"({med['asq'] / med['fixed']:.2f}x), asq without adapter {med['asq-noadapt'] * 1e3:.2f} ms "
          f"({med['asq-noadapt'] / med['fixed']:.2f}x)", flush=True)
    if args.out.exists():
        shutil.rmtree(args.out)
    acc: dict[tuple, list] = {}
    # every training run of the grid is one Dask task (bitfold.app.sweep.train_runs); exports follow here
    jobs, keys = [], []
    for seed in args.seeds:
        jobs.append((TrainConfig(model="cnn", method="float", epochs=args.epochs, seed=seed), args.out / f"s{seed}_fp"))
        keys.append((seed, "FP32", "-"))
        for bits in ("w4a4", "w3a3"):
            for label, (method, opts) in ROWS.items():
                d = args.out / f"s{seed}_{bits}_{label.split(',')[0].replace(' ', '_')}_{len(opts)}{''.join(opts)}"
                jobs.append((TrainConfig(model="cnn", bits=bits, method=method, method_options=opts, epochs=args.epochs,
                                         seed=seed), d))
                keys.append((seed, label, bits))
    for (seed, label, bits), (_, d), m in zip(keys, jobs, train_runs(jobs, args.scheduler)):
        acc.setdefault((label, bits), []).append(m["accuracy"])
        if label == "asq":
            f = export_run(d, "qcdq", d / "folded.onnx")
            acc.setdefault((label + ": folded QCDQ export (onnxruntime)", bits), []).append(f.accuracy["exported"])
            _, rep, dyn = export_dynamic_run(d, d / "dynamic.onnx")
            assert f.report.passed and rep.passed
            acc.setdefault((label + ": dynamic ONNX export (adapter in the graph)", bits), []).append(dyn)
            acc.setdefault((label + ": dynamic export, onnxruntime argmax agreement", bits), []).append(
                rep.argmax_agreement)
    print(f"\n{'configuration':<52}{'bits':>6}{'mean':>9}{'spread':>9}  per seed")
    for (label, bits), v in acc.items():
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        print(f"{label:<52}{bits:>6}{statistics.mean(v):>9.2%}{sd:>9.2%}  " + " ".join(f"{a:.2%}" for a in v))
    _plot(acc, args.out / "asq_bench.png")
    print(f"wrote {args.out / 'asq_bench.png'}")


def _plot(acc, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [k for k in ROWS]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.2
    for i, lab in enumerate(labels):
        ys = [statistics.mean(acc[(lab, b)]) for b in ("w4a4", "w3a3")]
        ax.bar([j + i * width for j in range(2)], ys, width, label=lab)
    ax.axhline(statistics.mean(acc[("FP32", "-")]), color="k", ls=":", label="FP32")
    ax.set_xticks([j + 1.5 * width for j in range(2)], ["W4A4", "W3A3"])
    ax.set_ylim(0.8, 1.0)
    ax.set_ylabel("digits test accuracy (mean over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
