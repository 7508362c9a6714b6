"""Cost-model fidelity: a board's cost model vs BitOPs, predicting *measured* costs it never saw.

    python benchmarks/cost_fidelity.py [--targets ulx3s-85f host-cpu] [--layers 40] [--models 10]
                                       [--out runs/fidelity]

Per target:
* held-out layers: --layers one-layer configurations with shapes and widths that are not in the
  table's measurement grid, each measured by the real flow (ulx3s-85f: yosys LUT4 of the
  building block; host-cpu: TVM latency);
* whole models: --models digits MLPs at random per-layer widths (trained 1 epoch, exported,
  built: ulx3s-85f synthesized with the table's folding; host-cpu compiled by TVM and timed; FINN boards
  such as pynq-z2 built by FINN as `bitfold build` builds them, its LUT estimate - whole models only).

Prediction: the board's cost table (as shipped or calibrated; no refit on these points) and
BitOPs (MACs * b_w * b_a) scaled by the least-squares factor that fits these very points best
(BitOPs has no unit; the factor is its best case). Prints Spearman rho and MAPE side by side and
writes fidelity.csv + fidelity.png into --out. Measured values are kept in --out/measured.json
(and the trained models in --out/models/): running again after a refit re-scores without
re-measuring (--remeasure measures again). Syntheses run as Dask tasks (``--scheduler HOST:PORT``, a
local cluster by default, ``inprocess`` here); CPU timings run one at a time in this process.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore")

ECP5_SHAPES = [(48, 16), (96, 32), (128, 32), (32, 32), (112, 16), (16, 48), (80, 40), (64, 24)]
CPU_GRID = {"conv": [(8, 16, 8), (24, 24, 8), (12, 32, 6)], "linear": [(128, 64), (512, 128), (96, 96), (64, 256)],
            "bits": [3, 5, 8]}


def scores(pred, meas):
    from scipy.stats import spearmanr
    pred, meas = np.asarray(pred, float), np.asarray(meas, float)
    return float(spearmanr(pred, meas).statistic), float(np.mean(np.abs(pred - meas) / meas))


def loo_calibrated(pred, meas):
    """Each prediction scaled by the least-squares factor fitted to all the other (pred, meas) pairs."""
    p, m = np.asarray(pred, float), np.asarray(meas, float)
    out = []
    for i in range(len(p)):
        k = np.arange(len(p)) != i
        out.append(p[i] * (p[k] * m[k]).sum() / (p[k] * p[k]).sum())
    return np.array(out)


def bitops_fit(bitops, meas):
    b, m = np.asarray(bitops, float), np.asarray(meas, float)
    return b * float((b * m).sum() / (b * b).sum())


class Cache:
    """Measured values by configuration, kept in ``--out/measured.json``: a rerun (e.g. after
    refitting a table) predicts again without synthesizing or timing again."""

    def __init__(self, path: Path):
        self.path = path
        self.values = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key, measure):
        if key not in self.values:
            self.values[key] = float(measure())
            from bitfold.core.atomic import write_json
            write_json(self.path, self.values)
        return self.values[key]


CACHE: Cache | None = None


SCHEDULER: str | None = None     # --scheduler: where the synthesis tasks run (bitfold.core.tasks)


def synth_layer_task(board_name, i, n_in, n_out, bw, ba, bout) -> float:
    """One held-out block synthesized by yosys (a Dask task)."""
    from bitfold.boards import load_board
    from bitfold.export.open_fpga.probe import one_layer_intmodel, synth_block
    return float(synth_block(one_layer_intmodel(n_in, n_out, bw, ba, seed=i, b_out=bout), n_in, n_out,
                             load_board(board_name))[0][0])


def measure_all(items, fn, parallel: bool):
    """``{cache key: value}`` for ``items = [(cache key, args)]``: cached values reused, the others
    measured by ``fn(*args)`` - as Dask tasks when ``parallel`` (synthesis: the count does not depend
    on the machine's load), else one at a time here (timings must not share the machine)."""
    from bitfold.core.tasks import Task, failures, run_tasks
    todo = [(k, a) for k, a in items if k not in CACHE.values]
    if parallel and todo:
        tasks = [Task(k, fn, a) for k, a in todo]
        res = run_tasks(tasks, scheduler=SCHEDULER)
        bad = failures(res)
        if bad:
            raise SystemExit("failed: " + "; ".join(map(str, bad)))
        for t in tasks:
            CACHE.get(t.name, lambda v=res[t.key]: v)
    elif todo:
        for k, a in todo:
            CACHE.get(k, lambda a=a: fn(*a))
    return {k: CACHE.values[k] for k, _ in items}


def ecp5_layers(board, n, rng):
    """n held-out one-layer blocks, synthesized as Dask tasks (yosys is one process each)."""
    from bitfold.hw_models.table import find_table, mvau_cost
    from bitfold.toolchain.describe import LayerDesc
    cm = find_table(board.name)
    cfgs = []
    for i in range(n):
        n_in, n_out = ECP5_SHAPES[i % len(ECP5_SHAPES)]
        cfgs.append((i, n_in, n_out, rng.choice([2, 3, 4, 5, 6]), rng.choice([2, 3, 4, 5]), rng.choice([None, 2, 3, 4, 5])))
    name = (lambda c: f"{board.name} layer {c[0]} {c[1]}x{c[2]} W{c[3]}A{c[4]}->{c[5] or 'raw'}")
    luts = measure_all([(name(c), (board.name, *c)) for c in cfgs], synth_layer_task, parallel=True)
    rows = []
    for c in cfgs:
        i, n_in, n_out, bw, ba, bout = c
        lut = luts[name(c)]
        k = cm.table["kinds"]["linear"]
        if k.get("form") == "features":   # the measured design: this block, streaming its output to the host
            pred = float(mvau_cost(k, n_in, n_out, n_in, bw, ba, bout))   # one block: no whole-model factor
        else:
            d = LayerDesc("l", "linear", (n_in,), (n_out,), n_in, n_out, (1, 1), (1, 1), 1, n_in * n_out, n_in * n_out, None)
            pred = float(cm([d], {"l": (bw, ba)}).total)
        cfg = f"{n_in}x{n_out} W{bw}A{ba}->{bout or 'raw'}"
        rows.append({"target": board.name, "what": "layer", "config": cfg,
                     "measured": float(lut), "predicted": pred, "bitops": n_in * n_out * bw * ba})
        print(f"  layer {i + 1}/{n}: {cfg:<22} measured {lut:>7,.0f} predicted {pred:>9,.0f}", flush=True)
    return rows


def _mlp_at(bits, root: Path, fmt: str):
    from bitfold.export.onnx_export import export_run
    from bitfold.toolchain.runs import TrainConfig
    from bitfold.toolchain.train import train
    name = "_".join(f"{v['w']}{v['a']}" for v in bits.values())
    if (root / f"{name}.onnx").is_file():
        return root / name, root / f"{name}.onnx"
    train(TrainConfig(model="mlp", bits=bits, epochs=1), root / name, progress=False)
    # qcdq here feeds TVM (int32 accumulation): full-range 8-bit layers are what it measures
    return root / name, export_run(root / name, fmt, root / f"{name}.onnx", allow_saturation=fmt == "qcdq").path


def _random_bits(rng):
    return {k: {"w": rng.choice([2, 3, 4, 5, 6]), "a": rng.choice([2, 3, 4, 5])} for k in ("fcs.0", "fcs.1", "fcs.2", "head")}


def _table_cost(cm, run_dir, bits):
    from bitfold.toolchain.describe import describe_layers
    from bitfold.toolchain.runs import load_run
    _, model, ck = load_run(run_dir)
    layers = describe_layers(model, tuple(ck["input_shape"]))
    return float(cm(layers, {k: (v["w"], v["a"]) for k, v in bits.items()}).total), \
        sum(d.macs * bits[d.name]["w"] * bits[d.name]["a"] for d in layers)


def whole_models(board, n, rng, root, fmt, measure_one, unit="", parallel=False):
    """n digits MLPs at random per-layer widths: trained 1 epoch and exported (fmt) one after the
    other, then measured by ``measure_one(board name, onnx, build dir)`` (see measure_all)."""
    from bitfold.hw_models.table import find_table
    cm = find_table(board.name)
    made = []
    for i in range(n):
        bits = _random_bits(rng)
        run, onnx = _mlp_at(bits, root, fmt)
        made.append((i, bits, run, onnx))
    keys = [f"{board.name} model {m[3].stem}" for m in made]
    vals = measure_all([(k, (board.name, str(m[3]), str(root / f"b{m[0]}"))) for k, m in zip(keys, made)],
                       measure_one, parallel)
    rows = []
    for (i, bits, run, onnx), key in zip(made, keys):
        value = vals[key]
        pred, bo = _table_cost(cm, run, bits)
        cfg = " ".join(f"W{v['w']}A{v['a']}" for v in bits.values())
        rows.append({"target": board.name, "what": "model", "config": cfg, "measured": float(value), "predicted": pred,
                     "bitops": bo})
        print(f"  model {i + 1}/{n}: {cfg:<22} measured {value:>10.4g} predicted {pred:>10.4g} {unit}", flush=True)
    return rows


def fpga_model_luts(board_name, onnx, d) -> float:
    """LUT4 of one whole model synthesized with the table's folding (a Dask task)."""
    from bitfold.boards import load_board
    from bitfold.core.atomic import write_json
    from bitfold.export.lower import lower
    from bitfold.export.open_fpga.flow import build
    from bitfold.export.open_fpga.probe import model_resources
    from bitfold.hw_models.fpga_rules import table_folding
    d = Path(d)
    fold = d.with_suffix(".fold.json")
    write_json(fold, table_folding(lower(onnx)).as_dict())
    build(onnx, load_board(board_name), d, folding=fold, verify=False, bitstream=False)
    return float(model_resources(d / "build.json")["lut"])


def finn_model_luts(board_name, onnx, d) -> float:
    """FINN's LUT estimate of one whole model as `bitfold build` builds it (no folding or rate given:
    FINN's default for the board), no verification - a Dask task."""
    from bitfold.export.backends import build
    build(onnx, board_name, d, verify=False, bitstream=False)
    return float(json.loads((Path(d) / "build.json").read_text())["totals"]["LUT"])


def finn_models(board, n, rng, root):
    return whole_models(board, n, rng, root, "qonnx", finn_model_luts, "LUT", parallel=True)


def cpu_model_latency(board_name, onnx, d) -> float:
    import bitfold.export.tvm.backend as tvm_backend
    from bitfold.boards import load_board
    tvm_backend.build(onnx, load_board(board_name), d)
    return tvm_backend.measure_local(d)["median"]


def ecp5_models(board, n, rng, root):
    return whole_models(board, n, rng, root, "qonnx", fpga_model_luts, "LUT4", parallel=True)


def cpu_layers(board, n):
    from bitfold.hw_models.table import find_table
    from bitfold.export.tvm.probe import measure
    from bitfold.toolchain.describe import LayerDesc
    cm = find_table(board.name)
    rows = []
    for r in measure(board, CPU_GRID)[:n]:
        k = r.kernel
        d = LayerDesc("l", r.kind, (), (), r.in_features, r.out_features, (k, k), (1, 1), 1, r.macs, r.weights, None)
        pred = float(cm([d], {"l": (r.b_w, r.b_a)}).total)
        rows.append({"target": board.name, "what": "layer", "config": f"{r.kind} {r.in_features}x{r.out_features} "
                     f"W{r.b_w}A{r.b_a}", "measured": r.value, "predicted": pred, "bitops": r.macs * r.b_w * r.b_a})
    return rows


def cpu_models(board, n, rng, root):
    return whole_models(board, n, rng, root, "qcdq", cpu_model_latency, "s", parallel=False)   # timings: one at a time


def main():
    from bitfold.boards import load_board
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", nargs="+", default=["ulx3s-85f", "host-cpu"])
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--models", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("runs/fidelity"))
    ap.add_argument("--remeasure", action="store_true", help="ignore --out/measured.json (values measured by an "
                    "earlier run with the same --out, reused by default so a refitted table is re-scored for free)")
    ap.add_argument("--summarize", type=Path, help="re-print the summary of an earlier run's fidelity.csv (no measuring)")
    ap.add_argument("--scheduler", default=None, help="Dask scheduler HOST:PORT for the synthesis tasks; "
                    "'inprocess' runs them here (default: a local cluster on the free cores)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    global CACHE, SCHEDULER
    SCHEDULER = args.scheduler
    CACHE = Cache(args.out / "measured.json")
    if args.remeasure:
        CACHE.values = {}
    rng = random.Random(1)
    rows = []
    if args.summarize:
        with open(args.summarize) as fh:
            rows = [{**r, **{k: float(r[k]) for k in ("measured", "predicted", "bitops")}} for r in csv.DictReader(fh)]
        args.targets = [t for t in args.targets if any(r["target"] == t for r in rows)]
    for t in ([] if args.summarize else args.targets):
        b = load_board(t)
        print(f"{t}:", flush=True)
        root = args.out / "models" / t
        root.mkdir(parents=True, exist_ok=True)
        if b.backend == "finn":   # whole models only: the table's own rows are FINN's one-layer estimates
            rows += finn_models(b, args.models, rng, root)
        elif b.kind == "fpga":
            rows += ecp5_layers(b, args.layers, rng) + ecp5_models(b, args.models, rng, root)
        else:
            rows += cpu_layers(b, args.layers) + cpu_models(b, args.models, rng, root)
    summary = []
    print(f"\n{'target':<11}{'set':<7}{'n':>4} | {'board model rho':>15} {'MAPE':>8} | {'BitOPs (LS) rho':>15} {'MAPE':>8}")
    for t in args.targets:
        for what in ("layer", "model"):
            sel = [r for r in rows if r["target"] == t and r["what"] == what]
            if len(sel) < 3:
                continue
            meas = [r["measured"] for r in sel]
            rb, mb = scores([r["predicted"] for r in sel], meas)
            bo = bitops_fit([r["bitops"] for r in sel], meas)
            for r, v in zip(sel, bo):
                r["bitops_scaled"] = float(v)
            ro, mo = scores(bo, meas)
            summary.append({"target": t, "set": what, "n": len(sel), "board_rho": rb, "board_mape": mb,
                            "bitops_rho": ro, "bitops_mape": mo})
            print(f"{t:<11}{what:<7}{len(sel):>4} | {rb:>15.3f} {mb:>8.1%} | {ro:>15.3f} {mo:>8.1%}")
            if what == "model":   # the same best-case single factor BitOPs gets, for parity
                rs, ms_ = scores(bitops_fit([r["predicted"] for r in sel], meas), meas)
                summary[-1].update(board_ls_rho=rs, board_ls_mape=ms_)
                print(f"{t:<11}{'  (LS)':<7}{len(sel):>4} | {rs:>15.3f} {ms_:>8.1%} |   (board model x the least-squares "
                      f"factor fitted to these points, as BitOPs)")
                # what bitfold run does: a whole-model factor fitted to the *other* models
                loo = loo_calibrated([r["predicted"] for r in sel], meas)
                rl, ml = scores(loo, meas)
                summary[-1].update(board_loo_rho=rl, board_loo_mape=ml)
                print(f"{t:<11}{'  +cal':<7}{len(sel):>4} | {rl:>15.3f} {ml:>8.1%} |   (board model x whole-model "
                      f"factor fitted leave-one-out, as bitfold run recalibrates)")
    with open(args.out / "fidelity.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["target", "what", "config", "measured", "predicted", "bitops", "bitops_scaled"])
        w.writeheader()
        w.writerows(rows)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    _plot(rows, args.targets, args.out / "fidelity.png")
    print(f"wrote {args.out / 'fidelity.csv'}, summary.json, fidelity.png")


def _plot(rows, targets, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 4.5), squeeze=False)
    for ax, t in zip(axes[0], targets):
        sel = [r for r in rows if r["target"] == t and "bitops_scaled" in r]
        m = [r["measured"] for r in sel]
        ax.scatter(m, [r["predicted"] for r in sel], label="board model", s=14)
        ax.scatter(m, [r["bitops_scaled"] for r in sel], label="BitOPs (LS-scaled)", marker="x", s=14)
        lim = [min(m) * 0.8, max(m) * 1.25]
        ax.plot(lim, lim, "k:", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("measured")
        ax.set_ylabel("predicted")
        ax.set_title(t)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
