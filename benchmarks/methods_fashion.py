"""Each adaptive method on Fashion-MNIST against fixed-width baselines, over seeds, from one float checkpoint.

    python benchmarks/methods_fashion.py --method adaqat|mebqat|adq|asq [--model mlp|cnn] [--seeds 0 1 2]
        [--epochs 3] [--float-epochs 3] [--subset TRAIN,TEST] [--out runs/methods] [--scheduler H:P] [--quick]
        [--device cpu|cuda]

Per seed: one float run (the checkpoint), then every row - FP32 included, continued in float - of the method's table trained for --epochs starting from
that seed's float weights (``init_from``; the fixed baselines too), on the same data. Rows:

* adaqat: uniform fixed W2/W3/W4/W6/W8 on the hidden layers (first and last layer at the default 8 bit);
  AdaQAT on BitOPs from W8A8 with the ste and fd estimators at lambda 0.3 / 1 / 3, first and last layer
  fixed, and (ste) learned too. Compared with the best uniform row at no more BitOPs.
* mebqat: one MEBQAT model per seed evaluated at the diagonal (2,2)...(8,8) and four off-diagonal pairs,
  each against a dedicated fixed run at that pair; deploy-time selection (``bitfold select``) under the
  BitOPs of uniform W3A3 and W4A4 against AdaQAT trained for the same budget (budget mode, from W8A8).
* adq: fixed W3A4 and W4A4; ADQ W3A4 (quantile init, EMA on) and its ablations (uniform init, EMA off),
  and with the paper's non-uniform activations (act=nonuniform: trains, does not export);
  ADQ with a Fisher allocation under 3 average hidden-layer weight bits (trained W4 -> allocate ->
  continue) against the uniform allocation (ADQ W3A4).
* asq: W4A4 / W3A3 / W2A2: fixed, ASQ, ASQ without adapter, ASQ with POT weights, ASQ with uniform
  weight levels (with and without adapter: ASQ's activation step alone against the fixed row's quantizer);
  ASQ's folded QCDQ export (onnxruntime) and dynamic export accuracy.

Prints mean +- sd over the seeds per row (and the per-seed values), writes CSV (one line per run) and a
PNG (accuracy vs average hidden-layer weight bits) into --out/<method>_<model>/. Every training run is one Dask task
(bitfold.app.sweep.train_runs). ``--quick``: 1000/500 samples, 1 epoch, 1 seed, a reduced grid - the
check the test suite runs.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

PAIRS = [(2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (8, 8), (2, 4), (4, 2), (3, 6), (6, 3)]


def model_bitops(model: str, bits: str) -> float:
    """BitOPs of ``model`` (Fashion-MNIST's shape) at a uniform shorthand map, as the fixed rows train it."""
    from bitfold.hw_models.cost import bitops
    from bitfold.toolchain.bitmap import BitMap
    from bitfold.toolchain.describe import describe_layers
    from bitfold.toolchain.models import build_model
    layers = describe_layers(build_model(model, (1, 28, 28), 10, method="float"), (1, 28, 28))
    bm = BitMap.parse(bits).resolve([d.name for d in layers])
    return float(bitops(layers, {n: (b.w, b.a) for n, b in bm.items()}).total)


def rows_for(method: str, quick: bool, model: str = "mlp"):
    """(label, TrainConfig keywords) per table row, and the post-processing each needs."""
    if method == "adaqat":
        widths = [2, 8] if quick else [2, 3, 4, 6, 8]
        rows = [(f"fixed W{b}A{b}", {"method": "fixed", "bits": f"w{b}a{b}"}) for b in widths]
        ests = [("ste", 1.0, False)] if quick else [(e, lam, False) for e in ("ste", "fd") for lam in (0.3, 1.0, 3.0)] \
            + [("ste", lam, True) for lam in (0.3, 1.0, 3.0)]
        for est, lam, edges in ests:
            rows.append((f"adaqat {est} lam={lam:g}{' edges learned' if edges else ''}",
                         {"method": "adaqat", "bits": "w8a8:all" if edges else "w8a8",
                          "method_options": {"cost": "bitops", "lam": lam, "estimator": est, "learn_edges": edges}}))
        if not quick:
            # AdaQAT's own quantizers (DoReFa weights, PACT activations) held at W3A3 for the whole run
            # (widths clamped to [2.6, 3.4], no cost): the quantizers against the fixed row's, without
            # the width schedule (appended: the rows above keep their run directories)
            rows.append(("adaqat quantizers held at W3A3", {"method": "adaqat", "bits": "w3a3", "method_options":
                         {"cost": "bitops", "lam": 0.0, "min_bits": 2.6, "max_bits": 3.4}}))
        return rows
    if method == "mebqat":
        pairs = [(2, 2), (8, 8)] if quick else PAIRS
        # deploy-time selection against AdaQAT trained for the same budget (budget mode, BitOPs)
        budgets = [("W2A2", model_bitops(model, "w2a2"))] if quick else \
            [(f"W{b}A{b}", model_bitops(model, f"w{b}a{b}")) for b in (3, 4)]
        return [("mebqat (one model)", {"method": "mebqat", "bits": "w8a8"})] + \
            [(f"fixed W{w}A{a}", {"method": "fixed", "bits": f"w{w}a{a}"}) for w, a in pairs] + \
            [(f"adaqat at budget BitOPs({tag})", {"method": "adaqat", "bits": "w8a8", "method_options":
              {"cost": "bitops", "budget": b}}) for tag, b in budgets]
    if method == "adq":
        rows = [("fixed W3A4", {"method": "fixed", "bits": "w3a4"}), ("fixed W4A4", {"method": "fixed", "bits": "w4a4"}),
                ("adq W3A4", {"method": "adq", "bits": "w3a4"}), ("adq W4A4 (allocation source)", {"method": "adq", "bits": "w4a4"})]
        rows.append(("adq W3A4 non-uniform activations", {"method": "adq", "bits": "w3a4",
                                                           "method_options": {"act": "nonuniform"}}))
        if not quick:
            rows += [("adq W3A4 uniform init", {"method": "adq", "bits": "w3a4", "method_options": {"init": "uniform"}}),
                     ("adq W3A4 EMA off", {"method": "adq", "bits": "w3a4", "method_options": {"ema": False}})]
        return rows
    if method == "asq":
        rows = []
        for b in (["w4a4"] if quick else ["w4a4", "w3a3", "w2a2"]):
            rows += [(f"fixed {b.upper()}", {"method": "fixed", "bits": b}), (f"asq {b.upper()}", {"method": "asq", "bits": b})]
            if not quick:
                rows += [(f"asq {b.upper()} no adapter", {"method": "asq", "bits": b, "method_options": {"adapter": False}}),
                         (f"asq {b.upper()} POT weights", {"method": "asq", "bits": b, "method_options": {"levels": "pot"}})]
        # appended, so that the rows above keep their run directories (r<index>)
        for b in ([] if quick else ["w4a4", "w3a3", "w2a2"]):
            rows += [(f"asq {b.upper()} uniform weights", {"method": "asq", "bits": b,
                                                            "method_options": {"levels": "uniform"}}),
                     (f"asq {b.upper()} uniform weights no adapter",
                      {"method": "asq", "bits": b, "method_options": {"levels": "uniform", "adapter": False}})]
        return rows
    raise SystemExit(f"unknown --method {method!r}: adaqat, mebqat, adq or asq")


def _same_run(saved: dict, cfg) -> bool:
    """The same run whatever device trained it (the trainer's own --resume rule)."""
    want = json.loads(json.dumps(cfg.to_json()))
    return {**saved, "device": ""} == {**want, "device": ""}


def train_or_load(jobs, scheduler, workers):
    """Metrics of every ``(TrainConfig, dir)``: finished runs (same config up to the device, metrics.json
    written) are read, the others trained as Dask tasks."""
    from bitfold.app.sweep import train_runs
    done = {}
    for i, (cfg, d) in enumerate(jobs):
        try:
            if _same_run(json.loads((d / "config.json").read_text()), cfg):
                done[i] = json.loads((d / "metrics.json").read_text())
        except (OSError, ValueError):
            pass
    todo = [(i, (cfg, d)) for i, (cfg, d) in enumerate(jobs) if i not in done]
    for (_, (_, d)) in todo:
        if d.exists():
            shutil.rmtree(d)
    for (i, _), m in zip(todo, train_runs([j for _, j in todo], scheduler, workers) if todo else []):
        done[i] = m
    return [done[i] for i in range(len(jobs))]


def hidden_weight_bits(m):
    """Average weight bits of the hidden layers (first and last excluded: they stay at 8 in every row)."""
    hid = m["layers"][1:-1] or m["layers"]
    return sum(r["weight_bits"] for r in hid) / sum(r["weights"] for r in hid)


def main(argv=None):
    from bitfold.toolchain.runs import TrainConfig
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", required=True, choices=["adaqat", "mebqat", "adq", "asq"])
    ap.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--float-epochs", type=int, default=3)
    ap.add_argument("--subset", default=None, help="TRAIN,TEST sample counts (default: all 60k / 10k)")
    ap.add_argument("--out", type=Path, default=Path("runs/methods"))
    ap.add_argument("--scheduler", default=None, help="Dask scheduler HOST:PORT; 'inprocess' runs here "
                    "(default: a local cluster on the free cores)")
    ap.add_argument("--workers", type=int, default=None, help="local cluster: worker processes (default: free cores)")
    ap.add_argument("--device", default="cpu", help="where the runs train (cpu or cuda); a finished run is "
                    "reused whatever device trained it")
    ap.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                    help="train only the rows whose label contains one of these (e.g. W4A4; '=LABEL': exactly that "
                    "label); FP32 always")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--fresh", action="store_true", help="retrain every run (default: a run directory that "
                    "holds a finished run is read, so an interrupted benchmark resumes)")
    args = ap.parse_args(argv)
    if args.quick:
        args.subset, args.epochs, args.float_epochs, args.seeds = "1000,500", 1, 1, [0]
    subset = tuple(int(v) for v in args.subset.split(",")) if args.subset else None
    out = args.out / f"{args.method}_{args.model}"
    if out.exists() and args.fresh:
        shutil.rmtree(out)
    t0 = time.time()
    base = {"model": args.model, "data": "fashion-mnist", "subset": subset, "device": args.device}
    fp = train_or_load([(TrainConfig(**base, method="float", epochs=args.float_epochs, seed=s), out / f"s{s}" / "float")
                        for s in args.seeds], args.scheduler, args.workers)
    # the FP32 row: the float checkpoint trained as long again as every other row
    rows = [("FP32", {"method": "float"})] + rows_for(args.method, args.quick, args.model)
    jobs, keys = [], []
    for s in args.seeds:
        for i, (label, kw) in enumerate(rows):   # r<i>: a row keeps its directory whatever --only keeps
            if args.only and label != "FP32" and not any(label == t[1:] if t.startswith("=") else t in label
                                                         for t in args.only):
                continue
            jobs.append((TrainConfig(**base, **kw, epochs=args.epochs, seed=s, init_from=str(out / f"s{s}" / "float")),
                         out / f"s{s}" / f"r{i}"))
            keys.append((s, label))
    runs = train_or_load(jobs, args.scheduler, args.workers)
    res = [{"seed": s, "row": "float checkpoint (start of every row)", "accuracy": m["accuracy"],
            "bitops": None, "wbits": None} for s, m in zip(args.seeds, fp)]
    res += [{"seed": s, "row": label, "accuracy": m["accuracy"], "bitops": m.get("bitops"), "wbits": 32.0 if label == "FP32" else hidden_weight_bits(m),
             "map": " ".join(f"W{x['w']}A{x['a']}" for x in m["layers"])} for (s, label), m in zip(keys, runs)]
    res += post(args, out, keys, jobs, runs, base, subset)
    write(res, out, args, time.time() - t0)
    return res


