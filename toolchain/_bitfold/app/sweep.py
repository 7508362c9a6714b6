"""``bitfold sweep GRID.toml``: train + export + build + measure over a grid of settings, on Dask.

A grid file holds the settings every point shares and the lists to combine::

    [sweep]                       # shared by every point
    board = "host-cpu"            # required (here or in a grid)
    model = "mlp"
    data = "digits"
    epochs = 2

    [sweep.options]               # training-method options shared by every point
    learn_edges = true

    [[grid]]                      # one block: every combination of its lists is a point
    method = ["fixed"]
    bits = ["w2a2:all", "w4a4:all", "w8a8:all"]
    seed = [0, 1, 2]

    [[grid]]                      # blocks add up (a single [grid] table works too)
    method = ["adaqat"]
    bits = ["w8a8:all"]
    cost = ["board", "bitops"]    # AdaQAT's width loss: the board's cost table, or BitOPs
    lam = [0.3, 1.0, 3.0]
    seed = [0, 1, 2]

Keys (:data:`KEYS`): board, method, model, data, bits, epochs, seed, subset ([train, test]
sample counts), lam, cost, budget ("lut<=20000"), fps (FPGA: the rate to fold for), verify,
bitstream, tracker/key (a CPU board behind a TVM RPC tracker), device (cpu | cuda: a point
that trains on a GPU asks the cluster for one), options (a table of method options;
in a grid block, a table of lists).

Each point is one :class:`~bitfold.core.tasks.Task` keyed by the hash of its settings: trained,
exported with the board's format, built with the board's flow and - for FPGA boards, whose cost
is the synthesized design (FINN boards: FINN's estimate of the design it builds) - measured on the
worker. Latencies of CPU boards are timed after the
parallel phase, one build at a time, so that no timing shares the machine with training or with
another timing. Only this process writes: ``OUT/points/<key>/result.json`` per point (a re-run
skips finished points), the measurement rows in ``OUT/measurements.sqlite``, and
``OUT/sweep.csv``, ``OUT/sweep.json`` and ``OUT/pareto.png`` (accuracy vs measured cost; with
several seeds, each configuration's mean +- sd; its Pareto front). On a cluster ``OUT`` must be on
a file system the workers share.
"""
from __future__ import annotations

import csv
import itertools
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bitfold.core.atomic import atomic_path, write_json
from bitfold.core.errors import BitfoldError

#: grid keys and the types their values must have
KEYS = {"board": str, "method": str, "model": str, "data": str, "bits": str, "epochs": int, "seed": int,
        "subset": list, "lam": (int, float), "cost": str, "budget": str, "fps": (int, float), "verify": bool,
        "bitstream": bool, "tracker": str, "key": str, "device": str, "options": dict}
#: keys that only steer AdaQAT's width learning
ADAQAT_KEYS = ("lam", "cost", "budget")


@dataclass(frozen=True)
class Point:
    """One configuration of a sweep (every setting explicit, so that its hash is its identity)."""
    board: str
    method: str = "fixed"
    model: str | None = None
    data: str = "digits"
    bits: str | None = None
    epochs: int = 2
    seed: int = 0
    subset: tuple | None = None
    lam: float | None = None
    cost: str | None = None          # "board" (the default for adaqat) or a cost model name (bitops)
    budget: str | None = None
    fps: float | None = None
    verify: bool = True
    bitstream: bool = False
    tracker: str | None = None
    key: str | None = None
    device: str = "cpu"              # training device; "cuda" points ask the cluster for a GPU
    options: tuple = ()              # sorted (name, value) pairs of method options

    def settings(self) -> dict:
        d = asdict(self)
        d["options"] = dict(self.options)
        d["subset"] = list(self.subset) if self.subset else None
        return d

    def label(self, varying: list[str]) -> str:
        """The point's values of the settings that vary across the sweep (seed excluded)."""
        s = self.settings()
        parts = []
        for k in varying:
            if k == "seed":
                continue
            v = s["options"].get(k[8:]) if k.startswith("options.") else s[k]
            if v is not None:
                parts.append(f"{k[8:] if k.startswith('options.') else k}={v}")
        return " ".join(parts) or "all"

    @property
    def config(self) -> "Point":
        """The same point without its seed (the unit that seeds are averaged over)."""
        return replace(self, seed=0)


