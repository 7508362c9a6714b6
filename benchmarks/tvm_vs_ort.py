"""TVM vs onnxruntime latency on this host, same files, batch 1, 1 thread, measured side by side.

    python benchmarks/tvm_vs_ort.py [--trials 32] [--models cnn resnet20] [--no-bits]

For the digits CNN (8x8) and ResNet-20 (synthetic 32x32), FP32 ONNX and W4A4 QCDQ exports. Columns
(median of interleaved rounds, all in one run):

* ORT: default session (QDQ fusions on: onnxruntime runs the quantized model with int8 kernels);
* TVM fake-quant: the Relax import as it is (float conv on dequantized weights), untuned;
* TVM int: bitfold's integer lowering (int8 x int8 -> int32 kernels), untuned;
* TVM int tuned: the same, MetaSchedule-tuned with ``--trials`` per conv/matmul kernel (a fresh
  tuning database per run, so the tuning time is printed too; layers that share a shape share a record).

Then (unless ``--no-bits``) per-layer latency of the digits CNN vs its uniform bit-width (W2..W8), tuned,
showing where lower bits do and do not help on this CPU with int8 kernels only.

``--kernel-rows`` (alone) instead prints, per model shape (digits CNN 8x8, Fashion-MNIST CNN and MLP
28x28, ResNet-20 32x32) and uniform width W1A1..W4A4, every layer's kernel time
as int8 and as the bit-serial kernel (untuned, default schedules, same build otherwise), and the whole
model: onnxruntime's default session, TVM int8 only, and TVM with the per-layer choice (``--kernels
auto``) - all measured in one run:

    python benchmarks/tvm_vs_ort.py --kernel-rows [--models cnn cnn28 mlp28 resnet20] [--widths 1 2 3 4]

W1A1 has no QCDQ export (bitfold's 1-bit activations are bipolar sign activations): its rows are the
W2A2 export with every 2-bit weight code replaced by its sign (bipolar +-1 weights, which the bit-serial
kernel runs as one plane) and every 2-bit activation clip narrowed to {0, 1} (unsigned 1-bit inputs) -
the same shapes and graph, for timing; the model's accuracy means nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")
warnings.filterwarnings("ignore")


def _export(name, shape, variant, path):
    import torch

    from bitfold.export.onnx_export import export_model
    from bitfold.toolchain.models import build_model
    from bitfold.toolchain.train import init_activation_stats
    torch.manual_seed(0)
    if variant == "fp32":
        m = build_model(name, shape, 10, method="float").eval()
        torch.onnx.export(m, torch.zeros(1, *shape), str(path), input_names=["input"], output_names=["logits"],
                          dynamo=False)
    else:
        m = build_model(name, shape, 10, bits=variant)
        init_activation_stats(m, torch.randn(64, *shape), 32)
        # timing on this host (VNNI); TVM accumulates in int32 - full-range 8-bit layers are kept
        export_model(m, "qcdq", path, torch.randn(16, *shape), allow_saturation=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=32, help="MetaSchedule trials per conv/matmul kernel")
    ap.add_argument("--models", nargs="+", default=["cnn", "resnet20"])
    ap.add_argument("--no-bits", action="store_true")
    ap.add_argument("--kernel-rows", action="store_true", help="per-layer int8 vs bit-serial rows (see above)")
    ap.add_argument("--widths", nargs="+", type=int, default=[2, 3, 4])
    args = ap.parse_args()
    if args.kernel_rows:
        return _kernel_rows(args.models if args.models != ["cnn", "resnet20"] else
                            ["cnn", "cnn28", "mlp28", "resnet20"], args.widths)
    import numpy as np
    import onnxruntime as ort
    import torch
    import tvm
    from _timing import interleaved
    from tvm import relax

    from bitfold.boards import load_board
    from bitfold.export.tvm.backend import build
    torch.set_num_threads(1)
    board = load_board("host-cpu")
    shapes = {"cnn": (1, 8, 8), "resnet20": (3, 32, 32)}
    print(f"batch 1, 1 thread, median of 9 interleaved rounds; tuned = {args.trials} MetaSchedule trials per "
          f"conv/matmul kernel; TVM {tvm.__version__}, onnxruntime {ort.__version__}")
    print(f"{'model':<20}{'ORT ms':>9}{'fake-q':>9}{'int':>9}{'tuned':>9}{'tuned/ORT':>11}{'tune s':>8}")
    with tempfile.TemporaryDirectory() as td:
        os.environ["BITFOLD_HOME"] = td        # a fresh tuning database: the tuning time is real
        for name in args.models:
            shape = shapes[name]
            x = np.random.default_rng(0).standard_normal((1, *shape)).astype("float32")
            for variant in ("fp32", "w4a4"):
                path = Path(td) / f"{name}_{variant}.onnx"
                _export(name, shape, variant, path)
                so = ort.SessionOptions()
                so.intra_op_num_threads = 1
                sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
                fns = {"ort": lambda s=sess: s.run(None, {"input": x})}
                tune_s = 0.0
                for label, opts in (("fake", {"integer": False}), ("int", {}), ("tuned", {"tune_trials": args.trials})):
                    t0 = time.perf_counter()
                    b = build(path, board, Path(td) / f"b_{path.stem}_{label}", samples=4, **opts)
                    if label == "tuned":
                        tune_s = time.perf_counter() - t0
                    vm = relax.VirtualMachine(tvm.runtime.load_module(b.artefacts["library"]), tvm.cpu())
                    xt = tvm.runtime.tensor(x, tvm.cpu())
                    fns[label] = lambda v=vm, xt=xt: v["main"](xt)
                med = interleaved(fns, rounds=9, steps=100)
                print(f"{name + ' ' + variant:<20}{med['ort'] * 1e3:>9.3f}{med['fake'] * 1e3:>9.3f}"
                      f"{med['int'] * 1e3:>9.3f}{med['tuned'] * 1e3:>9.3f}{med['tuned'] / med['ort']:>10.2f}x"
                      f"{tune_s:>8.0f}")
        if not args.no_bits:
            _bits_table(board, args.trials, Path(td))


def _bits_table(board, trials, td):
    """Per-layer (per-kernel) latency of the digits CNN vs its uniform bit-width, tuned, this host."""
    from bitfold.export.tvm.backend import build, measure_local
    widths = (2, 4, 6, 8)
    per = {}
    for bits in widths:
        path = td / f"cnn_bits{bits}.onnx"
        _export("cnn", (1, 8, 8), f"w{bits}a{bits}", path)
        build(path, board, td / f"bb{bits}", samples=4, tune_trials=trials)
        t = measure_local(td / f"bb{bits}", number=200, repeat=9)
        per[bits] = {k["layer"]: k["median"] for k in t["kernels"] if "layer" in k}
        per[bits]["whole model"] = t["median"]
    print("\nper-layer latency (us) vs uniform bit-width, digits CNN, integer lowering, tuned")
    print(f"{'layer':<18}" + "".join(f"{f'W{b}A{b}':>9}" for b in widths) + f"{'W2/W8':>8}")
    for layer in per[8]:
        vals = [per[b].get(layer, float("nan")) for b in widths]
        print(f"{layer:<18}" + "".join(f"{v * 1e6:>9.2f}" for v in vals) + f"{vals[0] / vals[-1]:>8.2f}")


def _w1a1_from_w2a2(src: Path, dst: Path) -> None:
    """The W2A2 QCDQ file with 1-bit operands where it has 2-bit ones: weight codes clipped to 2 bits
    become their signs (+-1, no zero: bipolar), unsigned activation clips at 3 become clips at 1."""
    import numpy as np
    import onnx
    from onnx import numpy_helper
    m = onnx.load(str(src))
    inits = {i.name: i for i in m.graph.initializer}
    for k, n in enumerate(m.graph.node):
        if n.op_type != "Clip" or len(n.input) != 3 or not all(t in inits for t in n.input[1:]):
            continue
        lo, hi = (numpy_helper.to_array(inits[t]) for t in n.input[1:])
        if n.input[0] in inits and lo.dtype == np.int8 and (int(lo), int(hi)) in ((-2, 1), (-1, 1)):
            w = numpy_helper.to_array(inits[n.input[0]])
            inits[n.input[0]].CopyFrom(numpy_helper.from_array(np.where(w >= 0, 1, -1).astype(np.int8), n.input[0]))
            new = (np.array(-1, np.int8), np.array(1, np.int8))
        elif lo.dtype == np.uint8 and (int(lo), int(hi)) == (0, 3):
            new = (lo, np.array(1, np.uint8))
        else:
            continue
        for j, v in enumerate(new):      # own bounds (the export may share them between nodes)
            name = f"w1a1_clip{k}_{j}"
            m.graph.initializer.append(numpy_helper.from_array(v, name))
            n.input[1 + j] = name
    used = {t for n in m.graph.node for t in n.input}
    keep = [i for i in m.graph.initializer if i.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    onnx.save(m, str(dst))


def _kernel_rows(models, widths):
    """Per-layer int8 vs bit-serial kernel latency and whole-model latency vs onnxruntime, one run."""
    import numpy as np
    import onnxruntime as ort
    import torch
    import tvm
    from _timing import interleaved
    from tvm import relax

    from bitfold.boards import load_board
    from bitfold.export.tvm.backend import build, measure_local
    torch.set_num_threads(1)
    board = load_board("host-cpu")
    spec = {"cnn": ("cnn", (1, 8, 8)), "cnn28": ("cnn", (1, 28, 28)), "mlp28": ("mlp", (1, 28, 28)),
            "resnet20": ("resnet20", (3, 32, 32))}
    print(f"batch 1, 1 thread; kernels untuned (default schedules); per-kernel medians of time_evaluator "
          f"(200 x 9), whole models interleaved (9 rounds); TVM {tvm.__version__}, onnxruntime {ort.__version__}")
    whole = []
    with tempfile.TemporaryDirectory() as td:
        os.environ["BITFOLD_HOME"] = td
        td = Path(td)
        for key in models:
            name, shape = spec[key]
            x = np.random.default_rng(0).standard_normal((1, *shape)).astype("float32")
            print(f"\n{key} {shape}: per-layer kernel (us)")
            print(f"{'layer':<22}{'bits':>6}{'int8':>10}{'bitserial':>11}{'bs/int8':>9}{'auto':>11}")
            for bits in widths:
                path = td / f"{key}_w{bits}.onnx"
                if bits == 1:
                    _export(name, shape, "w2a2", td / f"{key}_w2src.onnx")
                    _w1a1_from_w2a2(td / f"{key}_w2src.onnx", path)
                else:
                    _export(name, shape, f"w{bits}a{bits}", path)
                per, fns = {}, {}
                for mode in ("int8", "bitserial", "auto"):
                    b = build(path, board, td / f"b_{key}_{bits}_{mode}", samples=4, kernels=mode)
                    t = measure_local(td / f"b_{key}_{bits}_{mode}", number=200, repeat=9)
                    per[mode] = {k["layer"]: k["median"] for k in t["kernels"] if "layer" in k}
                    meta = json.loads((td / f"b_{key}_{bits}_{mode}" / "build.json").read_text())
                    per[mode]["_kernel"] = {la["layer"]: la["kernel"] for la in meta["layers"]}
                    vm = relax.VirtualMachine(tvm.runtime.load_module(b.artefacts["library"]), tvm.cpu())
                    xt = tvm.runtime.tensor(x, tvm.cpu())
                    fns[mode] = lambda v=vm, xt=xt: v["main"](xt)
                so = ort.SessionOptions()
                so.intra_op_num_threads = 1
                sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
                fns["ort"] = lambda s=sess: s.run(None, {"input": x})
                for layer, k in per["bitserial"]["_kernel"].items():
                    i8, bs = per["int8"].get(layer), per["bitserial"].get(layer)
                    if not k.startswith("bitserial"):
                        continue
                    print(f"{layer:<22}{k.split()[-1]:>6}{i8 * 1e6:>10.2f}{bs * 1e6:>11.2f}{bs / i8:>9.2f}"
                          f"{per['auto']['_kernel'][layer].split()[0]:>11}")
                med = interleaved(fns, rounds=9, steps=100)
                whole.append((key, bits, med))
        print(f"\nwhole model (ms){'':<6}{'ORT':>9}{'TVM int8':>10}{'TVM auto':>10}{'auto/int8':>10}{'auto/ORT':>10}")
        for key, bits, med in whole:
            print(f"{key + f' W{bits}A{bits}':<22}{med['ort'] * 1e3:>9.4f}{med['int8'] * 1e3:>10.4f}"
                  f"{med['auto'] * 1e3:>10.4f}{med['auto'] / med['int8']:>10.2f}{med['auto'] / med['ort']:>10.2f}")


if __name__ == "__main__":
    main()
