"""The ``bitfold`` command line. Each command is a thin wrapper over the documented Python API."""
from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from bitfold.toolchain.errors import BitfoldError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="bitfold: hardware-aware quantization-aware training and deployment.")
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _method_options(method: str, per_channel: bool, **adaqat) -> dict:
    opts = {"per_channel": True} if per_channel else {}
    given = {k: v for k, v in adaqat.items() if v is not None}
    if method == "adaqat":
        opts.update(given)
    elif given:
        raise BitfoldError(f"option(s) {', '.join('--' + k.replace('_', '-') for k in given)} "
                           f"only apply to --method adaqat")
    return opts


def _parse_opts(items) -> dict:
    out = {}
    for it in items or []:
        k, sep, v = it.partition("=")
        if not sep or not k.strip():
            raise BitfoldError(f"--opt {it!r} is not KEY=VALUE", "e.g. --opt adapter=false")
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


@app.command()
def train(
    model: str = typer.Option("cnn", help="registered model (mlp, cnn, resnet20) or your own: path/to/file.py:factory"),
    weights: Optional[Path] = typer.Option(None, help="float state dict to start from (with a file.py:factory model)"),
    bits: str = typer.Option("w4a4", help="uniform shorthand: w4a4 (first/last layer 8 bit) or w4a4:all"),
    bits_map: Optional[Path] = typer.Option(None, "--bits-map", help="JSON bit map {layer: {w, a}} (overrides --bits)"),
    method: str = typer.Option("fixed", help="quantization method: fixed | adaqat | mebqat | adq | asq, or float"),
    per_channel: bool = typer.Option(False, help="per-output-channel weight scales"),
    cost: Optional[str] = typer.Option(None, help="adaqat: cost model - bitops | weight_bits | <board>"),
    lam: Optional[float] = typer.Option(None, help="adaqat: weight of the cost term (default 0.1)"),
    budget: Optional[float] = typer.Option(None, help="adaqat: budget mode - penalise only cost above this"),
    estimator: Optional[str] = typer.Option(None, help="adaqat: bit-width gradient estimator, ste | fd"),
    finetune_epochs: Optional[int] = typer.Option(None, help="adaqat: epochs at frozen widths (default 2)"),
    bit_lr: Optional[float] = typer.Option(None, help="adaqat: learning rate of the widths (default 0.05)"),
    epochs: int = typer.Option(10, min=1),
    batch_size: int = typer.Option(64, min=1),
    lr: float = typer.Option(2e-3),
    seed: int = typer.Option(0),
    data: str = typer.Option("digits", help="digits | mnist | cifar10 | synthetic"),
    data_dir: Optional[Path] = typer.Option(None, help="local files for mnist / cifar10"),
    out: Path = typer.Option(..., "--out", "-o", help="run directory"),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N"),
    resume: bool = typer.Option(False, help="continue the run in --out from its last checkpoint"),
    init_from: Optional[Path] = typer.Option(None, help="start from another run's weights (e.g. after `bitfold allocate`)"),
    quiet: bool = typer.Option(False, help="no progress bar"),
    opt: Optional[list[str]] = typer.Option(None, "--opt", help="method option KEY=VALUE, repeatable (e.g. asq: "
                                            "adapter=false, levels=pot; mebqat: quantizer=dorefa)"),
):
    """Quantization-aware training on Brevitas layers; writes a run directory."""
    from bitfold.toolchain.bitmap import BitMap
    from bitfold.toolchain.runs import TrainConfig
    from bitfold.toolchain.train import train as run_train
    # validate before any work; a map file is stored in the run config by value
    bm = BitMap.parse(str(bits_map) if bits_map else bits)
    spec = bm.text or bm.to_json()
    cfg = TrainConfig(model=model, data=data, data_dir=str(data_dir) if data_dir else None, bits=spec,
                      method=method, method_options=_method_options(method, per_channel, cost=cost, lam=lam, budget=budget,
                                                     estimator=estimator, finetune_epochs=finetune_epochs,
                                                     bit_lr=bit_lr) | _parse_opts(opt), epochs=epochs,
                      batch_size=batch_size, lr=lr, seed=seed, device=device,
                      weights=str(weights) if weights else None, init_from=str(init_from) if init_from else None)
    m = run_train(cfg, out, resume=resume, progress=not quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        console.print(f"test accuracy {m['accuracy']:.2%}  BitOPs {m['bitops']:.3g}  "
                      f"weight memory {m['weight_bits'] / 8192:.1f} KiB  -> {out}")
        _layer_table(m["layers"])


def _layer_table(layers):
    t = Table(title="per-layer bits")
    for c in ("layer", "kind", "MACs", "w", "a", "BitOPs", "weight bits"):
        t.add_column(c, justify="right" if c not in ("layer", "kind") else "left")
    for r in layers:
        t.add_row(r["name"], r["kind"], f"{r['macs']:,}", str(r["w"]), str(r["a"]), f"{r['bitops']:.3g}",
                  f"{r['weight_bits']:.3g}")
    console.print(t)


@app.command()
def export(
    run: Path = typer.Argument(..., help="run directory from `bitfold train`"),
    format: str = typer.Option("qonnx", "--format", "-f", help="qonnx | qcdq | qcdq-index (adq/asq codebooks) | onnx-dynamic (asq adapters)"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="output .onnx (default: RUN/model.FORMAT.onnx)"),
    bits_map: Optional[str] = typer.Option(None, "--bits-map", help="mebqat runs: export at this bit map / shorthand"),
):
    """Export a run to QONNX or QCDQ ONNX and verify it against the torch model (refuses on mismatch)."""
    if format == "onnx-dynamic":
        from bitfold.export.dynamic import export_dynamic_run
        path, report, acc = export_dynamic_run(run, output)
        console.print(report.summary())
        console.print(f"torch test accuracy (dynamic steps) {acc:.2%}")
        console.print(f"wrote {path}")
        return
    if format == "qcdq-index":
        from bitfold.export.index_form import export_index_run
        path, report, stats = export_index_run(run, output)
        console.print(report.summary())
        console.print("layers: " + ", ".join(f"{k}: {v['index_bits']}-bit index x {v['weights']}" for k, v in stats.items()))
        console.print(f"wrote {path}")
        return
    from bitfold.export.onnx_export import export_run
    r = export_run(run, format, output, bits_map=bits_map)
    console.print(r.report.summary())
    if r.accuracy:
        console.print("torch test accuracy: " + ", ".join(f"{k} {v:.2%}" for k, v in r.accuracy.items()))
    console.print(f"wrote {r.path}")


@app.command("eval")
def eval_cmd(
    run: Path = typer.Argument(..., help="run directory"),
    bits: str = typer.Option("all", help="'all' candidate (w, a) pairs, or one shorthand like w4a4"),
):
    """Accuracy of a switchable (mebqat) run over bit-widths: table, bits_table.csv and .png in the run."""
    from bitfold.toolchain.select_bits import eval_table
    pairs = "all"
    if bits != "all":
        import re
        m = re.fullmatch(r"w(\d)a(\d)", bits)
        if not m:
            raise BitfoldError(f"--bits {bits!r} is not understood", "use 'all' or a shorthand like w4a4")
        pairs = [(int(m.group(1)), int(m.group(2)))]
    rows = eval_table(run, pairs)
    t = Table(title=f"test accuracy per (w, a) - {run}")
    ws, as_ = sorted({r["w"] for r in rows}), sorted({r["a"] for r in rows})
    t.add_column("w \\ a")
    for a in as_:
        t.add_column(str(a), justify="right")
    for w in ws:
        t.add_row(str(w), *[f"{next(r['accuracy'] for r in rows if r['w'] == w and r['a'] == a):.2%}" for a in as_])
    console.print(t)
    console.print(f"wrote {run / 'bits_table.csv'} and {run / 'bits_table.png'}")


@app.command("select")
def select_cmd(
    run: Path = typer.Argument(..., help="a mebqat run directory"),
    budget: str = typer.Option(..., help='"metric<=value": bitops<=5e6, weight_bits<=64kib, latency<=2ms, lut<=20000'),
    board: Optional[str] = typer.Option(None, help="board whose cost table measures the metric"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="bit map JSON (default: in the run)"),
):
    """Pick per-layer widths of a meta-trained run that fit a budget (no retraining); writes the bit map."""
    from bitfold.toolchain.select_bits import select
    if board:
        from bitfold.boards import load_board
        load_board(board)
    r = select(run, budget, board, output)
    console.print(f"selected {r['bit_map']}")
    console.print(f"cost {r['cost']:.4g} {r['cost_unit']} (budget {r['limit']:.4g}); accuracy: selection set "
                  f"{r['selection_accuracy']:.2%}, test {r['test_accuracy']:.2%}")
    console.print(f"wrote {r['path']} - export it with: bitfold export {run} --bits-map {r['path']}")


@app.command()
def allocate(
    run: Path = typer.Argument(..., help="an adq run directory"),
    cost: str = typer.Option("weight_bits", help="cost model: weight_bits | bitops | <board with a table>"),
    budget: float = typer.Option(..., help="budget in the cost model's unit (weight_bits: bits)"),
    output: Optional[Path] = typer.Option(None, "-o", "--output"),
):
    """ADQ: allocate per-layer codebook widths by Fisher sensitivity under a cost budget; writes the bit map."""
    from bitfold.toolchain.adq import allocate_run
    r = allocate_run(run, cost, budget, out_path=output)
    console.print(f"allocated {r['bit_map']}  ({cost} {r['final_cost']:.4g} <= {budget:.4g})")
    console.print("Fisher sensitivity: " + ", ".join(f"{k} {v:.3g}" for k, v in r["sensitivity"].items()))
    console.print(f"wrote {r['path']} - continue training at it with: bitfold train --method adq "
                  f"--bits-map {r['path']} --init-from {run} -o RUN2")


@app.command()
def build(
    onnx_file: Path = typer.Argument(..., help="a verified export (QCDQ for CPU boards)"),
    board: str = typer.Option(..., "--board", "-b", help="board name (bitfold boards) or .toml path"),
    out: Path = typer.Option(..., "-o", "--out", help="build directory (replaced only when the build succeeds)"),
    folding: Optional[Path] = typer.Option(None, "--folding", help='FPGA: JSON {"layer": {"pe": N, "simd": M}} '
                                           "instead of the folding chosen from the board's budget"),
    target_fps: Optional[float] = typer.Option(None, "--target-fps", help="FPGA: widen layers until this many "
                                               "inferences/s at the board clock (default: what the UART can feed; "
                                               "0: as fast as the board's budget allows)"),
    no_verify: bool = typer.Option(False, "--no-verify", help="FPGA: skip the bit-exact simulation check"),
    no_bitstream: bool = typer.Option(False, "--no-bitstream", help="FPGA: stop after synthesis (no place & route)"),
    tune_trials: int = typer.Option(0, "--tune-trials", min=0, help="CPU: MetaSchedule trials per conv/matmul kernel not yet "
                                    "in the board's tuning database (0: apply the database as it is)"),
    retune: bool = typer.Option(False, "--retune", help="CPU: tune every kernel again, even those with records"),
    no_int: bool = typer.Option(False, "--no-int", help="CPU: keep quantized layers as float fake-quant"),
    tracker: Optional[str] = typer.Option(None, help="CPU: tune on the board behind this TVM RPC tracker"),
    key: Optional[str] = typer.Option(None, help="CPU: RPC key of the board (default: the board file's rpc_key)"),
    qemu: Optional[bool] = typer.Option(None, "--qemu/--no-qemu", help="aarch64 boards: run the library under "
                                        "qemu-user and check it (default: when `bitfold setup arm64` was run)"),
):
    """Build an exported model for a board with the board's backend (TVM for CPU boards,
    yosys/nextpnr for Lattice FPGAs)."""
    from bitfold.export.backends import build as run_build
    from bitfold.boards import load_board
    opts = {}
    if load_board(board).kind == "fpga":
        if tune_trials or retune or no_int or tracker or key or qemu:
            raise BitfoldError("--tune-trials / --retune / --no-int / --tracker / --key / --qemu apply to CPU boards only")
        opts = {"folding": folding, "verify": not no_verify, "bitstream": not no_bitstream, "target_fps": target_fps,
                "progress": lambda m: console.print(f"[dim]{m}...[/]")}
    elif folding or no_verify or no_bitstream or target_fps:
        raise BitfoldError("--folding / --target-fps / --no-verify / --no-bitstream apply to FPGA boards only")
    else:
        opts = {"tune_trials": tune_trials, "retune": retune, "integer": not no_int, "tracker": tracker, "key": key,
                "qemu": qemu,
                "log": lambda m: console.print(f"[dim]{m}...[/]")}
    r = run_build(onnx_file, board, out, **opts)
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
    t = Table(title="boards")
    for c in ("name", "kind", "backend", "part / cpu", "clock MHz", "budget"):
        t.add_column(c)
    for n in known_boards():
        b = load_board(n)
        budget = ", ".join(f"{k} {v:,}" for k, v in b.resources.items()) if b.kind == "fpga" else f"{b.cores} cores"
        t.add_row(b.name, b.kind, b.backend, b.part or f"{b.triple} {b.cpu}",
                  f"{b.clock_mhz:g}" if b.clock_mhz else "-", budget)
    console.print(t)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="where the demo's runs go (a fresh directory)"),
    epochs: int = typer.Option(15, min=1),
    quiet: bool = typer.Option(False, help="no progress bars"),
):
    """Train the digits CNN in FP32 and at a mixed-precision map, export both formats, verify, report."""
    from bitfold.toolchain.demo import run_demo
    run_demo(out, epochs=epochs, progress=not quiet, console=console)


