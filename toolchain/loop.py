"""``bitfold run``: the closed loop - train against the board's cost model, export, build, measure,
record, recalibrate, repeat.

Stages of round r live in ``OUT/round<r>/<stage>/`` and each writes ``stage.json`` with the hash of
its inputs; a re-run skips a stage whose inputs did not change and redoes it (and what follows)
otherwise. A failed stage leaves the finished ones untouched. Boards: CPU boards measured on this
host (``host-cpu``); FPGA and remote boards need their backends' measurement drivers.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from .atomic import write_json
from .errors import BitfoldError


def _sha(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, Path) and p.is_file():
            h.update(p.read_bytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _stage(dir_: Path, key: str, fn, log):
    """Run ``fn(dir)`` unless ``dir/stage.json`` records the same input hash; return its result."""
    marker = dir_ / "stage.json"
    if marker.is_file():
        rec = json.loads(marker.read_text())
        if rec.get("inputs") == key:
            log(f"  {dir_.name}: up to date, skipped")
            return rec["result"]
    if dir_.exists():
        shutil.rmtree(dir_)
    dir_.mkdir(parents=True)
    result = fn(dir_)
    write_json(marker, {"inputs": key, "result": result})
    log(f"  {dir_.name}: done")
    return result


def run_loop(out, board: str, method: str = "adaqat", budget: str | None = None, rounds: int = 1,
             model: str = "cnn", data: str = "digits", epochs: int = 10, bits: str = "w8a8", lam: float = 1.0,
             log=print) -> dict:
    from bitfold.boards import load_board
    from bitfold.export import tvm_backend
    from bitfold.export.backends import build
    from bitfold.export.onnx_export import export_run
    from bitfold.hw_models.store import Measurement, MeasurementStore
    from bitfold.hw_models.table import fit_table, table_path
    from bitfold.hw_models.tvm_latency import QUICK_GRID, device_id, measure

    from .runs import TrainConfig
    from .select_bits import parse_budget
    from .train import train

    b = load_board(board)
    if b.backend != "tvm" or not tvm_backend.is_host(b):
        raise BitfoldError(f"bitfold run measures on this host; board {b.name} ({b.backend}) needs its own "
                           "measurement driver, not in this version", "use --board host-cpu")
    metric, limit = parse_budget(budget) if budget else ("latency", None)
    if metric != "latency":
        raise BitfoldError(f"host-cpu tables measure latency, not {metric!r}", 'use --budget "latency<=Xms"')
    out = Path(out)
    store = MeasurementStore(out / "measurements.sqlite")
    history = []

    def calibrate_table(d, rows):
        store.add(rows)
        table = fit_table(store.query(b.name, "latency"), b.name, "latency")
        write_json(table_path(b.name), table)
        write_json(d / "table.json", table)
        return {"rows": len(rows), "table": str(d / "table.json")}

    log(f"round 0: cost table for {b.name}")
    _stage(out / "round0" / "calibrate", _sha("calibrate", b.name, QUICK_GRID),
           lambda d: calibrate_table(d, measure(b, QUICK_GRID)), log)
    for r in range(1, rounds + 1):
        rd = out / f"round{r}"
        log(f"round {r}")
        table_file = out / f"round{r - 1}" / ("calibrate" if r == 1 else "recalibrate") / "table.json"
        opts = {"cost": b.name, "lam": lam, "finetune_epochs": max(1, epochs // 5)}
        if limit is not None:
            opts["budget"] = limit
        cfg = TrainConfig(model=model, data=data, bits=bits, method=method, epochs=epochs,
                          method_options=opts if method == "adaqat" else {})

        def do_train(d, cfg=cfg, table_file=table_file):
            write_json(table_path(b.name), json.loads(table_file.read_text()))  # train against this round's table
            m = train(cfg, d / "run", progress=False)
            return {"accuracy": m["accuracy"], "predicted": (m.get("adaqat") or {}).get("final_cost"),
                    "bit_map": {x["name"]: {"w": x["w"], "a": x["a"]} for x in m["layers"]}}
        tr = _stage(rd / "train", _sha(cfg.to_json(), table_file), do_train, log)
        ck = rd / "train" / "run" / "checkpoint.pt"
        ex = _stage(rd / "export", _sha("export", ck),
                    lambda d: {"onnx": str(export_run(rd / "train" / "run", "qcdq", d / "model.onnx").path)}, log)
        bd = _stage(rd / "build", _sha("build", Path(ex["onnx"]), b.name),
                    lambda d: build(ex["onnx"], b.name, d / "tvm").as_dict(), log)

        def do_measure(d):
            t = tvm_backend.measure_local(Path(bd["out_dir"]))
            store.add([Measurement(board=b.name, kind="model", macs=0, weights=0, b_w=0, b_a=0, metric="latency",
                                   value=t["median"], unit="s", source="measured", tool="tvm", tool_version=t["tvm"],
                                   device_id=device_id(), extra={"run": str(out), "round": r, **t})])
            return t
        ms = _stage(rd / "measure", _sha("measure", Path(bd["out_dir"]) / "model.so"), do_measure, log)
        # recalibrate: measure this model's own layer shapes at its widths and refit the table
        shapes = _layer_grid(rd / "train" / "run", tr["bit_map"])
        _stage(rd / "recalibrate", _sha("recal", ms, shapes), lambda d: calibrate_table(d, measure(b, shapes)), log)
        history.append({"round": r, "accuracy": tr["accuracy"], "predicted_latency": tr["predicted"],
                        "measured_latency": ms["median"], "p10": ms["p10"], "p90": ms["p90"],
                        "bit_map": tr["bit_map"], "budget": limit, "onnx": ex["onnx"], "build": bd["out_dir"]})
    report = write_report(out, b.name, history)
    return {"history": history, "report": str(report)}


def _layer_grid(run_dir, bit_map) -> dict:
    """A measurement grid made of the trained model's own layer shapes and widths."""
    from .describe import describe_layers
    from .runs import load_run
    cfg, model, ck = load_run(run_dir)
    grid = {"conv": [], "linear": [], "bits": sorted({v["w"] for v in bit_map.values()} | {v["a"] for v in bit_map.values()})}
    for d in describe_layers(model, tuple(ck["input_shape"])):
        if d.kind == "conv" and d.kernel == (3, 3) and d.groups == 1:
            grid["conv"].append((d.in_features, d.out_features, d.in_shape[-1]))
        elif d.kind == "linear":
            grid["linear"].append((d.in_features, d.out_features))
    grid["conv"] = sorted(set(grid["conv"]))[:3]
    grid["linear"] = sorted(set(grid["linear"]))[:3]
    return grid


