"""FINN's classic networks trained by bitfold and built through FINN, beside FINN's published figures.

    python benchmarks/finn_classics.py [--models tfc sfc lfc cnv] [--bits w1a1 w1a2 w2a2]
        [--subset 20000,5000] [--epochs 3] [--board pynq-z2] [--fps 0] [--cifar-dir DIR] [--open-flow tfc sfc]

TFC / SFC / LFC train on Fashion-MNIST (Debian's ``dataset-fashion-mnist``), CNV on CIFAR-10 python
batches from ``--cifar-dir`` (bitfold never downloads; without them CNV trains one epoch on synthetic
32x32 data: its hardware numbers are real, its accuracy is meaningless and printed as such). Every
classic is exported to QONNX (verified) and built by FINN's estimate flow on ``--board`` (each step
verified; ``--fps 0``: the fastest rate that fits the board, FINN's own estimates deciding) and, with
``--open-flow MODEL ...``, synthesized by the open flow on ulx3s-85f asking for the rate FINN reached
(yosys LUT4, no place and route; the open planner may reach less - its rate is printed). FINN's published figures (FINN paper, FPGA'17, on the larger ZC706; MNIST / CIFAR-10)
are printed beside for scale - a different part, data set and FINN version, so not a like-for-like
comparison. Results: ``--out`` (finn_classics.json, finn_classics.txt).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

#: FINN paper (Umuroglu et al., FPGA 2017), abstract: ZC706 (xc7z045), binarized networks
PUBLISHED = {"sfc": "FINN paper, SFC-max on ZC706: 12.3 M inferences/s, 0.31 us, 95.8 % (MNIST)",
             "cnv": "FINN paper, CNV-max on ZC706: 21,906 inferences/s, 283 us, 80.1 % (CIFAR-10)"}


def train_export(model: str, bits: str, args, root: Path) -> tuple[Path, float, str]:
    from bitfold.export.onnx_export import export_run
    from bitfold.toolchain.runs import TrainConfig
    from bitfold.toolchain.train import train
    if model == "cnv":
        data = ("cifar10", str(args.cifar_dir), None, args.epochs) if args.cifar_dir else ("synthetic", None, None, 1)
    else:
        data = ("fashion-mnist", None, args.subset, args.epochs)
    name, data_dir, subset, epochs = data
    run = root / f"{model}-{bits}"
    m = train(TrainConfig(model=model, bits=f"{bits}:all", data=name, data_dir=data_dir, subset=subset,
                          epochs=epochs, seed=args.seed), run, progress=False)
    return export_run(run, "qonnx", root / f"{model}-{bits}.onnx").path, m["accuracy"], name


def finn_build(onnx: Path, board: str, fps: float, out: Path) -> dict:
    from bitfold.core.errors import BitfoldError
    from bitfold.export.backends import build
    t = time.time()
    try:
        build(onnx, board, out, bitstream=False, target_fps=fps)
    except BitfoldError as e:
        return {"error": e.message[:300], "wall_s": round(time.time() - t, 1)}
    info = json.loads((out / "build.json").read_text())
    perf = info["performance"]
    return {"lut": info["totals"]["LUT"], "bram18": info["totals"]["BRAM_18K"], "dsp": info["totals"]["DSP"],
            "fps": perf.get("estimated_throughput_fps"), "latency_us": round(perf.get("estimated_latency_ns", 0) / 1000, 2),
            "verified_steps": sum(c["passed"] for c in info["verification"].values()),
            "steps": len(info["verification"]), "wall_s": round(time.time() - t, 1)}


def open_build(onnx: Path, fps: float, out: Path) -> dict:
    from bitfold.core.errors import BitfoldError
    from bitfold.export.backends import build
    t = time.time()
    try:
        build(onnx, "ulx3s-85f", out, bitstream=False, verify=False, target_fps=fps)
    except BitfoldError as e:
        return {"error": e.message[:300], "wall_s": round(time.time() - t, 1)}
    from bitfold.export.open_fpga.probe import model_resources
    info = json.loads((out / "build.json").read_text())
    return {"lut4": model_resources(out / "build.json")["lut"], "fps": info["throughput"]["inferences_per_s"],
            "wall_s": round(time.time() - t, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tfc", "sfc", "lfc", "cnv"], choices=["tfc", "sfc", "lfc", "cnv"])
    ap.add_argument("--bits", nargs="+", default=["w1a1", "w1a2", "w2a2"])
    ap.add_argument("--subset", default="20000,5000", help="Fashion-MNIST TRAIN,TEST samples ('all': 60k / 10k)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--board", default="pynq-z2")
    ap.add_argument("--fps", type=float, default=0, help="FINN target rate; 0: the fastest rate that fits the board")
    ap.add_argument("--cifar-dir", type=Path, default=None)
    ap.add_argument("--open-flow", nargs="*", default=[], metavar="MODEL",
                    help="these models also synthesized by the open flow on ulx3s-85f at FINN's reached rate")
    ap.add_argument("--out", type=Path, default=Path("runs/finn_classics"))
    args = ap.parse_args(argv)
    args.subset = None if args.subset == "all" else tuple(int(v) for v in args.subset.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bitfold-classics-"))
    rows = []
    for model in args.models:
        for bits in args.bits:
            t = time.time()
            onnx, acc, data = train_export(model, bits, args, root)
            row = {"model": model, "bits": bits, "data": data, "accuracy": acc, "train_s": round(time.time() - t, 1)}
            row["finn"] = finn_build(onnx, args.board, args.fps, root / f"{model}-{bits}-finn")
            if model in args.open_flow and row["finn"].get("fps"):
                row["open"] = open_build(onnx, row["finn"]["fps"], root / f"{model}-{bits}-open")
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = [f"FINN's classics trained by bitfold, FINN {args.board} estimates at "
             f"{'the fastest rate that fits' if not args.fps else f'{args.fps:,.0f} inferences/s'}",
             f"{'model':5} {'bits':5} {'data':14} {'acc':>7} {'LUT':>8} {'BRAM18':>6} {'DSP':>4} {'inf/s':>11} "
             f"{'lat us':>8} {'verified':>8}" + ("  open LUT4 / inf/s" if args.open_flow else "")]
    for r in rows:
        f = r["finn"]
        acc = f"{100 * r['accuracy']:.2f}%" if r["data"] != "synthetic" else "(synth)"
        if "error" in f:
            lines.append(f"{r['model']:5} {r['bits']:5} {r['data']:14} {acc:>7}  FINN: {f['error']}")
            continue
        line = (f"{r['model']:5} {r['bits']:5} {r['data']:14} {acc:>7} {f['lut']:>8,.0f} {f['bram18']:>6g} {f['dsp']:>4g} "
                f"{f['fps']:>11,.0f} {f['latency_us']:>8} {f['verified_steps']:>4}/{f['steps']}")
        if "open" in r:
            o = r["open"]
            line += f"  {o['error'][:60]}" if "error" in o else f"  {o['lut4']:,} / {o['fps']:,.0f}"
        lines.append(line)
    lines += ["", "published, for scale (another part, data set and FINN version):"]
    lines += [f"  {PUBLISHED[m]}" for m in args.models if m in PUBLISHED]
    text = "\n".join(lines)
    print("\n" + text)
    (args.out / "finn_classics.json").write_text(json.dumps(rows, indent=1))
    (args.out / "finn_classics.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