@app.command()
def doctor():
    """What is installed (Python packages, tools, FINN environment, Vivado) and what each missing piece disables."""
    from bitfold.toolchain.doctor import diagnose
    t = Table(title="bitfold doctor")
    for c in ("component", "status", "needed for", "to get it"):
        t.add_column(c)
    for r in diagnose():
        ok = r["found"] is not None
        t.add_row(r["name"], f"[green]{r['found']}[/]" if ok else "[red]missing[/]", r["enables"],
                  "" if ok else r["get"])
    console.print(t)


@app.command()
def fewshot(
    out: Path = typer.Option(..., "-o", "--out"),
    model: str = typer.Option("mlp"),
    seen: str = typer.Option("0,1,2,3,4,5", help="meta-training classes; the rest are the unseen evaluation classes"),
    ways: int = typer.Option(3, min=2), shots: int = typer.Option(5, min=1),
    inner_steps: int = typer.Option(5, min=0), inner_lr: float = typer.Option(0.05),
    episodes: int = typer.Option(300, min=1, help="outer meta-training steps"),
    meta: bool = typer.Option(True, help="--no-meta: the same episodes without the inner loop (baseline)"),
    eval_bits: str = typer.Option("w2a2,w4a4,w8a8"),
):
    """MEBQAT few-shot: meta-train on (bit-width, seen-class subset) tasks, then adapt to unseen classes
    with a few SGD steps; prints accuracy before/after adaptation per bit-width."""
    from rich.progress import Progress

    from bitfold.toolchain.fewshot import FewShotConfig, run_fewshot
    try:
        seen_c = tuple(int(c) for c in seen.split(","))
        bits = tuple((int(t[1:t.index("a")]), int(t[t.index("a") + 1:])) for t in eval_bits.lower().split(","))
    except ValueError:
        raise BitfoldError(f"--seen {seen!r} / --eval-bits {eval_bits!r} not understood",
                           "e.g. --seen 0,1,2,3,4,5 --eval-bits w2a2,w4a4") from None
    cfg = FewShotConfig(model=model, seen=seen_c, ways=ways, shots=shots, inner_steps=inner_steps, inner_lr=inner_lr,
                        episodes=episodes, meta=meta, eval_bits=bits)
    with Progress(console=console, transient=True) as p:
        task = p.add_task("meta-training" if meta else "training (no inner loop)", total=episodes)
        rep = run_fewshot(out, cfg, progress=lambda i, n: p.update(task, completed=i))
    t = Table(title=f"unseen classes {rep['config']['unseen']}: {ways}-way {shots}-shot, chance {rep['chance']:.0%}")
    for c in ("w", "a", "before adaptation", f"after {inner_steps} SGD steps"):
        t.add_column(c, justify="right")
    for r in rep["results"]:
        t.add_row(str(r["w"]), str(r["a"]), f"{r['before']:.1%}", f"{r['after']:.1%}")
    console.print(t)
    console.print(f"wrote {out / 'fewshot.json'}")


