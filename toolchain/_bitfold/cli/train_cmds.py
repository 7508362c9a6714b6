"""Training commands: train, export, eval, select, allocate, fewshot."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from bitfold.cli.render import console, grid_table, layer_table, progress_events, rows_table
from bitfold.core.errors import BitfoldError

app = typer.Typer()


def _method_options(method: str, per_channel: bool, **adaqat) -> dict:
    opts = {"per_channel": True} if per_channel else {}
    given = {k: v for k, v in adaqat.items() if v is not None}
    if method == "adaqat":
        opts.update(given)
    elif given:
        raise BitfoldError(f"option(s) {', '.join('--' + k.replace('_', '-') for k in given)} "
                           f"only apply to --method adaqat")
    return opts


def parse_subset(text: str | None):
    if text is None:
        return None
    try:
        n_train, n_test = (int(v) for v in text.split(","))
    except ValueError:
        raise BitfoldError(f"--subset {text!r} is not TRAIN,TEST", "e.g. --subset 6000,1000") from None
    if n_train < 1 or n_test < 1:
        raise BitfoldError(f"--subset {text!r} needs at least one sample each", "e.g. --subset 6000,1000")
    return (n_train, n_test)


def parse_opts(items) -> dict:
    """``--opt KEY=VALUE`` items -> a dict (values parsed as JSON where they are)."""
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
    model: str = typer.Option("cnn", help="registered model (mlp, cnn, resnet20; FINN's classics tfc, sfc, lfc, cnv) or your own: path/to/file.py:factory"),
    weights: Optional[Path] = typer.Option(None, help="float state dict to start from (with a file.py:factory model)"),
    bits: str = typer.Option("w4a4", help="uniform shorthand: w4a4 (first/last layer W7/A8) or w4a4:all"),
    bits_map: Optional[Path] = typer.Option(None, "--bits-map", help="JSON bit map {layer: {w, a}} (overrides --bits)"),
    method: str = typer.Option("fixed", help="quantization method: fixed | adaqat | mebqat | adq | asq, or float"),
    per_channel: bool = typer.Option(False, help="per-output-channel weight scales"),
    cost: Optional[str] = typer.Option(None, help="adaqat: cost model - bitops | weight_bits | <board>"),
    lam: Optional[float] = typer.Option(None, help="adaqat: weight of the cost term (default 0.1)"),
    budget: Optional[float] = typer.Option(None, help="adaqat: budget mode - penalise only cost above this"),
    estimator: Optional[str] = typer.Option(None, help="adaqat: bit-width gradient estimator, ste | fd"),
    finetune_epochs: Optional[int] = typer.Option(None, help="adaqat: epochs at frozen widths (default 2)"),
    bit_lr: Optional[float] = typer.Option(None, help="adaqat: learning rate of the widths (default 2.0 sgd, 0.05 adam)"),
    target_fps: Optional[float] = typer.Option(None, help="adaqat with an FPGA board's --cost: price each layer "
                                                         "folded to reach this many inferences/s"),
    bit_opt: Optional[str] = typer.Option(None, help="adaqat: width optimizer - sgd (default: a layer priced "
                                                     "higher moves faster) | adam (normalised steps)"),
    epochs: int = typer.Option(10, min=1),
    batch_size: int = typer.Option(64, min=1),
    lr: float = typer.Option(2e-3),
    seed: int = typer.Option(0),
    data: str = typer.Option("digits", help="digits | mnist | fashion-mnist | cifar10 | synthetic"),
    data_dir: Optional[Path] = typer.Option(None, help="local files for mnist / cifar10 (fashion-mnist: default /usr/share/datasets/fashion-mnist)"),
    subset: Optional[str] = typer.Option(None, help="TRAIN,TEST: train and test on a fixed subset of that many samples"),
    out: Path = typer.Option(..., "--out", "-o", help="run directory"),
    config: Optional[Path] = typer.Option(None, "--config", help="a saved TrainConfig JSON (e.g. a run's config.json): "
                                          "train exactly that; the other training flags are ignored"),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N"),
    resume: bool = typer.Option(False, help="continue the run in --out from its last checkpoint"),
    init_from: Optional[Path] = typer.Option(None, help="start from another run's weights (e.g. after `bitfold allocate`)"),
    quiet: bool = typer.Option(False, help="no progress bar"),
    opt: Optional[list[str]] = typer.Option(None, "--opt", help="method option KEY=VALUE, repeatable (e.g. asq: "
                                            "adapter=false, levels=pot|uniform; mebqat: quantizer=dorefa)"),
    fast_quant: bool = typer.Option(True, help="fused training steps for fixed-width quantizers (bit-identical "
                                               "to Brevitas; --no-fast-quant runs Brevitas's own modules)"),
    compile_backend: Optional[str] = typer.Option(None, "--compile", help="train under torch.compile with this backend "
                                          "(inductor): faster steps, NOT bit-identical to an eager run"),
):
    """Quantization-aware training on Brevitas layers; writes a run directory."""
    from bitfold.toolchain.bitmap import BitMap
    from bitfold.toolchain.runs import TrainConfig, load_config_file
    from bitfold.toolchain.train import train as run_train
    if config is not None:
        m = run_train(load_config_file(config), out, resume=resume, progress=not quiet, fast_quant=fast_quant)
        _report_train(m, out)
        return
    # validate before any work; a map file is stored in the run config by value
    bm = BitMap.parse(str(bits_map) if bits_map else bits)
    spec = bm.text or bm.to_json()
    cfg = TrainConfig(model=model, data=data, data_dir=str(data_dir) if data_dir else None, bits=spec,
                      subset=parse_subset(subset),
                      method=method, method_options=_method_options(method, per_channel, cost=cost, lam=lam, budget=budget,
                                                     estimator=estimator, finetune_epochs=finetune_epochs,
                                                     bit_lr=bit_lr, bit_opt=bit_opt, target_fps=target_fps) | parse_opts(opt), epochs=epochs,
                      batch_size=batch_size, lr=lr, seed=seed, device=device,
                      weights=str(weights) if weights else None, init_from=str(init_from) if init_from else None,
                      compile=compile_backend)
    _report_train(run_train(cfg, out, resume=resume, progress=not quiet, fast_quant=fast_quant), out)


def _report_train(m, out):
    if int(os.environ.get("RANK", "0")) == 0:
        console.print(f"test accuracy {m['accuracy']:.2%}  BitOPs {m['bitops']:.3g}  "
                      f"weight memory {m['weight_bits'] / 8192:.1f} KiB  -> {out}")
        c = m.get("compile")
        if c:
            console.print(f"torch.compile({c['backend']}): {c['graphs']} graph(s) compiled, {c['graph_breaks']} graph "
                          "break(s)" + (" - nothing compiled, trained eagerly" if c["eager"] else ""))
        layer_table(m["layers"])


@app.command()
def export(
    run: Path = typer.Argument(..., help="run directory from `bitfold train`"),
    format: str = typer.Option("qonnx", "--format", "-f", help="qonnx | qcdq | qcdq-index (adq/asq codebooks) | onnx-dynamic (asq adapters)"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="output .onnx (default: RUN/model.FORMAT.onnx)"),
    bits_map: Optional[str] = typer.Option(None, "--bits-map", help="mebqat runs: export at this bit map / shorthand"),
    allow_int16_saturation: bool = typer.Option(
        False, "--allow-int16-saturation",
        help="qcdq: keep full-range 8-bit layers that can saturate the int8 kernels of CPUs without VNNI "
             "(only for targets that accumulate in int32: VNNI CPUs, TVM builds)"),
    for_: Optional[str] = typer.Option(None, "--for", help="hls4ml: check power-of-two scales, write the hls4ml "
                                                           "config beside the QONNX file, and (hls4ml installed) "
                                                           "check its C++ emulation"),
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
    r = export_run(run, format, output, bits_map=bits_map, allow_saturation=allow_int16_saturation, for_=for_)
    console.print(r.report.summary())
    if r.accuracy:
        console.print("torch test accuracy: " + ", ".join(f"{k} {v:.2%}" for k, v in r.accuracy.items()))
    console.print(f"wrote {r.path}" + (f" and {r.path.name}.hls4ml.json (hls4ml configuration)" if for_ else ""))


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
    ws, as_ = sorted({r["w"] for r in rows}), sorted({r["a"] for r in rows})
    acc = {(r["w"], r["a"]): r["accuracy"] for r in rows}
    grid_table(f"test accuracy per (w, a) - {run}", ws, as_, [[acc[(w, a)] for a in as_] for w in ws], "{:.2%}")
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
def fewshot(
    out: Path = typer.Option(..., "-o", "--out"),
    model: str = typer.Option("mlp"),
    seen: str = typer.Option("0,1,2,3,4,5", help="meta-training classes; the rest are the unseen evaluation classes"),
    ways: int = typer.Option(3, min=2), shots: int = typer.Option(5, min=1),
    inner_steps: int = typer.Option(5, min=0), inner_lr: float = typer.Option(0.05),
    episodes: int = typer.Option(300, min=1, help="outer meta-training steps"),
    meta: bool = typer.Option(True, help="--no-meta: the same episodes without the inner loop (baseline)"),
    eval_bits: str = typer.Option("w2a2,w4a4,w8a8"),
    data: str = typer.Option("digits", help="digits | fashion-mnist"),
    head: str = typer.Option("slots", help="slots (MAML N-way head) | proto (ProtoNet prototypes)"),
    seed: int = typer.Option(0, help="initialisation, data draw and episodes (compare meta and --no-meta over seeds)"),
):
    """MEBQAT few-shot: meta-train on (bit-width, seen-class subset) tasks, then adapt to unseen classes
    with a few SGD steps; prints accuracy before/after adaptation per bit-width."""
    from bitfold.toolchain.fewshot import FewShotConfig, run_fewshot
    try:
        seen_c = tuple(int(c) for c in seen.split(","))
        bits = tuple((int(t[1:t.index("a")]), int(t[t.index("a") + 1:])) for t in eval_bits.lower().split(","))
    except ValueError:
        raise BitfoldError(f"--seen {seen!r} / --eval-bits {eval_bits!r} not understood",
                           "e.g. --seen 0,1,2,3,4,5 --eval-bits w2a2,w4a4") from None
    cfg = FewShotConfig(model=model, data=data, head=head, seen=seen_c, ways=ways, shots=shots, inner_steps=inner_steps, inner_lr=inner_lr,
                        episodes=episodes, meta=meta, eval_bits=bits, seed=seed)
    with progress_events("meta-training" if meta else "training (no inner loop)") as ev:
        rep = run_fewshot(out, cfg, events=ev)
    rows_table(f"unseen classes {rep['config']['unseen']}: {ways}-way {shots}-shot, chance {rep['chance']:.0%}",
               ("w", "a", "before adaptation", f"after {inner_steps} SGD steps"),
               [(r["w"], r["a"], f"{r['before']:.1%}", f"{r['after']:.1%}") for r in rep["results"]])
    console.print(f"wrote {out / 'fewshot.json'}")


def register(root: typer.Typer) -> None:
    root.registered_commands += app.registered_commands
