"""ADQ on digits: accuracy vs average weight bits against fixed uniform, and step overhead.

    python benchmarks/adq_bench.py [--epochs 15] [--out runs/adq_bench]

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
import torch.nn.functional as F

warnings.filterwarnings("ignore")


def step_ratio(rounds=7, steps=15):
    from bitfold.toolchain.describe import describe_layers
    from bitfold.toolchain.models import build_model
    from bitfold.toolchain.train import calibrate
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    fns = {}
    for method in ("fixed", "adq"):
        torch.manual_seed(0)
        m = build_model("cnn", (1, 8, 8), 10, bits="w3a4", method=method)
        calibrate(m, x, 64)
        qm = m.quant_method
        qm.setup(m, describe_layers(m, (1, 8, 8)))
        opt = torch.optim.Adam(m.parameters(), 1e-3)

        def fn(m=m, qm=qm, opt=opt):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
            qm.after_step(m, 0)
        fns[method] = fn
    from _timing import interleaved
    return interleaved(fns, rounds, steps)


def main():
    from bitfold.toolchain.adq import allocate_run
    from bitfold.toolchain.runs import TrainConfig
    from bitfold.toolchain.train import train
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--out", type=Path, default=Path("runs/adq_bench"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    med = step_ratio()
    print(f"step time: fixed {med['fixed'] * 1e3:.2f} ms, adq {med['adq'] * 1e3:.2f} ms -> "
          f"{med['adq'] / med['fixed']:.2f}x")
    if args.out.exists():
        shutil.rmtree(args.out)
    rows = []

    def avg_bits(m):
        return sum(r["weight_bits"] for r in m["layers"]) / sum(r["weights"] for r in m["layers"])

    for method in ("fixed", "adq"):
        for w in (2, 3, 4):
            bits = {"*": {"w": w, "a": 4}, "convs.0": {"w": 8, "a": 8}, "head": {"w": 8, "a": 8}}
            m = train(TrainConfig(model="cnn", bits=bits, method=method, epochs=args.epochs),
                      args.out / f"{method}_w{w}", progress=False)
            rows.append((f"{method} uniform W{w}A4", avg_bits(m), m["accuracy"]))
    total_w = sum(r["weights"] for r in json.loads((args.out / "adq_w4" / "metrics.json").read_text())["layers"])
    rep = allocate_run(args.out / "adq_w4", "weight_bits", 3.0 * total_w, out_path=args.out / "alloc.json")
    m = train(TrainConfig(model="cnn", bits=rep["bit_map"], method="adq", epochs=max(1, args.epochs // 2),
                          init_from=str(args.out / "adq_w4")), args.out / "adq_alloc", progress=False)
    rows.append(("adq Fisher-allocated <=3 avg bits " + " ".join(f"{k}:{v['w']}" for k, v in rep["bit_map"].items()),
                 avg_bits(m), m["accuracy"]))
    print(f"{'configuration':<62}{'avg w bits':>11}{'test acc':>10}")
    for name, b, a in rows:
        print(f"{name:<62}{b:>11.2f}{a:>10.2%}")
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
