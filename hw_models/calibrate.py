"""``bitfold calibrate --board B``: measure a board over a grid, record the rows, refit its table.

FPGA boards: open flow -> yosys synthesis per layer (fpga_cost); Xilinx -> FINN estimates.
CPU boards: TVM timing, on this host or through an RPC tracker (tvm_latency).
The fitted table goes to ``$BITFOLD_HOME/tables/<board>.json`` (atomically), where it takes
precedence over the table shipped with bitfold.
"""
from __future__ import annotations

from pathlib import Path

from bitfold.toolchain.errors import BitfoldError


def calibrate_board(board: str, full: bool = False, tracker: str | None = None, key: str | None = None,
                    db: str | Path | None = None, console=None):
    """Measure, record, refit; returns (rows, table path, table)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from bitfold.boards import load_board
    from bitfold.toolchain.atomic import write_json

    from .store import MeasurementStore
    from .table import fit_table, table_path
    b = load_board(board)
    store = MeasurementStore(db)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console, transient=True) as p:
        task = p.add_task(f"measuring {b.name}", total=None)

        def progress(i, n):
            p.update(task, completed=i, total=n)
        if b.kind == "fpga":
            if tracker:
                raise BitfoldError("--tracker is for CPU boards; FPGA boards are measured by their synthesis flow")
            from .fpga_cost import FULL_GRID, QUICK_GRID, measure
            rows = measure(b, FULL_GRID if full else QUICK_GRID, progress=progress)
        else:
            from .tvm_latency import FULL_GRID, QUICK_GRID
            from .tvm_latency import measure as measure_cpu
            rows = measure_cpu(b, FULL_GRID if full else QUICK_GRID, progress=progress, tracker=tracker, key=key)
    store.add(rows)
    metric = "lut" if b.kind == "fpga" else "latency"
    table = fit_table(store.query(b.name, metric), b.name, metric)
    write_json(table_path(b.name), table)
    return rows, table_path(b.name), table