def post(args, out, keys, jobs, runs, base, subset):
    """Rows that come from trained runs: MEBQAT's evaluations, ADQ's allocation, ASQ's exports."""
    extra = []
    if args.method == "mebqat":
        from bitfold.toolchain.select_bits import eval_table, select
        pairs = [(2, 2), (8, 8)] if args.quick else PAIRS
        # the budgets the AdaQAT rows trained for (one per tag; the same on every seed)
        budgets = list({label.split("(")[1].rstrip(")"): cfg.method_options["budget"]
                        for (_, label), (cfg, _) in zip(keys, jobs) if label.startswith("adaqat at budget")}.items())
        for (s, label), (_, d) in zip(keys, jobs):
            if label.startswith("mebqat"):
                for r in eval_table(d, pairs):
                    extra.append({"seed": s, "row": f"mebqat at W{r['w']}A{r['a']}", "accuracy": r["accuracy"],
                                  "bitops": None, "wbits": float(r["w"])})
                for tag, b in budgets:   # the selection searches on training images, reports test accuracy
                    rep = select(d, f"bitops<={b:.12g}", out_path=d / f"selected_{tag}.json")
                    extra.append({"seed": s, "row": f"mebqat selected at budget BitOPs({tag})",
                                  "accuracy": rep["test_accuracy"], "bitops": rep["cost"], "wbits": None,
                                  "map": " ".join(f"W{v['w']}A{v['a']}" for v in rep["bit_map"].values())})
    if args.method == "adq":
        from bitfold.toolchain.adq import allocate_run
        from bitfold.toolchain.runs import TrainConfig
        cont = []
        for (s, label), (_, d), m in zip(keys, jobs, runs):
            if label.startswith("adq W4A4"):
                hid = m["layers"][1:-1]
                edges = sum(r["weight_bits"] for r in (m["layers"][0], m["layers"][-1]))
                budget = 3.0 * sum(r["weights"] for r in hid) + edges       # <= 3 average bits on the hidden layers
                rep = allocate_run(d, "weight_bits", budget, out_path=d.parent / "alloc.json")
                cont.append((s, TrainConfig(**base, method="adq", bits=rep["bit_map"], epochs=args.epochs,
                                            seed=s, init_from=str(d)), d.parent / "alloc"))
        for (s, _, _), m in zip(cont, train_or_load([(c, d) for _, c, d in cont], args.scheduler, args.workers)):
            extra.append({"seed": s, "row": "adq Fisher-allocated <=3 avg bits", "accuracy": m["accuracy"],
                          "bitops": m.get("bitops"), "wbits": hidden_weight_bits(m),
                          "map": " ".join(f"W{x['w']}A{x['a']}" for x in m["layers"])})
    if args.method == "asq":
        from bitfold.core.errors import BitfoldError
        from bitfold.export.dynamic import export_dynamic_run
        from bitfold.export.onnx_export import export_run
        for (s, label), (_, d) in zip(keys, jobs):
            if label.startswith("asq") and label.count(" ") == 1:
                try:
                    f = export_run(d, "qcdq", d / "folded.onnx")
                    extra.append({"seed": s, "row": f"{label}: folded QCDQ (onnxruntime)",
                                  "accuracy": f.accuracy["exported"], "bitops": None, "wbits": None})
                except BitfoldError as e:     # the export gate refused the file: counted, with its reason
                    extra.append({"seed": s, "row": f"{label}: folded QCDQ (onnxruntime)", "accuracy": None,
                                  "bitops": None, "wbits": None, "map": f"refused: {e.message[:120]}"})
                try:
                    _, rep, dyn = export_dynamic_run(d, d / "dynamic.onnx")
                    extra.append({"seed": s, "row": f"{label}: dynamic ONNX (onnxruntime)", "accuracy": dyn,
                                  "bitops": None, "wbits": None})
                except BitfoldError as e:
                    extra.append({"seed": s, "row": f"{label}: dynamic ONNX (onnxruntime)", "accuracy": None,
                                  "bitops": None, "wbits": None, "map": f"refused: {e.message[:160]}"})
    return extra