def write_report(out: Path, board: str, history: list) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([h["measured_latency"] * 1e3 for h in history], [h["accuracy"] for h in history], "o-", label="measured")
    pred = [(h["predicted_latency"] * 1e3, h["accuracy"]) for h in history if h["predicted_latency"]]
    if pred:
        ax.plot([p[0] for p in pred], [p[1] for p in pred], "x--", label="predicted (cost table)")
    if history and history[0]["budget"]:
        ax.axvline(history[0]["budget"] * 1e3, color="r", ls=":", label="budget")
    ax.set_xlabel(f"latency on {board} (ms)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=90)
    plt.close(fig)
    lines = [f"# bitfold run on {board}", "", "| round | accuracy | predicted latency | measured latency (p10-p90) | bits |",
             "|---|---|---|---|---|"]
    for h in history:
        pred = f"{h['predicted_latency'] * 1e3:.3f} ms" if h["predicted_latency"] else "-"
        bits = " ".join(f"{k}:W{v['w']}A{v['a']}" for k, v in h["bit_map"].items())
        lines.append(f"| {h['round']} | {h['accuracy']:.2%} | {pred} | {h['measured_latency'] * 1e3:.3f} ms "
                     f"({h['p10'] * 1e3:.3f}-{h['p90'] * 1e3:.3f}) | {bits} |")
    if history and history[0]["budget"]:
        lines += ["", f"Budget: latency <= {history[0]['budget'] * 1e3:.3f} ms."]
    lines += ["", "![accuracy vs measured latency](report.png)", "",
              "Artefacts: " + ", ".join(f"round {h['round']}: {h['onnx']}, {h['build']}" for h in history)]
    path = out / "report.md"
    write_json(out / "report.json", history)
    path.write_text("\n".join(lines) + "\n")
    return path