@app.command("run")
def run_cmd(
    board: str = typer.Option(..., "--board", "-b", help="host-cpu (TVM latency) | ulx3s-85f | icebreaker (yosys LUTs)"),
    out: Path = typer.Option(..., "-o", "--out"),
    method: str = typer.Option("adaqat", help="adaqat learns widths against the board table; others train --bits"),
    budget: Optional[str] = typer.Option(None, help='"latency<=2ms" | "lut<=20000" (adaqat budget mode); default: penalty mode'),
    rounds: int = typer.Option(1, min=1),
    model: Optional[str] = typer.Option(None, help="default: cnn on CPU boards, mlp on FPGA boards"),
    data: str = typer.Option("digits"),
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
):
    """Closed loop: the board's cost table -> train against it -> export -> build -> measure -> recalibrate."""
    from bitfold.toolchain.loop import _fmt, run_loop
    r = run_loop(out, board, method, budget, rounds, model, data, epochs, bits, lam, bitstream=bitstream,
                 verify=verify, cost=cost, table=table, tracker=tracker, key=key, nproc=nproc, log=console.print)
    for h in r["history"]:
        console.print(f"round {h['round']}: accuracy {h['accuracy']:.2%}, predicted {r['metric']} "
                      f"{_fmt(r['metric'], h['predicted'])}, measured {_fmt(r['metric'], h['measured'])}")
    console.print(f"report: {r['report']}")