def load_grid(path: str | Path) -> list[Point]:
    """Read a grid file into its points (in file order, duplicates once); one clear error per mistake."""
    import tomllib
    p = Path(path)
    if p.is_dir():
        raise BitfoldError(f"{p} is a directory, not a grid file", "pass the TOML grid file (see `bitfold sweep --help`)")
    if not p.is_file():
        raise BitfoldError(f"grid file {p} does not exist", "write a TOML grid (see `bitfold sweep --help`)")
    try:
        doc = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BitfoldError(f"grid file {p} is not valid TOML: {e}", "fix the line it names") from None
    return grid_points(doc, where=str(p))


def grid_points(doc: dict, where: str = "grid") -> list[Point]:
    """The points of a parsed grid document (see the module docstring)."""
    unknown = set(doc) - {"sweep", "grid"}
    if unknown:
        raise BitfoldError(f"{where}: unknown section(s) {', '.join(sorted(unknown))}", "use [sweep] and [grid] / [[grid]]")
    base = doc.get("sweep", {})
    if not isinstance(base, dict):
        raise BitfoldError(f"{where}: [sweep] must be a table of settings", 'e.g. [sweep] board = "host-cpu"')
    _check_values(base, where, "[sweep]", lists=False)
    blocks = doc.get("grid", [{}])
    blocks = [blocks] if isinstance(blocks, dict) else blocks
    if not isinstance(blocks, list) or not all(isinstance(b, dict) for b in blocks):
        raise BitfoldError(f"{where}: [grid] must be a table of lists (or [[grid]] tables)", "e.g. seed = [0, 1, 2]")
    points: dict[Point, None] = {}
    for i, block in enumerate(blocks):
        name = f"[[grid]] #{i + 1}" if len(blocks) > 1 else "[grid]"
        _check_values(block, where, name, lists=True)
        axes = [(k, v) for k, v in block.items() if k != "options"]
        axes += [(f"options.{k}", v) for k, v in block.get("options", {}).items()]
        for combo in itertools.product(*[v for _, v in axes]):
            s = {k: v for k, v in base.items() if k != "options"}
            opts = dict(base.get("options", {}))
            for (k, _), v in zip(axes, combo):
                if k.startswith("options."):
                    opts[k[8:]] = v
                else:
                    s[k] = v
            points[_point(s, opts, where)] = None
    if not points:
        raise BitfoldError(f"{where}: the grid has no points", "give every grid key at least one value")
    return list(points)


def _check_values(table: dict, where: str, name: str, lists: bool):
    for k, v in table.items():
        if k not in KEYS:
            raise BitfoldError(f"{where}: unknown key {k!r} in {name}", f"keys are: {', '.join(KEYS)}")
        if k == "options":
            if not isinstance(v, dict):
                raise BitfoldError(f"{where}: {name} options must be a table", f"[{'grid' if lists else 'sweep'}.options]")
            if lists:
                for ok, ov in v.items():
                    if not isinstance(ov, list) or not ov:
                        raise BitfoldError(f"{where}: {name} options.{ok} must be a non-empty list",
                                           f"e.g. {ok} = [{ov!r}]")
            continue
        vals = v if lists else [v]
        if lists and (not isinstance(v, list) or not v):
            raise BitfoldError(f"{where}: {name} {k} must be a non-empty list of values", f"e.g. {k} = [{v!r}]")
        for x in vals:
            want = KEYS[k]
            if k == "subset":
                ok = isinstance(x, list) and len(x) == 2 and all(isinstance(n, int) and n > 0 for n in x)
            else:
                ok = isinstance(x, want) and not (want is int and isinstance(x, bool))
            if not ok:
                raise BitfoldError(f"{where}: {name} {k} = {x!r} has the wrong type",
                                   "subset is [train, test] counts" if k == "subset" else
                                   f"{k} takes {getattr(want, '__name__', 'a number')}")


