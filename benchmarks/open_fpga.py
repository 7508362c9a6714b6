"""Open FPGA flow on the digits MLP: LUT4, Fmax, throughput and build wall time per bit-width.

    python benchmarks/open_fpga.py [--boards ulx3s-85f icebreaker] [--bits 1 2 3 4 5 6 7 8] [--jobs 2]

For W1A1 ... W8A8 (every layer, first and last included) and two mixed maps, the MLP is trained
briefly (the hardware does not depend on accuracy, only on shapes, widths and weight values),
exported to QONNX and built with one fixed folding (PE 4 / SIMD 8; the classifier PE 2) so that
widths are compared at equal parallelism. Every build simulates bit-exactly. Side by side:
BitOPs (MACs x W x A), LUT4 per kBitOP, and FINN's estimates for the same QONNX file when a FINN
environment exists (``bitfold setup finn``), all from one run.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

MIXED = {"mixed-a": {"fcs.0": {"w": 8, "a": 8}, "fcs.1": {"w": 4, "a": 4}, "fcs.2": {"w": 2, "a": 3},
                     "head": {"w": 4, "a": 4}},
         "mixed-b": {"fcs.0": {"w": 3, "a": 8}, "fcs.1": {"w": 2, "a": 2}, "fcs.2": {"w": 2, "a": 2},
                     "head": {"w": 6, "a": 4}}}
FOLD = {"dense0": {"pe": 4, "simd": 8}, "dense1": {"pe": 4, "simd": 8}, "dense2": {"pe": 4, "simd": 8},
        "dense3": {"pe": 2, "simd": 8}}


def _spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--boards", nargs="+", default=["ulx3s-85f", "icebreaker"])
    ap.add_argument("--bits", nargs="+", type=int, default=list(range(1, 9)))
    ap.add_argument("--no-mixed", action="store_true")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=None, help="keep models and builds here (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the rows as JSON")
    args = ap.parse_args(argv)

    from bitfold.export.backends import build
    from bitfold.export.lower import lower
    from bitfold.export.onnx_export import export_run
    from bitfold.core.errors import BitfoldError
    from bitfold.toolchain.runs import TrainConfig
    from bitfold.toolchain.train import train

    root = Path(args.out or tempfile.mkdtemp(prefix="bitfold-bench-fpga-"))
    root.mkdir(parents=True, exist_ok=True)
    maps = {f"W{b}A{b}": f"w{b}a{b}:all" for b in args.bits}
    if not args.no_mixed:
        maps.update(MIXED)
    models = {}
    for name, bits in maps.items():
        train(TrainConfig(model="mlp", bits=bits, method="fixed", epochs=1), root / name, progress=False)
        models[name] = export_run(root / name, "qonnx", root / f"{name}.onnx").path
    fold = root / "fold.json"
    fold.write_text(json.dumps(FOLD))
    finn = None
    try:
        import bitfold.export.finn.backend as finn_backend
        finn = finn_backend if finn_backend.env_ready() else None
    except ImportError:
        pass

    def one(job):
        name, board = job
        t = time.time()
        try:
            build(models[name], board, root / f"b_{name}_{board}", folding=fold, samples=32)
            info = json.loads((root / f"b_{name}_{board}" / "build.json").read_text())
            return job, info, time.time() - t, None
        except BitfoldError as e:
            return job, None, time.time() - t, e.message.split(";")[0][:90]

    jobs = [(n, b) for n in models for b in args.boards]
    rows = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for (name, board), info, wall, err in pool.map(one, jobs):
            print(f"done {name} {board} in {wall:.0f} s" + (f": {err}" if err else ""), flush=True)
            im = lower(models[name])
            bitops = sum(s.macs * s.wbits_model * s.ibits for s in im.mvaus)
            row = {"map": name, "board": board, "bitops": bitops, "wall_s": round(wall, 1)}
            if info is None:
                row["error"] = err
            else:
                util = info["pnr"]["utilization"]
                lut = util.get("TRELLIS_COMB", util.get("ICESTORM_LC", {})).get("used")
                ram = util.get("DP16KD", util.get("ICESTORM_RAM", {})).get("used", 0)
                row.update(lut4=lut, bram=ram, fmax=info["pnr"]["fmax_mhz"],
                           cycles=info["throughput"]["cycles_per_frame"],
                           inf_s_fmax=info["throughput"]["at_fmax_inferences_per_s"],
                           exact=info["simulation"]["bit_exact"])
            if finn is not None and board == args.boards[0]:
                try:
                    est = finn.estimate(models[name], "pynq-z2")
                    row["finn_lut"] = est["totals"]["LUT"]
                except Exception as e:  # noqa: BLE001 - a benchmark row, not a build
                    row["finn_lut"] = f"error: {e}"[:40]
            rows.append(row)

    print(f"\nopen FPGA flow, digits MLP 64-64-64-64-10, fixed folding {json.dumps(FOLD)}\n")
    hdr = f"{'map':9s} {'board':11s} {'BitOPs':>9s} {'LUT4':>7s} {'LUT/kBOP':>8s} {'BRAM':>5s} {'Fmax MHz':>8s} " \
          f"{'cyc/frame':>9s} {'inf/s@Fmax':>11s} {'exact':>5s} {'build s':>7s} {'FINN LUT (pynq-z2)':>18s}"
    print(hdr)
    for r in rows:
        if "error" in r:
            print(f"{r['map']:9s} {r['board']:11s} {r['bitops']:9,d}  -- {r['error']} ({r['wall_s']} s)")
            continue
        print(f"{r['map']:9s} {r['board']:11s} {r['bitops']:9,d} {r['lut4']:7,d} {1000 * r['lut4'] / r['bitops']:8.2f} "
              f"{r['bram']:5d} {r['fmax']:8.1f} {r['cycles']:9,.0f} {r['inf_s_fmax']:11,.0f} {str(r['exact']):>5s} "
              f"{r['wall_s']:7.1f} {str(r.get('finn_lut', 'n/a (no FINN env)')):>18s}")
    for board in args.boards:
        ok = [r for r in rows if r["board"] == board and "lut4" in r]
        if len(ok) >= 3:
            rho = _spearman([r["bitops"] for r in ok], [r["lut4"] for r in ok])
            ratio = [r["lut4"] / r["bitops"] for r in ok]
            print(f"{board}: Spearman(BitOPs, LUT4) = {rho:.2f}; LUT4/BitOP spread max/min = "
                  f"{max(ratio) / min(ratio):.1f}x over {len(ok)} designs")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
