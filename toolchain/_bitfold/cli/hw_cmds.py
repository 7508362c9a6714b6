"""Cost-table commands: calibrate, costs, hw measure|fit|show."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bitfold.cli.render import console, cost_table, progress_events
from bitfold.core.errors import BitfoldError

app = typer.Typer()


@app.command()
def calibrate(
    board: Optional[str] = typer.Option(None, "--board", "-b", help="measure this board and refit its cost table"),
    full: bool = typer.Option(False, help="the full measurement grid instead of the quick one"),
    tracker: Optional[str] = typer.Option(None, help="CPU boards: TVM RPC tracker host:port the board is registered with"),
    key: Optional[str] = typer.Option(None, help="RPC key of the board (default: the board file's rpc_key)"),
    energy_csv: Optional[Path] = typer.Option(None, "--energy-csv", help="per-operation energy measurements "
                                              "(op,bits,energy_pj) that replace the literature table's values"),
    name: str = typer.Option("energy-user", help="--energy-csv: name of the new energy cost model (energy-*)"),
    db: Optional[Path] = typer.Option(None, help="measurement database (default $BITFOLD_HOME/measurements.sqlite)"),
    scheduler: Optional[str] = typer.Option(None, help="FPGA boards: Dask scheduler HOST:PORT to spread the blocks "
                                            "over (default $DASK_SCHEDULER_ADDRESS, else a local cluster on "
                                            "127.0.0.1; 'inprocess' runs them here)"),
):
    """Measure a board and refit its cost table (--board), or calibrate the energy model from a CSV."""
    if energy_csv is not None:
        from bitfold.app.calibrate import calibrate_energy
        path, t = calibrate_energy(energy_csv, name)
        console.print(f"wrote {path}: ops {', '.join(t['provenance']['replaced_ops'])} from {energy_csv}, "
                      f"{', '.join(t['provenance']['kept_from_literature']) or 'nothing'} kept from the literature; "
                      f"train with --cost {name}")
        if board is None:
            return
    if board is None:
        raise BitfoldError("nothing to calibrate", "pass --board B (measure and refit) or --energy-csv FILE")
    from bitfold.app.calibrate import calibrate_board
    with progress_events(f"measuring {board}") as ev:
        _, path, table = calibrate_board(board, full=full, tracker=tracker, key=key, db=db, events=ev,
                                         scheduler=scheduler)
    console.print(f"wrote {path}")
    cost_table(table)


@app.command()
def costs(
    board: str = typer.Option(..., "--board", "-b", help="a board with a cost table, or energy / energy-*"),
    png: Optional[Path] = typer.Option(None, help="plot path (default: ./<board>-costs.png)"),
):
    """Print a board's cost table, its provenance and fit quality; plot cost vs bits beside BitOPs."""
    from bitfold.hw_models.report import describe_cost_model, plot_costs
    d = describe_cost_model(board)
    if d["kind"] == "table":
        console.print(d["source"])
    for line in d["lines"]:
        console.print(line, highlight=False)
    if d["kind"] != "table":
        return
    cost_table(d["table"])
    console.print(f"plot: {plot_costs(d['model'], png or Path(f'{board}-costs.png'))}")


hw_app = typer.Typer(no_args_is_help=True, help="hardware cost tables, step by step: measure, fit, show (see also calibrate, costs)")


@hw_app.command("measure")
def hw_measure(
    board: str = typer.Option(..., "--board", "-b"),
    full: bool = typer.Option(False, help="the full grid instead of the quick one"),
    tracker: Optional[str] = typer.Option(None, help="CPU boards: TVM RPC tracker host:port"),
    key: Optional[str] = typer.Option(None, help="RPC key (default: the board file's rpc_key)"),
    db: Optional[Path] = typer.Option(None, help="measurement database (default $BITFOLD_HOME/measurements.sqlite)"),
):
    """Measure and record only (no refit); `bitfold calibrate` measures and refits."""
    from bitfold.app.calibrate import probe_board
    with progress_events("measuring") as ev:
        rows, store = probe_board(board, full=full, tracker=tracker, key=key, db=db, events=ev)
    console.print(f"recorded {len(rows)} {rows[0].metric} rows for {rows[0].board} in {store.path}")


@hw_app.command("fit")
def hw_fit(board: str = typer.Option(..., "--board", "-b"),
           metric: Optional[str] = typer.Option(None, help="default: lut for FPGA boards, latency for CPU boards"),
           db: Optional[Path] = typer.Option(None)):
    """Fit the board's cost table from its measurements; AdaQAT/select then accept --cost BOARD."""
    from bitfold.app.calibrate import fit_board
    path, table = fit_board(board, metric, db)
    console.print(f"wrote {path} ({table['provenance']['rows']} rows)")
    cost_table(table)


@hw_app.command("show")
def hw_show(board: str = typer.Option(..., "--board", "-b")):
    """Show a board's fitted cost table."""
    from bitfold.hw_models.table import find_table
    t = find_table(board)
    if t is None:
        raise BitfoldError(f"no cost table for board {board!r} yet", f"run `bitfold hw measure --board {board}` and `bitfold hw fit`")
    console.print(f"{t.source}")
    cost_table(t.table)


def register(root: typer.Typer) -> None:
    root.registered_commands += app.registered_commands
    root.add_typer(hw_app, name="hw")
