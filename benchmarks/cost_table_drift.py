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
from pathlib import Path

TABLES = Path(__file__).resolve().parents[1] / "hw_models" / "tables"


def by_block(rows) -> dict:
    """(shape, b_w, b_a, b_out) -> {metric: value} of calibration rows (dicts or Measurements)."""
    out: dict = {}
    for r in rows:
        r = r if isinstance(r, dict) else r.__dict__
        key = ((r["in_features"], r["out_features"]), r["b_w"], r["b_a"], r["extra"].get("b_out"))
        out.setdefault(key, {})[r["metric"]] = r["value"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--board", default="ulx3s-85f")
    ap.add_argument("--every", type=int, default=25, help="measure every N-th stored block")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--scheduler", default=None, help="Dask scheduler HOST:PORT, or 'inprocess'")
    args = ap.parse_args(argv)
    from bitfold.boards import load_board
    from bitfold.export.open_fpga.probe import measure_open_flow
    stored = by_block(json.loads((TABLES / f"{args.board}.rows.json").read_text())["rows"])
    jobs = sorted(stored, key=lambda k: (k[0], k[1], k[2], -1 if k[3] is None else k[3]))[::args.every]
    t = time.time()
    # the calibration's own tasks (bitfold.core.tasks on Dask), the same jobs as the stored sweep
    now = by_block(measure_open_flow(load_board(args.board), jobs=jobs, workers=args.workers, scheduler=args.scheduler))
    print(f"{args.board}: {len(jobs)} of {len(stored)} stored calibration blocks synthesized again "
          f"({time.time() - t:.0f} s)")
    print(f"{'block':<30}{'LUT4 table':>11}{'now':>8}{'change':>9}{'FF table':>10}{'now':>8}{'BRAM':>6}{'now':>5}")
    changes = []
    for job in jobs:
        old, new = stored[job], now[job]
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
