"""The CPU loop's Pareto front with the sub-8-bit kernels against the int8-only build of the same models.

    python benchmarks/cpu_pareto_int8.py --sweep runs/fashion_cpu_cnn [--rounds 9] [--steps 100] [--out DIR]

``--sweep``: the output directory of a host-cpu run of ``benchmarks/hw_aware_vs_bitops.py`` (or any
``bitfold sweep`` on host-cpu): every point's exported QCDQ file (``points/<key>/model.onnx``) is built
twice by the TVM backend - ``--kernels int8`` (every width up to 8 bits as an int8 kernel, what the
backend did before the bit-serial kernels) and ``--kernels auto`` (the default: each layer of <= 4-bit
weights and unsigned inputs timed as int8 and bit-serial and the faster kept) - and the two builds are
timed side by side, interleaved, batch 1, on this host. Accuracy is the point's (the same model in both
builds). Prints per configuration (mean over seeds) accuracy, int8-only and auto latency and their ratio,
and the Pareto front (accuracy vs latency) of each build; writes pareto_int8.csv and pareto_int8.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import tempfile
from pathlib import Path


def label(row: dict) -> str:
    if row["method"] == "fixed":
        return f"uniform {row['trained_bits'].split()[0]}"
    return f"{row['cost'] or 'bitops'} lam={float(row['lam']):g}"


def front(points: list[tuple[str, float, float]]) -> list[str]:
    """Labels of the (label, latency, accuracy) points no other point beats in both."""
    return [p[0] for p in points if not any(q[1] <= p[1] and q[2] >= p[2] and (q[1], q[2]) != (p[1], p[2])
                                            for q in points)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    out = args.out or args.sweep
    import numpy as np
    import onnx as onnx_lib
    import tvm
    from tvm import relax

    from bitfold.core.timing import interleaved
    from bitfold.export.backends import build
    with open(args.sweep / "sweep.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["board"] == "host-cpu"]
    if not rows:
        raise SystemExit(f"{args.sweep}/sweep.csv has no host-cpu points")
    per = []
    with tempfile.TemporaryDirectory() as td:
        for r in rows:
            onnx = args.sweep / "points" / r["key"] / "model.onnx"
            dims = onnx_lib.load(str(onnx)).graph.input[0].type.tensor_type.shape.dim
            x = np.random.default_rng(0).standard_normal([max(1, d.dim_value) for d in dims]).astype("float32")
            fns, kernels = {}, {}
            for mode in ("int8", "auto"):
                b = build(onnx, "host-cpu", Path(td) / f"{r['key']}-{mode}", samples=4, kernels=mode)
                meta = json.loads((Path(td) / f"{r['key']}-{mode}" / "build.json").read_text())
                kernels[mode] = sum(la.get("kernel", "").startswith("bitserial") for la in meta["layers"])
                vm = relax.VirtualMachine(tvm.runtime.load_module(b.artefacts["library"]), tvm.cpu())
                xt = tvm.runtime.tensor(x, tvm.cpu())
                fns[mode] = lambda v=vm, xt=xt: v["main"](xt)
            med = interleaved(fns, rounds=args.rounds, steps=args.steps)
            per.append({"label": label(r), "seed": r["seed"], "bits": r["trained_bits"], "accuracy": float(r["accuracy"]),
                        "int8_ms": med["int8"] * 1e3, "auto_ms": med["auto"] * 1e3, "bitserial_layers": kernels["auto"]})
            p = per[-1]
            print(f"{p['label']:<16} seed {p['seed']}  {p['bits']:<24} acc {100 * p['accuracy']:.2f}%  int8-only "
                  f"{p['int8_ms']:.4f} ms  auto {p['auto_ms']:.4f} ms ({p['bitserial_layers']} bit-serial layers)",
                  flush=True)
    labels = list(dict.fromkeys(p["label"] for p in per))
    agg = []
    for lb in labels:
        ps = [p for p in per if p["label"] == lb]
        agg.append({"label": lb, "n": len(ps), "accuracy": statistics.mean(p["accuracy"] for p in ps),
                    "acc_sd": statistics.stdev(p["accuracy"] for p in ps) if len(ps) > 1 else 0.0,
                    "int8_ms": statistics.mean(p["int8_ms"] for p in ps), "auto_ms": statistics.mean(p["auto_ms"] for p in ps)})
    f_int8 = front([(a["label"], a["int8_ms"], a["accuracy"]) for a in agg])
    f_auto = front([(a["label"], a["auto_ms"], a["accuracy"]) for a in agg])
    print(f"\n{'configuration':<16}{'accuracy':>16}{'int8-only ms':>14}{'auto ms':>10}{'auto/int8':>10}  front")
    for a in sorted(agg, key=lambda a: a["auto_ms"]):
        mark = ",".join(k for k, f in (("int8", f_int8), ("auto", f_auto)) if a["label"] in f)
        print(f"{a['label']:<16}{100 * a['accuracy']:>9.2f}+-{100 * a['acc_sd']:.2f}%{a['int8_ms']:>14.4f}"
              f"{a['auto_ms']:>10.4f}{a['auto_ms'] / a['int8_ms']:>10.2f}  {mark}")
    span = {k: (min(a[k] for a in agg), max(a[k] for a in agg)) for k in ("int8_ms", "auto_ms")}
    print(f"\nlatency range over the configurations: int8-only {span['int8_ms'][0]:.4f}-{span['int8_ms'][1]:.4f} ms "
          f"({span['int8_ms'][1] / span['int8_ms'][0]:.2f}x), auto {span['auto_ms'][0]:.4f}-{span['auto_ms'][1]:.4f} ms "
          f"({span['auto_ms'][1] / span['auto_ms'][0]:.2f}x)")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "pareto_int8.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(per[0]))
        w.writeheader()
        w.writerows(per)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, name, marker in (("int8_ms", "int8-only build", "s"), ("auto_ms", "bit-serial where faster (default)", "o")):
        fr = f_int8 if key == "int8_ms" else f_auto
        pts = sorted((a[key], a["accuracy"]) for a in agg if a["label"] in fr)
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker=marker, label=f"{name}: front")
        ax.scatter([a[key] for a in agg], [100 * a["accuracy"] for a in agg], marker=marker, alpha=0.35)
    for a in agg:
        ax.annotate(a["label"], (a["auto_ms"], 100 * a["accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("measured latency, batch 1 (ms)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("host-cpu: the same models, int8-only vs bit-serial kernels")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pareto_int8.png", dpi=110)
    print(f"wrote {out / 'pareto_int8.csv'} and pareto_int8.png")


if __name__ == "__main__":
    main()
