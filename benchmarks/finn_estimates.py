"""FINN estimates for the TFC MLP (784-64-64-64-10, MNIST-sized) at W1A1, W2A2, W4A4 on pynq-z2.

    bitfold setup finn            # once
    python benchmarks/finn_estimates.py [--target-fps 1000000] [--board pynq-z2]

The networks are trained one epoch on synthetic 28x28 data (estimates depend on shapes, widths
and folding, not on accuracy), exported to QONNX and built with ``bitfold build`` (FINN's
estimate flow, all verification steps on), at one fixed target FPS. Printed side by side: LUT,
BRAM18, DSP, estimated FPS and latency, and the wall time of each build, plus the reference seen
on this machine before (measured before: TFC W2A2 at 1 M fps on xc7z020 -> 13.6 k LUT, 9 BRAM18,
1.25 M fps, 2.8 us). All rows come from one run.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REFERENCE = {"W2A2": {"LUT": 13_600, "BRAM_18K": 9, "fps": 1_250_000, "latency_us": 2.8}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--board", default="pynq-z2")
    ap.add_argument("--target-fps", type=int, default=1_000_000)
    ap.add_argument("--bits", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--shape", nargs=3, type=int, default=[1, 28, 28], help="input shape (1 8 8: the digits MLP)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from bitfold.boards import load_board
    from bitfold.export.backends import build
    from bitfold.export.onnx_export import export_run
    from bitfold.toolchain.runs import TrainConfig
    from bitfold.core.errors import BitfoldError
    from bitfold.toolchain.train import train

    root = Path(args.out or tempfile.mkdtemp(prefix="bitfold-bench-finn-"))
    board = load_board(args.board)
    rows = []
    for b in args.bits:
        name = f"W{b}A{b}"
        run = root / name
        train(TrainConfig(model="mlp", bits=f"w{b}a{b}", method="fixed", epochs=1, data="synthetic",
                          synthetic_shape=tuple(args.shape)), run, progress=False)
        onnx = export_run(run, "qonnx", root / f"tfc_{name}.onnx").path
        t = time.time()
        try:
            build(onnx, args.board, root / f"b_{name}", bitstream=False, target_fps=args.target_fps)
        except BitfoldError as e:   # a FINN limit for this width: report the row, keep going
            rows.append({"net": name, "error": e.message[:110], "wall_s": time.time() - t})
            continue
        wall = time.time() - t
        info = json.loads((root / f"b_{name}" / "build.json").read_text())
        p = info["performance"]
        rows.append({"net": name, **{k: info["totals"][k] for k in ("LUT", "BRAM_18K", "DSP")},
                     "fps": p["estimated_throughput_fps"], "latency_us": p["estimated_latency_ns"] / 1000,
                     "verified": all(c["passed"] for c in info["verification"].values()), "wall_s": wall})

    print(f"\nFINN estimates, MLP {int(np.prod(args.shape))}-64-64-64-10 (w{{b}}a{{b}}: first/last layer 8 bit), "
          f"{board.name} ({board.part}) @ {board.clock_mhz:g} MHz, target {args.target_fps:,} fps\n")
    print(f"{'net':6s} {'LUT':>8s} {'BRAM18':>7s} {'DSP':>5s} {'est. fps':>11s} {'latency us':>10s} {'verified':>8s} "
          f"{'build s':>8s} | {'ref LUT':>8s} {'ref BRAM':>8s} {'ref fps':>10s}")
    for r in rows:
        if "error" in r:
            print(f"{r['net']:6s} -- {r['error']} ({r['wall_s']:.1f} s)")
            continue
        ref = REFERENCE.get(r["net"], {})
        print(f"{r['net']:6s} {r['LUT']:8,.0f} {r['BRAM_18K']:7g} {r['DSP']:5g} {r['fps']:11,.0f} {r['latency_us']:10.2f} "
              f"{str(r['verified']):>8s} {r['wall_s']:8.1f} | {ref.get('LUT', '-'):>8} {ref.get('BRAM_18K', '-'):>8} "
              f"{ref.get('fps', '-'):>10}")
    ok = [r for r in rows if "error" not in r]
    if ok:
        print("\nLUT ratio vs " + ok[0]["net"] + ": " + ", ".join(f"{r['net']} {r['LUT'] / ok[0]['LUT']:.2f}x" for r in ok))
    return 0


if __name__ == "__main__":
    sys.exit(main())