def summarize(res):
    groups: dict[str, list] = {}
    for r in res:
        groups.setdefault(r["row"], []).append(r)
    sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
    out = []
    for row, rs in groups.items():
        bo = [r["bitops"] for r in rs if r["bitops"] is not None]
        wb = [r["wbits"] for r in rs if r["wbits"] is not None]
        acc = [r["accuracy"] for r in rs if r["accuracy"] is not None]
        out.append({"row": row, "seeds": len(rs), "acc_mean": statistics.fmean(acc) if acc else None,
                    "acc_sd": sd(acc) if acc else None, "bitops": statistics.fmean(bo) if bo else None,
                    "wbits": statistics.fmean(wb) if wb else None, "per_seed": [r["accuracy"] for r in rs],
                    "refused": len(rs) - len(acc)})
    return out


def write(res, out, args, wall):
    st = summarize(res)
    uniform = [s for s in st if s["row"].startswith("fixed") and s["bitops"]]
    if args.method == "mebqat":     # MEBQAT at each pair next to the dedicated run at that pair
        ded = {s["row"].split()[-1]: s for s in st if s["row"].startswith("fixed")}
        for s in st:
            if s["row"].startswith("mebqat at") and s["row"].split()[-1] in ded:
                s["vs_dedicated"] = s["acc_mean"] - ded[s["row"].split()[-1]]["acc_mean"]
            tag = s["row"].split("budget BitOPs(")[-1].rstrip(")") if "budget BitOPs(" in s["row"] else None
            if tag in ded and s["acc_mean"] is not None:   # selection / AdaQAT at the uniform map's BitOPs
                s["vs_dedicated"] = s["acc_mean"] - ded[tag]["acc_mean"]
    print(f"\n{args.method} on Fashion-MNIST ({args.model}, {args.subset or '60000,10000'} samples, {args.epochs} "
          f"epoch(s) from a {args.float_epochs}-epoch float run, seeds {args.seeds}); {wall:.0f} s")
    print(f"{'row':<46}{'acc mean':>9}{'sd':>7}{'BitOPs':>10}{'hid w bits':>11}  per seed")
    for s in st:
        bo = f"{s['bitops']:.3g}" if s["bitops"] else "-"
        wb = f"{s['wbits']:.2f}" if s["wbits"] is not None else "-"
        note = ""
        if args.method == "adaqat" and s["row"].startswith("adaqat") and uniform:
            ok = [u for u in uniform if u["bitops"] <= s["bitops"]]
            if ok:
                best = max(ok, key=lambda u: u["acc_mean"])
                note = f"  vs best uniform at <= BitOPs ({best['row']}): {(s['acc_mean'] - best['acc_mean']) * 100:+.2f} pt"
            else:
                note = "  (cheaper than every uniform row)"
        if "vs_dedicated" in s:
            note = f"  vs dedicated fixed: {s['vs_dedicated'] * 100:+.2f} pt"
        if s["acc_mean"] is None:
            print(f"{s['row']:<46}{'refused':>9}{'':>7}{bo:>10}{wb:>11}  by the export gate on every seed")
            continue
        print(f"{s['row']:<46}{s['acc_mean']:>9.2%}{s['acc_sd']:>7.2%}{bo:>10}{wb:>11}  "
              + " ".join("refused" if a is None else f"{a:.2%}" for a in s["per_seed"]) + note)
    with open(out / "runs.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["row", "seed", "accuracy", "bitops", "wbits", "map"])
        w.writeheader()
        w.writerows({k: r.get(k) for k in w.fieldnames} for r in res)
    (out / "summary.json").write_text(json.dumps({"rows": st, "wall_s": wall,
                                                  "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))
    _plot(st, out / f"{args.method}.png", args)
    print(f"wrote {out / 'runs.csv'}, summary.json, {args.method}.png")


def _plot(st, path, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [s for s in st if s["wbits"] is not None and s["row"] != "FP32" and s["acc_mean"] is not None]
    for fam, mk in (("fixed", "o"), (args.method, "s")):
        pts = [s for s in xs if s["row"].startswith(fam)]
        ax.errorbar([s["wbits"] for s in pts], [s["acc_mean"] for s in pts], yerr=[s["acc_sd"] for s in pts],
                    fmt=mk, alpha=0.7, label=fam)
    fp = next(s for s in st if s["row"] == "FP32")
    ax.axhline(fp["acc_mean"], color="k", ls=":", label="FP32")
    ax.set_xlabel("average hidden-layer weight bits")
    ax.set_ylabel("Fashion-MNIST test accuracy (mean +- sd)")
    ax.set_title(f"{args.method}, {args.model}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