@app.command("report")
def report_cmd(run: Path = typer.Argument(..., help="a `bitfold run` output directory")):
    """Re-render a closed-loop run's report (Markdown + PNG) from its recorded results."""
    from bitfold.toolchain.loop import rerender_report
    console.print(f"report: {rerender_report(run)}")


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
        from bitfold.export.qemu import setup as arm64_setup
        arm64_setup(env, force=force, say=console.print)
        return
    if what != "finn":
        raise BitfoldError(f"unknown setup target {what!r}", "available: finn, arm64")
    from bitfold.export.finn_backend import setup as finn_setup
    finn_setup(env, force=force, say=console.print)


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
    import numpy as np

    from bitfold.export import fpga_host
    from bitfold.export.open_fpga import held_out_inputs
    if sum([bool(port), sim, sim_uart]) != 1:
        raise BitfoldError("pass exactly one of --port PORT, --sim or --sim-uart")
    b = fpga_host.load_build(build_dir)
    im = b.intmodel()
    x, src = held_out_inputs(tuple(im.input.shape), samples)
    if program_board:
        if not port:
            raise BitfoldError("--program needs a board (--port)")
        console.print(fpga_host.program(build_dir))
    if port:
        out = fpga_host.run_serial(build_dir, x, port)
        ref = im.run_codes(im.input.codes(x))
    elif sim:
        out, ref, _ = fpga_host.run_sim(build_dir, x)
    else:
        out, ref = fpga_host.run_sim_uart(build_dir, x)
    bad = int((out != ref).any(1).sum())
    where = port or ("verilator (UART top)" if sim_uart else "verilator (core)")
    logits = im.outputs_to_float(out)
    msg = f"{where}: {len(x)} {src}, {len(x) - bad}/{len(x)} bit-exact vs the QONNX integer model"
    if src.startswith("digits"):
        from bitfold.toolchain.data import load_dataset
        y = np.asarray(load_dataset("digits").y_test[:len(x)])
        msg += f", accuracy {(logits.argmax(1) == y).mean():.2%}"
    console.print(msg)
    if bad:
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
    from bitfold.boards import load_board
    from bitfold.hw_models.store import Measurement, MeasurementStore
    b = load_board(board)
    if local == bool(tracker):
        raise BitfoldError("pass exactly one of --tracker HOST:PORT or --local")
    if local:
        from bitfold.export.tvm_backend import is_host, measure_local
        if not is_host(b):
            raise BitfoldError(f"--local times this host, but board {b.name} is {b.triple}", "use --tracker")
        t = measure_local(build_dir, repeat=repeat)
        device = "local"
    else:
        from bitfold.export.tvm_rpc import measure_rpc
        device = key or b.rpc_key or b.name
        t = measure_rpc(build_dir, tracker, device, repeat=repeat)
    from bitfold.hw_models.tvm_latency import device_id
    store = MeasurementStore(db)
    store.add([Measurement(board=b.name, kind="model", macs=0, weights=0, b_w=0, b_a=0, metric="latency",
                           value=t["median"], unit="s", source="measured", tool="tvm", tool_version=t["tvm"],
                           device_id=device if not local else device_id(),
                           extra={"build": str(build_dir), **{k: v for k, v in t.items() if k != "kernels"}})])
    dev_id = device if not local else device_id()
    store.add([Measurement(board=b.name, kind="kernel", macs=0, weights=0, b_w=0, b_a=0, metric="latency",
                           value=k["median"], unit="s", source="measured", tool="tvm", tool_version=t["tvm"],
                           device_id=dev_id, extra={"build": str(build_dir), **k}) for k in t.get("kernels", [])])
    from rich.table import Table
    if t.get("kernels"):
        tab = Table("kernel", "layer", "arith", "median µs", "p10", "p90", title="per kernel")
        for k in t["kernels"]:
            tab.add_row(k["kernel"][:48], k.get("layer", ""), k.get("arith", ""), f"{k['median'] * 1e6:.2f}",
                        f"{k['p10'] * 1e6:.2f}", f"{k['p90'] * 1e6:.2f}")
        console.print(tab)
    console.print(f"{b.name}: median {t['median'] * 1e3:.3f} ms (p10 {t['p10'] * 1e3:.3f}, p90 {t['p90'] * 1e3:.3f}) "
                  f"-> {store.path}")


