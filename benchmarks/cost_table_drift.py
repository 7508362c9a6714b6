"""How far a shipped open-flow cost table is from the current RTL: a sample of its calibration blocks
synthesized again, side by side with the table's stored measurements.

    python benchmarks/cost_table_drift.py [--board ulx3s-85f] [--every 25] [--workers 1]

The shipped table (``hw_models/tables/<board>.rows.json``) was fitted to yosys runs of one-layer
blocks on the RTL of its date. After an RTL change the question is whether the table still
describes what the flow builds, or needs ``bitfold calibrate --board B --full`` (about an hour of
yosys for ulx3s-85f). Every ``--every``-th block of the stored sweep (LUT rows) is measured again
with the same job (shape, widths, output bits) through the calibration's own task, and the table
prints old vs new LUT4, FF and block RAM per block, with the relative change; the summary line is the
median and the largest absolute LUT change. Nothing is written to the table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

TABLES = Path(__file__).resolve().parents[1] / "hw_models" / "tables"


def stored_blocks(board: str) -> dict:
    """(shape, b_w, b_a, b_out) -> {metric: value} of the shipped rows."""
    rows = json.loads((TABLES / f"{board}.rows.json").read_text())["rows"]
    out: dict = {}
    for r in rows:
        key = ((r["in_features"], r["out_features"]), r["b_w"], r["b_a"], r["extra"].get("b_out"))
        out.setdefault(key, {})[r["metric"]] = r["value"]
    return out


def measure(args):
    from bitfold.export.open_fpga.probe import probe_job
    board, job = args
    return job, {m.metric: m.value for m in probe_job(board, job)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--board", default="ulx3s-85f")
    ap.add_argument("--every", type=int, default=25, help="measure every N-th stored block")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    stored = stored_blocks(args.board)
    jobs = sorted(stored, key=lambda k: (k[0], k[1], k[2], -1 if k[3] is None else k[3]))[::args.every]
    t = time.time()
    with ProcessPoolExecutor(args.workers) as pool:
        res = list(pool.map(measure, [(args.board, j) for j in jobs]))
    print(f"{args.board}: {len(jobs)} of {len(stored)} stored calibration blocks synthesized again "
          f"({time.time() - t:.0f} s)")
    print(f"{'block':<30}{'LUT4 table':>11}{'now':>8}{'change':>9}{'FF table':>10}{'now':>8}{'BRAM':>6}{'now':>5}")
    changes = []
    for job, new in res:
        old = stored[job]
        (n_in, n_out), bw, ba, bo = job
        c = (new["lut"] - old["lut"]) / old["lut"]
        changes.append(c)
        name = f"{n_in}x{n_out} W{bw}A{ba}" + (f" thr{bo}" if bo is not None else " mac")
        print(f"{name:<30}{old['lut']:>11.0f}{new['lut']:>8.0f}{c * 100:>8.1f}%{old['ff']:>10.0f}{new['ff']:>8.0f}"
              f"{old['bram']:>6.0f}{new['bram']:>5.0f}")
    print(f"LUT4 change: median {statistics.median(changes) * 100:+.1f}%, largest "
          f"{max(changes, key=abs) * 100:+.1f}% over {len(changes)} blocks")


if __name__ == "__main__":
    main()
