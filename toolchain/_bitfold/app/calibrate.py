"""Cost tables from measurements: ``bitfold calibrate``, ``bitfold hw measure|fit``, ``bitfold measure``.

"Calibrate" in bitfold means this and only this: measure a board (its backend's probe: one-layer
blocks over a grid), record the rows in the measurement database, and refit the board's cost
table. The refitted table goes to ``$BITFOLD_HOME/tables/<board>.json`` (atomically), where it
takes precedence over the table shipped with bitfold.
"""
from __future__ import annotations

from pathlib import Path

from bitfold.core.atomic import write_json
from bitfold.core.errors import BitfoldError


def probe_board(board: str, full: bool = False, tracker: str | None = None, key: str | None = None,
                db: str | Path | None = None, events=None, scheduler: str | None = None):
    """Measure ``board`` with its backend's probe and record the rows; returns (rows, store).

    Open-flow boards: one Dask task per block (``scheduler``: an existing cluster's HOST:PORT,
    ``"inprocess"``, or None for a local cluster); blocks already in the database are skipped, so an
    interrupted sweep resumes and no block is recorded twice. Only this process writes the database."""
    from bitfold.boards import load_board
    from bitfold.export.backends import backend_for
    from bitfold.hw_models.store import MeasurementStore
    b = load_board(board)
    be = backend_for(b)
    if tracker and be.board_kind != "cpu":
        raise BitfoldError("--tracker is for CPU boards; FPGA boards are measured by their synthesis flow")
    if scheduler and be.board_kind != "fpga":
        raise BitfoldError("--scheduler spreads FPGA calibration blocks over a Dask cluster",
                           "CPU boards are measured over their RPC tracker (--tracker)")
    store = MeasurementStore(db)
    extra = {"scheduler": scheduler, "skip": store.task_keys(b.name)} if be.board_kind == "fpga" else {}
    rows = be.probe(b, full=full, events=events, tracker=tracker, key=key, **extra)
    store.add(rows)
    return rows, store


def fit_board(board: str, metric: str | None = None, db: str | Path | None = None):
    """Refit ``board``'s table from every row of ``metric`` in the database; returns (path, table)."""
    from bitfold.boards import load_board
    from bitfold.export.backends import backend_for
    from bitfold.hw_models.store import MeasurementStore
    from bitfold.hw_models.table import find_table, fit_table, table_path
    b = load_board(board)
    metric = metric or backend_for(b).metric
    table = carry_model_factor(fit_table(MeasurementStore(db).query(b.name, metric), b.name, metric),
                               find_table(b.name))
    write_json(table_path(b.name), table)
    return table_path(b.name), table


def carry_model_factor(table: dict, previous) -> dict:
    """A refitted table keeps the whole-model factor of the table it replaces, with its evidence:
    refitted on the new table's own predictions of the same measured models where the evidence
    holds their layers, else carried as it was (and said so in ``calibration.note``)."""
    from bitfold.hw_models.table import refit_model_factor
    cal = (previous.table.get("calibration") if previous is not None else None) or {}
    if not cal or previous.table.get("metric") != table.get("metric"):
        return table
    ev = cal.get("models_measured") or []
    if ev and all("layers" in e for e in ev):
        return refit_model_factor(table, ev, note=f"refitted on the new table from {len(ev)} measured models "
                                                  f"(evidence carried from {previous.source})")
    out = dict(table)
    out["calibration"] = {**cal, "note": f"carried unchanged from {previous.source}: its evidence has no layer "
                                         f"shapes, so it could not be refitted on the new table"}
    return out


def calibrate_board(board: str, full: bool = False, tracker: str | None = None, key: str | None = None,
                    db: str | Path | None = None, events=None, scheduler: str | None = None):
    """Measure, record, refit; returns (rows, table path, table)."""
    rows, _ = probe_board(board, full, tracker, key, db, events, scheduler)
    path, table = fit_board(board, db=db)
    return rows, path, table


def calibrate_energy(csv_path: str | Path, name: str):
    """An energy cost model from per-operation measurements (op,bits,energy_pj); returns (path, table)."""
    from bitfold.hw_models.energy import energy_from_csv
    from bitfold.hw_models.table import table_path
    if not name.startswith("energy-"):
        raise BitfoldError(f"energy model name {name!r} must start with 'energy-'", "e.g. --name energy-mychip")
    t = energy_from_csv(csv_path, name)
    write_json(table_path(name), t)
    return table_path(name), t


def record_build_latency(build_dir: str | Path, board: str, tracker: str | None = None, key: str | None = None,
                         local: bool = False, repeat: int = 7, db: str | Path | None = None):
    """Time a TVM build (this host with ``local``, or the board behind ``tracker``) and record the
    whole-model and per-kernel latencies; returns (timing, store)."""
    from bitfold.boards import load_board
    from bitfold.export.backends import backend_for
    from bitfold.hw_models.store import Measurement, MeasurementStore
    b = load_board(board)
    if local == bool(tracker):
        raise BitfoldError("pass exactly one of --tracker HOST:PORT or --local")
    be = backend_for(b)
    if be.board_kind != "cpu":
        raise BitfoldError(f"bitfold measure times CPU builds; {b.name} is an FPGA board",
                           "an FPGA build's resources are in its build.json (bitfold run-fpga runs it)")
    t = be.measure(Path(build_dir), b, tracker=tracker, key=key, repeat=repeat)
    dev = t.pop("device")
    t.pop("where", None)
    store = MeasurementStore(db)
    common = dict(board=b.name, macs=0, weights=0, b_w=0, b_a=0, metric="latency", unit="s", source="measured",
                  tool="tvm", tool_version=t["tvm"], device_id=dev)
    store.add([Measurement(kind="model", value=t["median"],
                           extra={"build": str(build_dir), **{k: v for k, v in t.items() if k != "kernels"}}, **common)])
    store.add([Measurement(kind="kernel", value=k["median"], extra={"build": str(build_dir), **k}, **common)
               for k in t.get("kernels", [])])
    return t, store