@app.command("rpc-server")
def rpc_server(
    key: str = typer.Option(..., help="the key this device registers under"),
    tracker: str = typer.Option(..., help="tracker HOST:PORT"),
    host: str = typer.Option("127.0.0.1", help="address to bind (127.0.0.1 unless you mean to expose it)"),
    port: int = typer.Option(9200),
):
    """Run a TVM RPC server for this device, registered with a tracker."""
    from bitfold.export.tvm_rpc import rpc_server_command
    cmd = rpc_server_command(key, tracker, host, port)
    console.print("exec " + " ".join(cmd))
    os.execv(cmd[0], cmd)


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
):
    """Measure a board and refit its cost table (--board), or calibrate the energy model from a CSV."""
    from bitfold.toolchain.atomic import write_json
    if energy_csv is not None:
        from bitfold.hw_models.energy import calibrate_from_csv
        from bitfold.hw_models.table import table_path
        if not name.startswith("energy-"):
            raise BitfoldError(f"energy model name {name!r} must start with 'energy-'", "e.g. --name energy-mychip")
        t = calibrate_from_csv(energy_csv, name)
        write_json(table_path(name), t)
        console.print(f"wrote {table_path(name)}: ops {', '.join(t['provenance']['replaced_ops'])} from {energy_csv}, "
                      f"{', '.join(t['provenance']['kept_from_literature']) or 'nothing'} kept from the literature; "
                      f"train with --cost {name}")
        if board is None:
            return
    if board is None:
        raise BitfoldError("nothing to calibrate", "pass --board B (measure and refit) or --energy-csv FILE")
    from bitfold.hw_models.calibrate import calibrate_board
    _, path, table = calibrate_board(board, full=full, tracker=tracker, key=key, db=db, console=console)
    console.print(f"wrote {path}")
    _show_table(table)


