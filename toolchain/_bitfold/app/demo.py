"""``bitfold demo``: the whole chain on the embedded digits data set, in a few minutes.

1. the digits MLP trained in FP32;
2. the same MLP with a hardware-aware mixed map: AdaQAT trained against the ECP5 board's cost table,
   through ``bitfold run``'s loop - exported to QONNX (verified), built by the open flow (yosys +
   nextpnr) into a bitstream, simulated bit-exactly in verilator, its LUTs measured and set against
   the table's prediction;
3. the mixed run exported to QCDQ (verified in onnxruntime, also its default session);
4. a TVM build of the QCDQ file for this host, its measured latency next to onnxruntime's;
5. one table and one PNG (accuracy, BitOPs, weight memory, measured LUTs, latency).

A stage whose optional tool is missing (the open flow: ``pip install 'bitfold[fpga]'``; TVM:
``'bitfold[tvm]'``) is skipped with one line naming the tool; the others run.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from bitfold.core.errors import ToolMissingError
from bitfold.toolchain.runs import TrainConfig

DEMO_BOARD = "ulx3s-85f"
#: the mixed map's LUT budget on the board (at the build's default rate: what the UART can feed)
DEMO_BUDGET = "lut<=9000"
#: the CNN map the FPGA tests and benchmarks build (W7/A8 input layer: exact in every CPU int8 kernel)
DEMO_MAP = {"convs.0": {"w": 7, "a": 8}, "convs.1": {"w": 4, "a": 4},
            "convs.2": {"w": 2, "a": 3}, "head": {"w": 4, "a": 4}}


def _fresh(out: Path) -> Path:
    if not out.exists():
        return out
    i = 2
    while Path(f"{out}-{i}").exists():
        i += 1
    return Path(f"{out}-{i}")


def ort_latency(path: str | Path, x, runs: int = 200) -> float:
    """Median seconds of one batch-1 inference in a default onnxruntime session on 1 thread."""
    import numpy as np
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    feed = {name: np.ascontiguousarray(x[:1], dtype=np.float32)}
    for _ in range(20):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run_demo(out: str | Path = "runs/demo", epochs: int = 10, progress: bool = True, events=None,
             board: str = DEMO_BOARD, budget: str = DEMO_BUDGET) -> dict:
    """The demo's stages (module docstring); returns ``{out, fp32, mixed, exports, fpga, cpu, skipped,
    seconds, table_png}``. ``progress``: training progress bars."""
    from bitfold.app.loop import run_loop
    from bitfold.core.events import events_of
    from bitfold.export.onnx_export import export_run
    from bitfold.toolchain.train import train
    ev = events_of(events)
    out = _fresh(Path(out))
    t_start = time.perf_counter()
    seconds, skipped = {}, []

    def stage(k, what):
        ev.say(f"[{k}/5] {what}")
        return time.perf_counter()

    ev.say(f"bitfold demo -> {out}  (digits 8x8, MLP 64-64-64-64-10, {epochs} epochs)")
    t = stage(1, "training the MLP in FP32")
    fp = train(TrainConfig(model="mlp", method="float", epochs=epochs), out / "fp32", progress=progress)
    seconds["fp32"] = time.perf_counter() - t

    t = stage(2, f"hardware-aware mixed map: AdaQAT against the {board} cost table ({budget}), exported, "
                 f"built by yosys + nextpnr into a bitstream, simulated bit-exactly, LUTs measured")
    fpga = None
    loop_dir = out / "mixed"
    try:
        # every layer's widths free (first and last included), so the budget can be met
        loop = run_loop(loop_dir, board, "adaqat", budget=budget, rounds=1, model="mlp", epochs=epochs,
                        bitstream=True, verify=True, events=events, method_options={"learn_edges": True})
        h = loop["history"][0]
        built = json.loads((Path(h["build"]) / "build.json").read_text())
        sim = built.get("simulation") or {}
        fpga = {"board": board, "measured_lut": h["measured"], "predicted_lut": h["predicted"],
                "build": h["build"], "report": loop["report"], "measurement": h["measurement"],
                "bitstream": str(Path(h["build"]) / "rtl" / built["bitstream"]) if built.get("bitstream") else None,
                "bit_exact": sim.get("bit_exact"),
                "simulated_samples": sim.get("samples"), "clock": built.get("clock"),
                "throughput": built.get("throughput")}
    except ToolMissingError as e:
        skipped.append(f"FPGA build skipped: {e}")
        ev.say(f"  skipped: {e}")
    # the loop trains before any stage that needs a tool, so the run is there either way
    run_dir = loop_dir / "round1" / "train" / "run"
    mixed = json.loads((run_dir / "metrics.json").read_text())
    seconds["mixed"] = time.perf_counter() - t

    t = stage(3, "exports: QONNX and QCDQ, each verified on the held-out split")
    exports = {fmt: export_run(run_dir, fmt, out / f"mlp_mixed.{fmt}.onnx") for fmt in ("qonnx", "qcdq")}
    seconds["exports"] = time.perf_counter() - t

    t = stage(4, "TVM build of the QCDQ file for this host (checked against onnxruntime), latency vs onnxruntime")
    cpu = None
    try:
        from bitfold.boards import load_board
        from bitfold.export.tvm import backend as tvm_backend
        from bitfold.toolchain.data import load_digits_split
        tvm_backend.build(exports["qcdq"].path, load_board("host-cpu"), out / "tvm_host")
        tm = tvm_backend.measure_local(out / "tvm_host", layers=False)
        x = load_digits_split().x_test.numpy()
        cpu = {"tvm_median_s": tm["median"], "ort_median_s": ort_latency(exports["qcdq"].path, x),
               "build": str(out / "tvm_host")}
    except ToolMissingError as e:
        skipped.append(f"TVM build skipped: {e}")
        ev.say(f"  skipped: {e}")
    seconds["cpu"] = time.perf_counter() - t

    t = stage(5, "summary table and PNG")
    result = {"out": str(out), "fp32": fp, "mixed": mixed, "fpga": fpga, "cpu": cpu, "skipped": skipped,
              "exports": {k: {"path": str(v.path), "summary": v.report.summary(), **v.report.as_dict()}
                          for k, v in exports.items()}}
    result["table_png"] = str(write_summary_png(out / "demo.png", result))
    seconds["summary"] = time.perf_counter() - t
    result["seconds"] = {**seconds, "total": time.perf_counter() - t_start}
    from bitfold.core.atomic import write_json
    write_json(out / "demo.json", result)
    return result


def write_summary_png(path: Path, r: dict) -> Path:
    """Four panels: test accuracy and BitOPs (FP32 vs mixed), the mixed model's LUT4 (the table's
    prediction vs yosys) and its host latency (TVM vs onnxruntime); a skipped stage says why."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from bitfold.core.atomic import atomic_path
    fp, q = r["fp32"], r["mixed"]
    fig, axes = plt.subplots(1, 4, figsize=(15, 4.2))
    names = ["FP32", "mixed (AdaQAT)"]

    def bars(ax, labels, vals, colors, title, ylabel, fmt, log=False):
        b = ax.bar(labels, vals, color=colors)
        for rect, v in zip(b, vals):
            ax.annotate(fmt(v), (rect.get_x() + rect.get_width() / 2, rect.get_height()), ha="center",
                        va="bottom", fontsize=9, xytext=(0, 2), textcoords="offset points")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")

    def skipped(ax, title, what):
        ax.set_title(title, fontsize=10)
        import textwrap
        msg = next((x for x in r["skipped"] if x.startswith(what)), what + " skipped")
        ax.text(0.5, 0.5, "\n".join(textwrap.wrap(msg, 34)[:8]), ha="center", va="center", transform=ax.transAxes,
                fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])

    grey_blue = ["0.6", "tab:blue"]
    bars(axes[0], names, [fp["accuracy"] * 100, q["accuracy"] * 100], grey_blue,
         "test accuracy (digits, 359 held-out images)", "%", lambda v: f"{v:.1f} %")
    axes[0].set_ylim(min(fp["accuracy"], q["accuracy"]) * 100 - 5, 100)
    bars(axes[1], names, [fp["bitops"], q["bitops"]], grey_blue, "BitOPs per inference (log scale)", "BitOPs",
         lambda v: f"{v:.3g}", log=True)
    if r.get("fpga"):
        f = r["fpga"]
        bars(axes[2], ["table's prediction", "measured (yosys)"], [f["predicted_lut"], f["measured_lut"]],
             ["tab:orange", "tab:blue"], f"mixed model on {f['board']}: LUT4", "LUT4", lambda v: f"{v:,.0f}")
    else:
        skipped(axes[2], "mixed model on the FPGA: LUT4", "FPGA")
    if r.get("cpu"):
        c = r["cpu"]
        bars(axes[3], ["TVM build", "onnxruntime"], [c["tvm_median_s"] * 1e3, c["ort_median_s"] * 1e3],
             ["tab:green", "tab:olive"], "mixed model on this host: latency", "ms per inference (batch 1, 1 thread)",
             lambda v: f"{v:.3f} ms")
    else:
        skipped(axes[3], "mixed model on this host: latency", "TVM")
    fig.suptitle("bitfold demo: digits MLP, FP32 vs a mixed map trained against the "
                 f"{(r.get('fpga') or {}).get('board', DEMO_BOARD)} cost table", fontsize=11)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path