def _point(s: dict, opts: dict, where: str) -> Point:
    if "board" not in s:
        raise BitfoldError(f"{where}: no board", 'set board = "host-cpu" (or another board) in [sweep] or a grid')
    method = s.get("method", "fixed")
    if method != "adaqat":
        given = [k for k in ADAQAT_KEYS if k in s]
        if given:
            raise BitfoldError(f"{where}: {', '.join(given)} steer AdaQAT's width learning; method {method!r} "
                               "trains the widths in bits", "move them into a grid block with method = [\"adaqat\"]")
    if s.get("epochs", 2) < 1:
        raise BitfoldError(f"{where}: epochs must be >= 1")
    return Point(**{**s, "subset": tuple(s["subset"]) if s.get("subset") else None,
                    "lam": float(s["lam"]) if "lam" in s else None,
                    "fps": float(s["fps"]) if "fps" in s else None,
                    "options": tuple(sorted(opts.items()))})


def check_points(points: list[Point]):
    """Everything a point needs that can be checked before any work: boards, methods and their
    options, budgets, measurement targets."""
    from bitfold.boards import load_board
    from bitfold.toolchain.quant import get_method
    from bitfold.toolchain.select_bits import parse_budget
    seen = set()
    for p in points:
        sig = (p.board, p.method, p.options, p.budget, p.cost, p.fps is not None, p.tracker)
        if sig in seen:
            continue
        seen.add(sig)
        b = load_board(p.board)
        tgt = _target(p, b, None)
        if p.method != "float":
            get_method(p.method, **_method_options(p, b, tgt))
        if p.budget:
            metric, _ = parse_budget(p.budget)
            if metric != tgt.metric:
                raise BitfoldError(f"{b.name}'s cost table measures {tgt.metric}, not {metric!r}",
                                   f'write the budget as "{tgt.metric}<=X"')
        if p.fps is not None and (tgt.metric == "latency" or p.fps <= 0):
            raise BitfoldError(f"fps = {p.fps:g} for {b.name}: fps is an FPGA board's rate (> 0)", "drop fps")


def _target(p: Point, board, store):
    from bitfold.app.loop import loop_target
    tgt = loop_target(board, store, bitstream=p.bitstream, verify=p.verify, tracker=p.tracker, key=p.key)
    if p.fps is not None and tgt.metric != "latency":
        tgt.target_fps = p.fps
    return tgt