@app.command()
def costs(
    board: str = typer.Option(..., "--board", "-b", help="a board with a cost table, or energy / energy-*"),
    png: Optional[Path] = typer.Option(None, help="plot path (default: ./<board>-costs.png)"),
):
    """Print a board's cost table, its provenance and fit quality; plot cost vs bits beside BitOPs."""
    from bitfold.hw_models.cost import get_cost_model
    from bitfold.hw_models.report import plot_costs, summary_lines
    cm = get_cost_model(board)
    if not hasattr(cm, "table") or "kinds" not in cm.table:
        from bitfold.hw_models.energy import EnergyModel
        if isinstance(cm, EnergyModel):
            p = cm.table["provenance"]
            console.print(f"{cm.name}: {cm.table['model']}")
            for op, pts in cm.table["ops"].items():
                console.print(f"  {op}: " + ", ".join(f"{b:g} -> {e:g} pJ" for b, e in pts))
            console.print(f"source: {p['source']}; {p.get('citation') or p.get('csv', '')}")
            return
        raise BitfoldError(f"{board!r} is an analytic cost model ({cm}), not a table", "give a board name")
    console.print(cm.source)
    for line in summary_lines(cm):
        console.print(line, highlight=False)
    _show_table(cm.table)
    out = plot_costs(cm, png or Path(f"{board}-costs.png"))
    console.print(f"plot: {out}")


hw_app = typer.Typer(no_args_is_help=True, help="hardware cost tables, step by step: measure, fit, show (see also calibrate, costs)")
app.add_typer(hw_app, name="hw")


