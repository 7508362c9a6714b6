"""How far a shipped open-flow cost table is from the current RTL: a sample of its calibration blocks
synthesized again, side by side with the table's stored measurements.

    python benchmarks/cost_table_drift.py [--board ulx3s-85f] [--every 25] [--workers 1]

The shipped table (``hw_models/tables/<board>.rows.json``) was fitted to yosys runs of one-layer
blocks on the RTL of its date. After an RTL change the question is whether the table still
describes what the flow builds, or needs ``bitfold calibrate --board B --full`` (about an hour of
yosys for ulx3s-85f). Every ``--every``-th block of the stored sweep (LUT rows) is measured again
with the same job (shape, widths, output bits) through the calibration's own task, and the table
prints old vs new LUT4, FF and block RAM per block, with the relative change; the summary line is the
median and the largest absolute LUT change. Nothing is written to the table unless ``--update``.

    python benchmarks/cost_table_drift.py --board icebreaker --b-out 3 --every 1 --update

``--b-out N`` keeps the blocks with N-bit threshold outputs (``--b-out mac``: the raw-accumulator
blocks) - the ones an RTL change touched; ``--update`` then replaces those blocks' rows in the
shipped ``<board>.rows.json`` with the new measurements and refits the shipped ``<board>.json`` from
all its rows (the whole-model factor carried with its evidence, as ``bitfold hw fit`` does; re-measure
the evidence's models with ``benchmarks/model_factor.py`` when their RTL changed too). Both files are
written atomically.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

TABLES = Path(__file__).resolve().parents[1] / "hw_models" / "tables"


def _fields(r) -> dict:
    return r if isinstance(r, dict) else r.__dict__


def block_key(r) -> tuple:
    """(shape, b_w, b_a, b_out) of a calibration row (a dict or a Measurement)."""
    r = _fields(r)
    return (r["in_features"], r["out_features"]), r["b_w"], r["b_a"], r["extra"].get("b_out")


def by_key(rows) -> dict:
    """block -> its rows."""
    out: dict = {}
    for r in rows:
        out.setdefault(block_key(r), []).append(r)
    return out


def by_block(rows) -> dict:
    """block -> {metric: value} of calibration rows (dicts or Measurements)."""
    return {k: {_fields(r)["metric"]: _fields(r)["value"] for r in v} for k, v in by_key(rows).items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--board", default="ulx3s-85f")
    ap.add_argument("--every", type=int, default=25, help="measure every N-th stored block")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--scheduler", default=None, help="Dask scheduler HOST:PORT, or 'inprocess'")
    ap.add_argument("--b-out", default=None, help="only the blocks with this many output bits ('mac': raw accumulator)")
    ap.add_argument("--update", action="store_true",
                    help="write the new rows of these blocks into the shipped rows file and refit the shipped table")
    args = ap.parse_args(argv)
    from bitfold.boards import load_board
    from bitfold.export.open_fpga.probe import measure_open_flow
    stored_rows = json.loads((TABLES / f"{args.board}.rows.json").read_text())["rows"]
    stored = by_block(stored_rows)
    jobs = sorted(stored, key=lambda k: (k[0], k[1], k[2], -1 if k[3] is None else k[3]))
    if args.b_out is not None:
        want = None if args.b_out == "mac" else int(args.b_out)
        jobs = [j for j in jobs if j[3] == want]
    jobs = jobs[::args.every]
    t = time.time()
    # the calibration's own tasks (bitfold.core.tasks on Dask), the same jobs as the stored sweep
    new_rows = measure_open_flow(load_board(args.board), jobs=jobs, workers=args.workers, scheduler=args.scheduler)
    now = by_block(new_rows)
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
    if args.update:
        update_shipped(args.board, stored_rows, new_rows, set(jobs))


def update_shipped(board: str, stored_rows: list, new_rows: list, jobs: set) -> None:
    """Replace ``jobs``' rows of the shipped rows file by ``new_rows`` (same order: each block's rows
    where its old rows were) and refit the shipped table from the result."""
    from dataclasses import asdict

    from bitfold.app.calibrate import carry_model_factor
    from bitfold.core.atomic import write_json, write_text
    from bitfold.hw_models.store import Measurement
    from bitfold.hw_models.table import fit_table, load_table_file
    import datetime as dt
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    for m in new_rows:              # dated as the measurement store dates what it records
        m.date = m.date or now
    fresh = by_key(new_rows)
    rows, done = [], set()
    for r in stored_rows:
        key = block_key(r)
        if key not in jobs:
            rows.append(r)
        elif key not in done:
            rows.extend(asdict(m) for m in fresh[key])
            done.add(key)
    shipped = TABLES / f"{board}.json"
    previous = load_table_file(shipped, board)
    table = carry_model_factor(fit_table([Measurement(**r) for r in rows if r["metric"] == previous.table["metric"]],
                                         board, previous.table["metric"]), previous)
    write_text(TABLES / f"{board}.rows.json", json.dumps({"board": board, "rows": rows}, indent=1))
    write_json(shipped, table)
    print(f"wrote {TABLES / f'{board}.rows.json'} ({len(done)} blocks replaced) and {shipped}")


if __name__ == "__main__":
    main()
