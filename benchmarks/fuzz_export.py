"""Long export-fuzzing run: the CI fuzz test (tests/export/test_fuzz_export.py) with more cases and more
verilator simulations, split into shards that run as Dask tasks, printing the summed counts.

    python benchmarks/fuzz_export.py [--cases 2000] [--sims 40] [--shards 8] [--scheduler HOST:PORT]

Every case either exports and verifies (torch = QONNX execution = onnxruntime QCDQ on fresh
inputs; for the open-FPGA subset also = the lowered integer model, and = the verilator simulation
for the first --sims of them) or is refused with a BitfoldError. Shard k draws its cases with
hypothesis seed k (the CI test uses the fixed derandomized sequence). A silent mismatch fails its
shard: hypothesis shrinks it to a minimal failing case, which is printed, and the count below is
non-zero. Shards run on a local Dask cluster by default (``--scheduler inprocess``: one after the
other here); on a cluster, every worker needs this checkout at the same path.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def shard(k: int, cases: int, sims: int) -> dict:
    """One shard: the fuzz test in its own pytest process with seed k (a Dask task)."""
    env = {**os.environ, "BITFOLD_FUZZ_CASES": str(cases), "BITFOLD_FUZZ_SIM": str(sims), "BITFOLD_FUZZ_SEED": str(k),
           "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                        str(ROOT / "tests" / "export" / "test_fuzz_export.py")], env=env, capture_output=True,
                       text=True, cwd=ROOT)
    line = next((ln for ln in p.stdout.splitlines() if "FUZZ-COUNTS" in ln), None)
    # the case test failing is a silent mismatch; the outcome test failing alone means too few cases
    # verified in this shard to judge (its thresholds scale with the cases; CI runs 120)
    return {"shard": k, "rc": p.returncode, "counts": json.loads(line.split("FUZZ-COUNTS", 1)[1]) if line else None,
            # a case test that failed on a BitfoldError was a refusal the harness did not expect, not a
            # file that disagrees: reported apart
            "mismatch": "test_every_case_verifies_or_is_refused" in
                        "".join(ln for ln in p.stdout.splitlines() if ln.startswith("FAILED"))
                        and "E                   bitfold.core.errors.BitfoldError" not in p.stdout,
            "uncaught_refusal": "E                   bitfold.core.errors.BitfoldError" in p.stdout,
            "tail": p.stdout[-6000:] if p.returncode else ""}


def main():
    from bitfold.core.tasks import Task, failures, run_tasks
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--sims", type=int, default=40, help="verilator simulations in all (split over the shards)")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--scheduler", default=None)
    ap.add_argument("--only", type=int, nargs="+", default=None, help="run these shard numbers only (a re-check)")
    args = ap.parse_args()
    n = max(1, args.shards)
    t = time.time()
    tasks = [Task(f"shard {k}", shard, (k, -(-args.cases // n), -(-args.sims // n))) for k in range(n)
             if args.only is None or k in args.only]
    res = run_tasks(tasks, scheduler=args.scheduler, retries=0)
    bad = failures(res)
    if bad:
        raise SystemExit("shards that did not run: " + "; ".join(map(str, bad)))
    out = [res[tk.key] for tk in tasks]
    print(f"{len(tasks) * -(-args.cases // n)} cases in {len(tasks)} shard(s), {time.time() - t:.0f} s")
    outcomes, fpga, groups = {"verified": 0, "refused": 0}, {"lowered": 0, "refused": 0, "simulated": 0}, {}
    for r in out:
        c = r["counts"]
        if not c:
            continue
        for k in outcomes:
            outcomes[k] += c["outcomes"][k]
        for k in fpga:
            fpga[k] += c["fpga"][k]
        for k, v in c["reasons"].items():
            key = "layers reading one tensor at different input widths" if k.startswith("layers ") else k
            groups[key] = groups.get(key, 0) + v
    print(f"export: verified {outcomes['verified']}, refused with a reason {outcomes['refused']}")
    for k, v in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  refused: {v:>5}  {k}")
    print(f"open FPGA: lowered and equal to QONNX {fpga['lowered']}, refused {fpga['refused']}, "
          f"simulated bit-exact {fpga['simulated']}")
    failed = [r for r in out if r["mismatch"] or (r["rc"] != 0 and not r["counts"])]
    print(f"silent mismatches: {len(failed)} shard(s)" + ("" if not failed else " - the failing cases:"))
    for r in failed:
        print(f"--- shard {r['shard']}\n{r['tail']}")
    odd = [r for r in out if r["uncaught_refusal"]]
    if odd:
        print(f"{len(odd)} shard(s) stopped on a refusal the test did not expect (a clear error, nothing written): "
              + ", ".join(str(r["shard"]) for r in odd))
    judged = [r for r in out if r["rc"] != 0 and r not in failed and r not in odd]
    if judged:
        print(f"{len(judged)} shard(s) below the CI test's outcome thresholds (too few cases per shard to judge)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
