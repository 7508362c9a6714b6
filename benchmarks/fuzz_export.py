"""Long export-fuzzing run: the CI fuzz test (tests/export/test_fuzz_export.py) with more cases and more
verilator simulations, printing the counts.

    python benchmarks/fuzz_export.py [--cases 2000] [--sims 10] [--seed-offset 0]

Every case either exports and verifies (torch = QONNX execution = onnxruntime QCDQ on fresh
inputs; for the open-FPGA subset also = the lowered integer model, and = the verilator simulation
for the first --sims of them) or is refused with a BitfoldError. A silent mismatch fails the test:
hypothesis shrinks it to a minimal failing case, which is printed, and the count below is non-zero.
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--sims", type=int, default=10)
    args = ap.parse_args()
    env = {**os.environ, "BITFOLD_FUZZ_CASES": str(args.cases), "BITFOLD_FUZZ_SIM": str(args.sims)}
    t = time.time()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                        str(ROOT / "tests" / "export" / "test_fuzz_export.py")], env=env, capture_output=True, text=True,
                       cwd=ROOT)
    line = next((ln for ln in p.stdout.splitlines() if "FUZZ-COUNTS" in ln), None)
    counts = json.loads(line.split("FUZZ-COUNTS", 1)[1]) if line else None
    print(f"{args.cases} cases in {time.time() - t:.0f} s")
    if counts:
        o, f = counts["outcomes"], counts["fpga"]
        print(f"export: verified {o['verified']}, refused with a reason {o['refused']}")
        groups: dict[str, int] = {}
        for k, v in counts["reasons"].items():
            key = "layers reading one tensor at different input widths" if k.startswith("layers ") else k
            groups[key] = groups.get(key, 0) + v
        for k, v in sorted(groups.items(), key=lambda kv: -kv[1]):
            print(f"  refused: {v:>5}  {k}")
        print(f"open FPGA: lowered and equal to QONNX {f['lowered']}, refused {f['refused']}, "
              f"simulated bit-exact {f['simulated']}")
    silent = 0 if p.returncode == 0 else 1
    print(f"silent mismatches: {silent}" + ("" if silent == 0 else " - the failing case:"))
    if silent:
        print(p.stdout[-6000:])
    sys.exit(p.returncode)


if __name__ == "__main__":
    main()