@hw_app.command("measure")
def hw_measure(
    board: str = typer.Option(..., "--board", "-b"),
    full: bool = typer.Option(False, help="the full grid instead of the quick one"),
    tracker: Optional[str] = typer.Option(None, help="CPU boards: TVM RPC tracker host:port"),
    key: Optional[str] = typer.Option(None, help="RPC key (default: the board file's rpc_key)"),
    db: Optional[Path] = typer.Option(None, help="measurement database (default $BITFOLD_HOME/measurements.sqlite)"),
):
    """Measure and record only (no refit); `bitfold calibrate` measures and refits."""
    from rich.progress import Progress

    from bitfold.boards import load_board
    from bitfold.hw_models.store import MeasurementStore
    b = load_board(board)
    with Progress(transient=True, console=console) as p:
        task = p.add_task("measuring", total=None)
        prog = lambda i, n: p.update(task, completed=i, total=n)  # noqa: E731
        if b.kind == "fpga":
            from bitfold.hw_models.fpga_cost import FULL_GRID, QUICK_GRID, measure
            rows = measure(b, FULL_GRID if full else QUICK_GRID, progress=prog)
        else:
            from bitfold.hw_models.tvm_latency import FULL_GRID, QUICK_GRID, measure
            rows = measure(b, FULL_GRID if full else QUICK_GRID, progress=prog, tracker=tracker, key=key)
    store = MeasurementStore(db)
    store.add(rows)
    console.print(f"recorded {len(rows)} {rows[0].metric} rows for {b.name} in {store.path}")


@hw_app.command("fit")
def hw_fit(board: str = typer.Option(..., "--board", "-b"),
           metric: Optional[str] = typer.Option(None, help="default: lut for FPGA boards, latency for CPU boards"),
           db: Optional[Path] = typer.Option(None)):
    """Fit the board's cost table from its measurements; AdaQAT/select then accept --cost BOARD."""
    from bitfold.boards import load_board
    from bitfold.hw_models.store import MeasurementStore
    metric = metric or ("lut" if load_board(board).kind == "fpga" else "latency")
    from bitfold.hw_models.table import fit_table, table_path
    from bitfold.toolchain.atomic import write_json
    store = MeasurementStore(db)
    table = fit_table(store.query(board, metric), board, metric)
    write_json(table_path(board), table)
    console.print(f"wrote {table_path(board)} ({table['provenance']['rows']} rows)")
    _show_table(table)


def _show_table(table):
    for kind, k in table["kinds"].items():
        if k.get("form") == "features":
            from bitfold.hw_models.table import FEATURES
            t = Table(title=f"{table['board']} {table['metric']} ({table['unit']}) - {kind}: structural model")
            for c in ("feature", "coefficient", "counts"):
                t.add_column(c)
            for name, c in zip(k["features"], k["coef"]):
                t.add_row(name, f"{c:.4g}", FEATURES[name])
            if k["H"]["o"]:
                t.add_row("H", ", ".join(f"{o}b: {v:.3g}" for o, v in zip(k["H"]["o"], k["H"]["value"])),
                          "LUTs per PE*acc bit over b_out (threshold search)")
            console.print(t)
            _show_grid(f"{table['board']} {table['metric']} per lane G ({table['unit']}) - {kind}",
                       k["G"]["w"], k["G"]["a"], k["G"]["value"])
            continue
        _show_grid(f"{table['board']} {table['metric']} per MAC ({table['unit']}) - {kind}, overhead {k['overhead']:.3g}",
                   k["w"], k["a"], k["per_mac"])


def _show_grid(title, ws, as_, values):
    t = Table(title=title)
    t.add_column("w \\ a")
    for a in as_:
        t.add_column(str(a), justify="right")
    for w, row in zip(ws, values):
        t.add_row(str(w), *[f"{v:.3g}" for v in row])
    console.print(t)


@hw_app.command("show")
def hw_show(board: str = typer.Option(..., "--board", "-b")):
    """Show a board's fitted cost table."""
    from bitfold.hw_models.table import find_table
    t = find_table(board)
    if t is None:
        raise BitfoldError(f"no cost table for board {board!r} yet", f"run `bitfold hw measure --board {board}` and `bitfold hw fit`")
    console.print(f"{t.source}")
    _show_table(t.table)


def main(argv=None):
    warnings.filterwarnings("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    try:
        app(args=argv, standalone_mode=False)
    except BitfoldError as e:
        err.print(f"[bold red]error:[/] {e.message}", highlight=False)
        if e.hint:
            err.print(f"[yellow]  what to do:[/] {e.hint}", highlight=False)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as e:  # click's own usage errors
        import click
        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
