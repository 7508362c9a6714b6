"""Build and device commands: build, inspect, boards, setup, run-fpga, measure, rpc-server."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from bitfold.cli.render import console, rows_table, say_events
from bitfold.core.errors import BitfoldError
from bitfold.core.events import Events

app = typer.Typer()


@app.command()
def build(
    onnx_file: Path = typer.Argument(..., help="a verified export (QCDQ for CPU boards)"),
    board: str = typer.Option(..., "--board", "-b", help="board name (bitfold boards) or .toml path"),
    out: Path = typer.Option(..., "-o", "--out", help="build directory (replaced only when the build succeeds)"),
    folding: Optional[Path] = typer.Option(None, "--folding", help='FPGA: JSON {"layer": {"pe": N, "simd": M}} '
                                           "instead of the folding chosen from the board's budget"),
    target_fps: Optional[float] = typer.Option(None, "--target-fps", help="FPGA: widen layers until this many "
                                               "inferences/s at the design clock (default: what the UART can feed; "
                                               "0: as fast as the board's budget allows)"),
    clock_mhz: Optional[float] = typer.Option(None, "--clock-mhz", help="open flow: design clock made by the PLL "
                                              "(default: the board's pll_mhz, stepped down once to the Fmax reached)"),
    dsp: bool = typer.Option(False, "--dsp", help="open flow (ECP5): the board's DSP blocks take the lane multipliers "
                             "of the layers where they save the most LUTs (default: LUT multipliers, what the cost "
                             "tables price)"),
    mvau_style: Optional[str] = typer.Option(None, "--mvau-style", help="FINN boards: hls (LUT-based, the default: "
                                             "what the cost tables price) | rtl (DSP-based) | auto (FINN chooses)"),
    no_verify: bool = typer.Option(False, "--no-verify", help="FPGA: skip the bit-exact simulation check"),
    no_bitstream: bool = typer.Option(False, "--no-bitstream", help="FPGA: stop after synthesis (no place & route)"),
    tune_trials: int = typer.Option(0, "--tune-trials", min=0, help="CPU: MetaSchedule trials per conv/matmul kernel not yet "
                                    "in the board's tuning database (0: apply the database as it is)"),
    retune: bool = typer.Option(False, "--retune", help="CPU: tune every kernel again, even those with records"),
    no_int: bool = typer.Option(False, "--no-int", help="CPU: keep quantized layers as float fake-quant"),
    kernels: Optional[str] = typer.Option(None, "--kernels", help="CPU: auto (default: layers of <= 4 bits timed "
                                          "as int8 and bit-serial on this host, the faster kept) | int8 | bitserial"),
    tracker: Optional[str] = typer.Option(None, help="CPU: tune on the board behind this TVM RPC tracker"),
    key: Optional[str] = typer.Option(None, help="CPU: RPC key of the board (default: the board file's rpc_key)"),
    qemu: Optional[bool] = typer.Option(None, "--qemu/--no-qemu", help="aarch64 boards: run the library under "
                                        "qemu-user and check it (default: when `bitfold setup arm64` was run)"),
):
    """Build an exported model for a board with the board's backend (TVM for CPU boards,
    yosys/nextpnr for Lattice FPGAs, FINN for Xilinx FPGAs)."""
    from bitfold.export.backends import build as run_build
    # only the flags the user set become backend options; the backend refuses those it does not have
    given = {"folding": folding, "verify": False if no_verify else None, "bitstream": False if no_bitstream else None,
             "target_fps": target_fps, "clock_mhz": clock_mhz, "tune_trials": tune_trials or None, "retune": retune or None,
             "integer": False if no_int else None, "tracker": tracker, "key": key, "qemu": qemu, "impl_style": mvau_style,
             "kernels": kernels, "dsp": dsp or None}
    r = run_build(onnx_file, board, out, {k: v for k, v in given.items() if v is not None}, events=say_events())
    console.print(f"{r.backend} build for {r.board}: {', '.join(f'{k}={v}' for k, v in r.artefacts.items())}")
    if r.verification:
        from bitfold.export.verify import VerifyReport
        console.print("verified " + VerifyReport(**r.verification).summary())
    for n in r.notes:
        console.print(f"note: {n}")


@app.command()
def inspect(path: Path = typer.Argument(..., help="an .onnx file")):
    """Show an ONNX file's format, quantizer widths and bitfold bit map."""
    from bitfold.export.onnx_io import describe_onnx, load_onnx
    info = describe_onnx(load_onnx(path))
    console.print_json(json.dumps(info))


@app.command()
def boards(name: Optional[str] = typer.Argument(None, help="a board name or .toml path to show")):
    """List the known boards, or show one."""
    from dataclasses import asdict

    from bitfold.boards import known_boards, load_board
    if name:
        console.print_json(json.dumps(asdict(load_board(name))))
        return
    rows = []
    for n in known_boards():
        b = load_board(n)
        budget = ", ".join(f"{k} {v:,}" for k, v in b.resources.items()) if b.kind == "fpga" else f"{b.cores} cores"
        rows.append((b.name, b.kind, b.backend, b.part or f"{b.triple} {b.cpu}",
                     f"{b.clock_mhz:g}" if b.clock_mhz else "-", budget))
    rows_table("boards", ("name", "kind", "backend", "part / cpu", "clock MHz", "budget"), rows)


