"""One calibration sweep through the in-process path and through Dask with two local workers.

    python benchmarks/dask_sweep.py [--board icebreaker] [--blocks 16] [--workers 2]

The first ``--blocks`` blocks of the quick open-flow grid are synthesized by yosys, once in this
process (one after the other) and once as Dask tasks on a local cluster (127.0.0.1, single-threaded
worker processes; its start-up time is counted). Printed: both wall times, their ratio, and whether
the rows (every metric of every block) are identical.
"""
from __future__ import annotations

import argparse
import time


def main(argv=None):
    from bitfold.boards import load_board
    from bitfold.export.open_fpga.probe import QUICK_GRID, mac_jobs, measure_open_flow, thr_jobs
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--board", default="icebreaker")
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    g = QUICK_GRID
    jobs = (mac_jobs(g["linear"], g["bits"], g["bits"]) + thr_jobs(g["linear"], [(4, 4)], g["bits"]))[:args.blocks]
    b = load_board(args.board)
    t = time.time()
    here = measure_open_flow(b, jobs=jobs, scheduler="inprocess")
    t_here = time.time() - t
    t = time.time()
    there = measure_open_flow(b, jobs=jobs, workers=args.workers)        # a local cluster, started here
    t_dask = time.time() - t

    def rows(rs):
        return sorted((r.extra["task"], r.metric, r.value, r.in_features, r.out_features, r.b_w, r.b_a,
                       r.extra["b_out"]) for r in rs)
    same = rows(here) == rows(there)
    print(f"{len(jobs)} blocks on {b.name}: in-process {t_here:.1f} s, Dask {args.workers} local workers "
          f"{t_dask:.1f} s (cluster start-up included) -> {t_here / t_dask:.2f}x; rows identical: {same} "
          f"({len(here)} rows)")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
