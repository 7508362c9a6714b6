"""Loop commands: run (the closed loop), sweep, report, demo, doctor."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bitfold.cli.render import console, rows_table
from bitfold.core.errors import BitfoldError
from bitfold.core.events import Events

app = typer.Typer()


@app.command("run")
def run_cmd(
    board: str = typer.Option(..., "--board", "-b", help="host-cpu (TVM latency) | ulx3s-85f | icebreaker (yosys LUTs)"),
    out: Path = typer.Option(..., "-o", "--out"),
    method: str = typer.Option("adaqat", help="adaqat learns widths against the board table; others train --bits"),
    budget: Optional[str] = typer.Option(None, help='"latency<=2ms" | "lut<=20000" (adaqat budget mode); default: penalty mode'),
    rounds: int = typer.Option(1, min=1),
    model: Optional[str] = typer.Option(None, help="default: cnn on CPU boards, mlp on FPGA boards"),
    data: str = typer.Option("digits"),
    subset: Optional[str] = typer.Option(None, help="TRAIN,TEST: train and test on a fixed subset of that many samples"),
    epochs: int = typer.Option(10, min=1),
    bits: Optional[str] = typer.Option(None, help="initial (adaqat) or fixed widths (default w8a8 CPU, w6a6:all FPGA)"),
    lam: float = typer.Option(1.0),
    bitstream: bool = typer.Option(False, help="FPGA: also place & route and write the bitstream"),
    verify: bool = typer.Option(True, help="FPGA: simulate the design bit-exactly against the QONNX model"),
    cost: Optional[str] = typer.Option(None, help="train against this cost model instead of the board table (e.g. bitops)"),
    table: Optional[Path] = typer.Option(None, help="start from this cost table file instead of the board's"),
    tracker: Optional[str] = typer.Option(None, help="CPU boards: measure on the board(s) behind this TVM RPC tracker"),
    key: Optional[str] = typer.Option(None, help="RPC key (default: the board file's rpc_key)"),
    nproc: int = typer.Option(1, min=1, help="train under torchrun with N processes (DDP)"),
    fps: Optional[float] = typer.Option(None, help="FPGA boards: the target rate (inferences/s) the table prices "
                                                   "and the build folds for"),
    opt: Optional[list[str]] = typer.Option(None, "--opt", help="training method option KEY=VALUE, repeatable "
                                            "(as for `bitfold train`, e.g. max_bits=6, bit_opt=adam)"),
):
    """Closed loop: the board's cost table -> train against it -> export -> build -> measure -> recalibrate."""
    from bitfold.app.loop import format_metric, run_loop
    from bitfold.cli.train_cmds import parse_opts, parse_subset
    r = run_loop(out, board, method, budget, rounds, model, data, epochs, bits, lam, bitstream=bitstream,
                 verify=verify, cost=cost, table=table, tracker=tracker, key=key, nproc=nproc, events=Events(on_say=console.print),
                 fps=fps, method_options=parse_opts(opt), subset=parse_subset(subset))
    for h in r["history"]:
        console.print(f"round {h['round']}: accuracy {h['accuracy']:.2%}, predicted {r['metric']} "
                      f"{format_metric(r['metric'], h['predicted'])}, measured {format_metric(r['metric'], h['measured'])}")
    console.print(f"report: {r['report']}")


@app.command("sweep")
def sweep_cmd(
    grid: Path = typer.Argument(..., help="a TOML grid file: [sweep] shared settings, [[grid]] blocks of lists"),
    out: Path = typer.Option(..., "-o", "--out", help="where points, sweep.csv/json and pareto.png go (re-run: resumes)"),
    scheduler: Optional[str] = typer.Option(None, help="Dask scheduler HOST:PORT (default $DASK_SCHEDULER_ADDRESS, "
                                            "else a local cluster on 127.0.0.1; 'inprocess' runs here)"),
    workers: Optional[int] = typer.Option(None, min=1, help="local cluster: worker processes (default: free cores)"),
):
    """Train + export + build + measure every point of a grid; one table and a Pareto plot of accuracy vs
    measured cost.

    Grid keys: board, method, model, data, bits, epochs, seed, subset, lam, cost, budget, fps, verify,
    bitstream, tracker, key, device, options. Example: [sweep] board = "host-cpu" / model = "mlp" /
    [[grid]] method = ["fixed"] / bits = ["w2a2:all", "w8a8:all"] / seed = [0, 1, 2]."""
    from bitfold.app.sweep import load_grid, run_sweep
    from bitfold.cli.render import progress_events
    points = load_grid(grid)
    with progress_events("sweep") as ev:
        r = run_sweep(points, out, scheduler=scheduler, workers=workers, events=ev)
    stats = r["configurations"]
    for b in sorted({s["board"] for s in stats}):
        st = sorted((s for s in stats if s["board"] == b), key=lambda s: s["cost_mean"])
        k, unit = (1e3, "ms") if st[0]["metric"] == "latency" else (1, st[0]["unit"])
        fmt = (lambda v: f"{v * k:.4g}") if st[0]["metric"] == "latency" else (lambda v: f"{v:,.0f}")
        rows_table(f"sweep on {b}: mean +- sd over seeds (* on the Pareto front)",
                   ("configuration", "seeds", "accuracy", f"measured ({unit})", f"predicted ({unit})", "front"),
                   [(s["config"], s["seeds"], f"{s['acc_mean']:.2%} +- {s['acc_sd']:.2%}",
                     f"{fmt(s['cost_mean'])} +- {fmt(s['cost_sd'])}",
                     "-" if s["predicted_mean"] is None else fmt(s["predicted_mean"]),
                     "*" if s["front"] else "") for s in st])
    console.print(f"{r['ran']} point(s) run, {r['skipped']} already done; wrote {', '.join(r['files'].values())}")
    if r["failed"]:
        for f in r["failed"]:
            console.print(f"[red]failed:[/] {f['point']}: {f['error']}")
        raise BitfoldError(f"{len(r['failed'])} point(s) of the sweep failed (listed above)",
                           "fix the cause and run the same command again: finished points are kept")