def _method_options(p: Point, board, tgt) -> dict:
    opts: dict = {}
    if p.method == "adaqat":
        from bitfold.toolchain.select_bits import parse_budget
        opts = {"cost": board.name if p.cost in (None, "board") else p.cost, "lam": 1.0 if p.lam is None else p.lam,
                "finetune_epochs": max(1, p.epochs // 5)}
        if p.budget:
            opts["budget"] = parse_budget(p.budget)[1]
        if p.fps is not None and opts["cost"] == board.name and table_has_rate(board.name):
            opts["target_fps"] = p.fps
    return opts | dict(p.options)


def table_has_rate(board: str) -> bool:
    from bitfold.hw_models.table import find_table
    t = find_table(board)
    return t is not None and t.prices_rate


class RowCollector:
    """A measurement store that keeps rows for the caller instead of writing them (tasks return
    their rows; only the sweep's own process writes the database)."""

    def __init__(self):
        self.rows: list = []

    def add(self, rows):
        self.rows.extend(rows)


def point_key(p: Point) -> str:
    import hashlib
    return hashlib.sha256(json.dumps(p.settings(), sort_keys=True).encode()).hexdigest()[:16]


def task_placement(device: str, scheduler: str | None, workers: int | None) -> tuple[int | None, dict]:
    """(torch threads per task, resources) for a training task: a worker gets the free cores shared
    by the workers (None in process: the trainer chooses), a "cuda" task asks for a GPU."""
    from bitfold.core.tasks import INPROCESS, distributed_available, free_cores
    here = scheduler == INPROCESS or not distributed_available()
    threads = None if here else max(1, free_cores() // max(1, workers or free_cores()))
    return threads, ({"GPU": 1} if device.startswith("cuda") else {"CPU": 1})


def prepare_point(out: str, p: Point, threads: int | None = None) -> dict:
    """Train, export and build one point under ``out/points/<key>/`` (and, for FPGA boards, read
    its measured resources). A Dask task: returns a JSON-ready record and the measurement rows."""
    import shutil

    from bitfold.app.loop import predicted_cost
    from bitfold.boards import load_board
    from bitfold.export.onnx_export import export_run
    from bitfold.hw_models.table import find_table
    from bitfold.toolchain.runs import TrainConfig
    from bitfold.toolchain.train import train
    if threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    d = Path(out) / "points" / point_key(p)
    if d.exists():       # a half-done point (a worker died): start it again
        shutil.rmtree(d)
    d.mkdir(parents=True)
    b = load_board(p.board)
    rows = RowCollector()
    tgt = _target(p, b, rows)
    cfg = TrainConfig(model=p.model or tgt.default_model, data=p.data, bits=p.bits or tgt.default_bits,
                      method=p.method, method_options=_method_options(p, b, tgt), epochs=p.epochs, seed=p.seed,
                      subset=p.subset, device=p.device)
    t0 = time.time()
    m = train(cfg, d / "run", progress=False)
    t_train = time.time() - t0
    bit_map = {x["name"]: {"w": x["w"], "a": x["a"]} for x in m["layers"]}
    table = find_table(b.name)
    predicted = None
    if table is not None:
        raw = predicted_cost(d / "run", table.source, bit_map, p.fps if table.prices_rate else None)
        predicted = raw * float(table.table.get("calibration", {}).get("scale", 1.0))
    onnx = export_run(d / "run", tgt.export_format, d / "model.onnx", allow_saturation=tgt.allow_int16_saturation).path
    t0 = time.time()
    bd = tgt.build(str(onnx), d)
    rec = {"key": point_key(p), "settings": p.settings(), "metric": tgt.metric, "unit": tgt.unit,
           "accuracy": m["accuracy"], "bitops": m.get("bitops"), "predicted": predicted,
           "bits": " ".join(f"W{x['w']}A{x['a']}" for x in m["layers"]), "build_dir": bd["out_dir"],
           "train_s": round(t_train, 1), "build_s": round(time.time() - t0, 1), "measured": None}
    if tgt.metric != "latency":      # the synthesized design's resources do not depend on the machine's load
        rec["measured"] = tgt.measure(bd["out_dir"], predicted or 0.0, {"sweep_point": rec["key"]})["value"]
    return {"record": rec, "rows": rows.rows}


def measure_point(rec: dict, p: Point) -> tuple[float, list]:
    """Time a CPU point's build (here, or on the board behind its tracker); (median s, rows)."""
    from bitfold.boards import load_board
    rows = RowCollector()
    tgt = _target(p, load_board(p.board), rows)
    return tgt.measure(rec["build_dir"], rec["predicted"] or 0.0, {"sweep_point": rec["key"]})["value"], rows.rows


def run_sweep(points: list[Point], out: str | Path, scheduler: str | None = None, workers: int | None = None,
              events=None) -> dict:
    """Run every point (module docstring); returns ``{"rows", "configurations", "failed", "files", "ran",
    "skipped"}``."""
    from bitfold.core.events import events_of
    from bitfold.core.tasks import Task, TaskFailure, run_tasks
    from bitfold.hw_models.store import MeasurementStore
    ev = events_of(events)
    check_points(points)
    out = Path(out).resolve()
    (out / "points").mkdir(parents=True, exist_ok=True)
    done: dict[str, dict] = {}
    for p in points:
        f = out / "points" / point_key(p) / "result.json"
        if f.is_file():
            done[point_key(p)] = json.loads(f.read_text())
    todo = [p for p in points if point_key(p) not in done]
    ev.say(f"sweep: {len(points)} point(s), {len(points) - len(todo)} already done")
    varying = varying_keys(points)
    tasks = []
    for p in todo:
        threads, res = task_placement(p.device, scheduler, workers)
        tasks.append(Task(f"{p.label(varying)} seed={p.seed}", prepare_point, (str(out), p, threads), res))
    by_task = {t.key: p for t, p in zip(tasks, todo)}
    results = run_tasks(tasks, scheduler=scheduler, workers=workers, events=ev) if tasks else {}
    store = MeasurementStore(out / "measurements.sqlite")
    failed = []
    timed = [(k, r) for k, r in results.items() if not isinstance(r, TaskFailure) and r["record"]["measured"] is None]
    if timed:
        ev.say(f"timing {len(timed)} CPU build(s), one at a time")
    for k, r in results.items():
        p = by_task[k]
        if isinstance(r, TaskFailure):
            failed.append({"point": str(r.name), "key": point_key(p), "error": r.error})
            continue
        rec = r["record"]
        if rec["measured"] is None:
            rec["measured"], more = measure_point(rec, p)
            r["rows"] = r["rows"] + more
        store.add(r["rows"])
        write_json(out / "points" / rec["key"] / "result.json", rec)
        done[rec["key"]] = rec
    rows = [done[point_key(p)] for p in points if point_key(p) in done]
    stats = summarize(points, rows)
    files = write_outputs(out, points, rows, stats, failed)
    return {"rows": rows, "configurations": stats, "failed": failed,
            "files": files, "ran": len(todo) - len(failed), "skipped": len(points) - len(todo)}


def varying_keys(points: list[Point]) -> list[str]:
    flat = [dict(p.settings(), **{f"options.{k}": v for k, v in p.options}) for p in points]
    keys = [k for k in flat[0] if k != "options"] + sorted({k for f in flat for k in f if k.startswith("options.")})
    return [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]


def pareto(points: list[tuple[float, float, object]]) -> list[tuple[float, float, object]]:
    """(cost, accuracy, tag) points no other point beats: none as cheap or cheaper that is at least as
    accurate (ties on cost: the more accurate one)."""
    front, best = [], float("-inf")
    for q in sorted(points, key=lambda q: (q[0], -q[1])):
        if q[1] > best:
            front.append(q)
            best = q[1]
    return front


def summarize(points: list[Point], rows: list[dict]) -> list[dict]:
    """Per board and configuration (the point without its seed): mean and sd over seeds, and whether
    it is on its board's Pareto front of mean accuracy vs mean measured cost."""
    varying = varying_keys(points)
    by_key = {point_key(p): p for p in points}
    groups: dict[tuple, list] = {}
    for r in rows:
        p = by_key[r["key"]]
        groups.setdefault((p.board, p.config.label(varying)), []).append(r)
    sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
    stats = [{"board": b, "config": c, "seeds": len(rs), "metric": rs[0]["metric"], "unit": rs[0]["unit"],
              "acc_mean": statistics.fmean(r["accuracy"] for r in rs), "acc_sd": sd([r["accuracy"] for r in rs]),
              "cost_mean": statistics.fmean(r["measured"] for r in rs), "cost_sd": sd([r["measured"] for r in rs]),
              "predicted_mean": (statistics.fmean(r["predicted"] for r in rs)
                                 if all(r["predicted"] is not None for r in rs) else None)}
             for (b, c), rs in groups.items()]
    for b in {s["board"] for s in stats}:
        mine = [s for s in stats if s["board"] == b]
        front = {id(q[2]) for q in pareto([(s["cost_mean"], s["acc_mean"], s) for s in mine])}
        for s in mine:
            s["front"] = id(s) in front
    return stats


def write_outputs(out: Path, points: list[Point], rows: list[dict], stats: list[dict], failed: list[dict]) -> dict:
    by_key = {point_key(p): p for p in points}
    on_front = {(s["board"], s["config"]) for s in stats if s["front"]}
    varying = varying_keys(points)
    csv_path, json_path, png_path = out / "sweep.csv", out / "sweep.json", out / "pareto.png"
    cols = ["board", *[k for k in varying if k != "board"], "accuracy", "measured", "unit", "predicted", "bitops",
            "trained_bits", "front", "train_s", "build_s", "key"]
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            s = dict(r["settings"], **{f"options.{k}": v for k, v in r["settings"]["options"].items()})
            p = by_key[r["key"]]
            w.writerow({**{k: s.get(k) for k in varying}, "board": s["board"], "accuracy": r["accuracy"],
                        "measured": r["measured"], "unit": r["unit"], "predicted": r["predicted"],
                        "bitops": r["bitops"], "trained_bits": r["bits"],
                        "front": (s["board"], p.config.label(varying)) in on_front,
                        "train_s": r["train_s"], "build_s": r["build_s"], "key": r["key"]})
    write_json(json_path, {"varying": varying, "points": rows, "configurations": stats, "failed": failed})
    files = {"csv": str(csv_path), "json": str(json_path)}
    if stats:
        plot_pareto(stats, png_path)
        files["plot"] = str(png_path)
    return files


def plot_pareto(stats: list[dict], path: Path):
    """Accuracy vs measured cost, one panel per board: every configuration (mean +- sd over seeds) and
    the front."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    boards = sorted({s["board"] for s in stats})
    fig, axes = plt.subplots(1, len(boards), figsize=(6 * len(boards), 4.5), squeeze=False)
    for ax, b in zip(axes[0], boards):
        st = sorted((s for s in stats if s["board"] == b), key=lambda s: s["cost_mean"])
        k, unit = (1e3, "ms") if st[0]["metric"] == "latency" else (1, st[0]["unit"])
        ax.errorbar([s["cost_mean"] * k for s in st], [s["acc_mean"] for s in st],
                    xerr=[s["cost_sd"] * k for s in st], yerr=[s["acc_sd"] for s in st], fmt="o", alpha=0.6,
                    label="configuration (mean +- sd over seeds)")
        fr = [s for s in st if s["front"]]
        ax.step([s["cost_mean"] * k for s in fr], [s["acc_mean"] for s in fr], where="post", color="C3",
                label="Pareto front")
        for s in fr:
            ax.annotate(s["config"], (s["cost_mean"] * k, s["acc_mean"]), fontsize=7, xytext=(3, -9),
                        textcoords="offset points")
        ax.set_xlabel(f"measured {st[0]['metric']} ({unit})")
        ax.set_ylabel("test accuracy")
        ax.set_title(b)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def train_task(cfg: dict, out_dir: str, threads: int | None = None) -> dict:
    """Train one run (a Dask task): ``cfg`` is a TrainConfig as JSON; returns its metrics."""
    from bitfold.toolchain.runs import TrainConfig
    from bitfold.toolchain.train import train
    if threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    return train(TrainConfig.from_json(cfg), out_dir, progress=False)


def train_runs(jobs: list, scheduler: str | None = None, workers: int | None = None, events=None) -> list[dict]:
    """Train independent runs ``[(TrainConfig, out_dir), ...]`` as Dask tasks (the seed and penalty
    grids of the benchmarks); returns their metrics in order. A run that fails stops the whole call
    with every failure named (its directory is left for inspection)."""
    from bitfold.core.tasks import Task, TaskFailure, run_tasks
    tasks = []
    for cfg, d in jobs:
        threads, res = task_placement(cfg.device, scheduler, workers)
        tasks.append(Task(str(d), train_task, (cfg.to_json(), str(d), threads), res))
    res = run_tasks(tasks, scheduler=scheduler, workers=workers, events=events)
    bad = [r for r in res.values() if isinstance(r, TaskFailure)]
    if bad:
        raise BitfoldError(f"{len(bad)} training run(s) failed: " + "; ".join(str(b) for b in bad))
    return [res[t.key] for t in tasks]