@app.command()
def setup(
    what: str = typer.Argument(..., help="what to set up: finn | arm64"),
    env: Optional[Path] = typer.Option(None, help="where (default: finn $BITFOLD_FINN_ENV or $BITFOLD_HOME/finn-env; "
                                       "arm64 $BITFOLD_ARM64_SYSROOT or $BITFOLD_HOME/arm64-sysroot)"),
    force: bool = typer.Option(False, help="recreate even if it exists"),
):
    """Create the separate environment an external toolchain runs in (finn: finn-plus 1.6.1;
    arm64: a Python + TVM sysroot that runs aarch64 builds under qemu-user)."""
    if what == "arm64":
        from bitfold.export.tvm.qemu import setup as arm64_setup
        arm64_setup(env, force=force, events=Events(on_say=console.print))
        return
    if what != "finn":
        raise BitfoldError(f"unknown setup target {what!r}", "available: finn, arm64")
    from bitfold.export.finn.backend import setup as finn_setup
    finn_setup(env, force=force, events=Events(on_say=console.print))


@app.command("run-fpga")
def run_fpga(
    build_dir: Path = typer.Argument(..., help="an open-FPGA build directory (bitfold build --board ulx3s-85f|icebreaker)"),
    port: Optional[str] = typer.Option(None, help="the board's UART, e.g. /dev/ttyUSB0"),
    sim: bool = typer.Option(False, "--sim", help="run the core in verilator instead of a board"),
    sim_uart: bool = typer.Option(False, "--sim-uart", help="run the UART top level in verilator (byte protocol)"),
    program_board: bool = typer.Option(False, "--program", help="load the bitstream first (openFPGALoader / iceprog)"),
    samples: int = typer.Option(32, min=1, help="held-out inputs to run"),
):
    """Run held-out inputs through an FPGA build (board over UART, or simulation) and compare the
    outputs with the QONNX integer model, sample by sample."""
    from bitfold.export.open_fpga.host import run_held_out
    r = run_held_out(build_dir, port=port, sim=sim, sim_uart=sim_uart, program_board=program_board, samples=samples,
                     events=say_events())
    msg = f"{r['where']}: {r['samples']} {r['source']}, {r['exact']}/{r['samples']} bit-exact vs the QONNX integer model"
    if r["accuracy"] is not None:
        msg += f", accuracy {r['accuracy']:.2%}"
    console.print(msg)
    if r["exact"] != r["samples"]:
        raise typer.Exit(1)


@app.command()
def measure(
    build_dir: Path = typer.Argument(..., help="a TVM build directory (bitfold build)"),
    board: str = typer.Option(..., "--board", "-b"),
    tracker: Optional[str] = typer.Option(None, help="TVM RPC tracker HOST:PORT (board farm)"),
    key: Optional[str] = typer.Option(None, help="device key on the tracker (default: the board's rpc_key)"),
    local: bool = typer.Option(False, help="time on this host instead"),
    repeat: int = typer.Option(7, min=1),
    db: Optional[Path] = typer.Option(None, help="measurement database (default $BITFOLD_HOME/measurements.sqlite)"),
):
    """Time a build on its device (RPC tracker) or locally; record median/p10/p90 in the measurement database."""
    from bitfold.app.calibrate import record_build_latency
    t, store = record_build_latency(build_dir, board, tracker=tracker, key=key, local=local, repeat=repeat, db=db)
    if t.get("kernels"):
        rows_table("per kernel", ("kernel", "layer", "arith", "median µs", "p10", "p90"),
                   [(k["kernel"][:48], k.get("layer", ""), k.get("arith", ""), f"{k['median'] * 1e6:.2f}",
                     f"{k['p10'] * 1e6:.2f}", f"{k['p90'] * 1e6:.2f}") for k in t["kernels"]])
    console.print(f"{board}: median {t['median'] * 1e3:.3f} ms (p10 {t['p10'] * 1e3:.3f}, p90 {t['p90'] * 1e3:.3f}) "
                  f"-> {store.path}")


@app.command("rpc-server")
def rpc_server(
    key: str = typer.Option(..., help="the key this device registers under"),
    tracker: str = typer.Option(..., help="tracker HOST:PORT"),
    host: str = typer.Option("127.0.0.1", help="address to bind (127.0.0.1 unless you mean to expose it)"),
    port: int = typer.Option(9200),
):
    """Run a TVM RPC server for this device, registered with a tracker."""
    from bitfold.export.tvm.rpc import rpc_server_command
    cmd = rpc_server_command(key, tracker, host, port)
    console.print("exec " + " ".join(cmd))
    os.execv(cmd[0], cmd)


def register(root: typer.Typer) -> None:
    root.registered_commands += app.registered_commands