@app.command("report")
def report_cmd(run: Path = typer.Argument(..., help="a `bitfold run` output directory")):
    """Re-render a closed-loop run's report (Markdown + PNG) from its recorded results."""
    from bitfold.app.loop import rerender_report
    console.print(f"report: {rerender_report(run)}")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="where the demo's runs go (a fresh directory)"),
    epochs: int = typer.Option(10, min=1),
    quiet: bool = typer.Option(False, help="no progress bars"),
):
    """The whole chain on digits: FP32 vs a mixed map trained against the ECP5 cost table, both exports
    verified, an open-flow bitstream simulated bit-exactly with its LUTs measured, a TVM host build timed
    next to onnxruntime; one table and one PNG."""
    from bitfold.app.demo import run_demo
    r = run_demo(out, epochs=epochs, progress=not quiet, events=Events(on_say=console.print))
    fp, q, fpga, cpu = r["fp32"], r["mixed"], r["fpga"], r["cpu"]
    lut = (f"{fpga['measured_lut']:,.0f} (table: {fpga['predicted_lut']:,.0f})" if fpga else "skipped")
    lat = (f"TVM {cpu['tvm_median_s'] * 1e3:.3f} ms, onnxruntime {cpu['ort_median_s'] * 1e3:.3f} ms" if cpu
           else "skipped")
    rows_table("bitfold demo: digits MLP, FP32 vs a hardware-aware mixed map",
               ("model", "test acc", "BitOPs", "weight memory", "ECP5 LUT4 measured", "host latency (batch 1)"),
               [("FP32", f"{fp['accuracy']:.2%}", f"{fp['bitops']:.3g}", f"{fp['weight_bits'] / 8192:.1f} KiB", "-", "-"),
                ("mixed", f"{q['accuracy']:.2%}", f"{q['bitops']:.3g} ({q['bitops'] / fp['bitops']:.1%})",
                 f"{q['weight_bits'] / 8192:.2f} KiB ({q['weight_bits'] / fp['weight_bits']:.1%})", lut, lat)])
    rows_table("mixed-precision map learned against the board table (a = width of the layer's input activation)",
               ("layer", "kind", "MACs", "w", "a", "BitOPs"),
               [(x["name"], x["kind"], f"{x['macs']:,}", x["w"], x["a"], f"{x['bitops']:.3g}") for x in q["layers"]])
    for e in r["exports"].values():
        console.print(f"verified {e['path']}\n  " + e["summary"])
    if fpga:
        sim = (f"verilator: bit-exact on {fpga['simulated_samples']} held-out inputs" if fpga["bit_exact"]
               else "verilator: not simulated")
        console.print(f"bitstream {fpga['bitstream']}  ({sim}); report {fpga['report']}")
    for s in r["skipped"]:
        console.print(f"[yellow]{s}[/]")
    console.print(f"summary: {r['table_png']}  (and {r['out']}/demo.json); took {r['seconds']['total']:.0f} s")


@app.command()
def doctor():
    """What is installed (Python packages, tools, FINN environment, Vivado) and what each missing piece disables."""
    from bitfold.app.doctor import diagnose
    rows_table("bitfold doctor", ("component", "status", "needed for", "to get it"),
               [(r["name"], f"[green]{r['found']}[/]" if r["found"] is not None else "[red]missing[/]", r["enables"],
                 "" if r["found"] is not None else r["get"]) for r in diagnose()])


def register(root: typer.Typer) -> None:
    root.registered_commands += app.registered_commands
