"""Re-measure an open-flow board's whole-model factor: the 7 digits MLPs its evidence names.

    python benchmarks/model_factor.py [--board ulx3s-85f] [--out runs/model_factor] [--write]

The cost table predicts a model as the sum of its layers; a whole design synthesizes to a different
count (yosys optimises across layer boundaries, or not at all when the design is synthesized layer by
layer). The factor that maps one to the other is fitted on measured models: here the digits MLP at
uniform W2A2, W3A3, W4A4, W5A5, W6A6 and at W6A2 and W2A6, each trained 1 epoch, exported to QONNX and
synthesized by the open flow with the table's folding (yosys LUT4, the build's own synthesis path), as
Dask tasks (kept in --out/measured.json; --remeasure builds again). Prints measured vs predicted per model and the factor's in-sample and leave-one-out error;
``--write`` refits the factor of the board's table (``$BITFOLD_HOME/tables`` if one is there, else the
shipped one is copied there first) from these measurements.
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).parent))

MAPS = [(2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (6, 2), (2, 6)]
LAYERS = ("fcs.0", "fcs.1", "fcs.2", "head")


def main(argv=None):
    from cost_fidelity import _mlp_at, fpga_model_luts, measure_all

    import cost_fidelity
    from bitfold.core.atomic import write_json
    from bitfold.hw_models.table import find_table, refit_model_factor, table_path
    from bitfold.toolchain.describe import describe_layers
    from bitfold.toolchain.runs import load_run
    ap = argparse.ArgumentParser()
    ap.add_argument("--board", default="ulx3s-85f")
    ap.add_argument("--out", type=Path, default=Path("runs/model_factor"))
    ap.add_argument("--scheduler", default=None)
    ap.add_argument("--write", action="store_true", help="refit the board table's factor from these models")
    ap.add_argument("--remeasure", action="store_true", help="build the models again (else measured.json is reused)")
    args = ap.parse_args(argv)
    cost_fidelity.SCHEDULER = args.scheduler
    root = args.out / "models"
    root.mkdir(parents=True, exist_ok=True)
    made = []
    for w, a in MAPS:
        bits = {k: {"w": w, "a": a} for k in LAYERS}
        run, onnx = _mlp_at(bits, root, "qonnx")
        made.append((f"W{w}A{a}", bits, run, onnx))
    cache = args.out / "measured.json"   # a second run (e.g. after a table refit) re-scores without re-building
    if args.remeasure and cache.is_file():
        cache.unlink()
    cost_fidelity.CACHE = cost_fidelity.Cache(cache)
    vals = measure_all([(name, (args.board, str(onnx), str(args.out / f"b_{name}"))) for name, _, _, onnx in made],
                       fpga_model_luts, parallel=True)
    table = find_table(args.board)
    evidence = []
    for name, bits, run, onnx in made:
        _, model, ck = load_run(run)
        layers = describe_layers(model, tuple(ck["input_shape"]))
        evidence.append({"model": "digits mlp 64-64-64-64-10", "layers": [d.as_dict() for d in layers],
                         "bits": {k: [v["w"], v["a"]] for k, v in bits.items()}, "measured": vals[name],
                         "source": "benchmarks/model_factor.py",
                         "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
    refit = refit_model_factor(table.table, evidence, note=f"whole-model factor from {len(MAPS)} digits MLPs "
                               "(W2A2..W6A6, W6A2, W2A6 uniform; trained 1 epoch, synthesized by the open flow with "
                               "the table's folding, yosys LUT4); python benchmarks/model_factor.py")
    cal = refit["calibration"]
    print(f"{args.board}: table {table.source}")
    for e in cal["models_measured"]:
        m = e["bits"]["fcs.0"]
        print(f"  W{m[0]}A{m[1]}: measured {e['measured']:>8.0f} LUT4, table predicts {e['predicted']:>8.0f} "
              f"(x factor {cal['scale'] * e['predicted']:>8.0f})")
    print(f"factor {cal['scale']:.4f}: MAPE before {cal['mape_before']:.1%}, after {cal['mape_after']:.1%}, "
          f"leave-one-out {cal['mape_loo']:.1%}")
    write_json(args.out / "factor.json", cal)
    if args.write:
        write_json(table_path(args.board), refit)
        print(f"wrote {table_path(args.board)}")
    return cal


if __name__ == "__main__":
    main()
