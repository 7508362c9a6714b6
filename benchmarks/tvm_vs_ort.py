"""TVM (untuned, Relax VM) vs onnxruntime latency on this host, same QCDQ / FP32 files, 1 thread.

    python benchmarks/tvm_vs_ort.py

For the digits CNN (8x8) and ResNet-20 (synthetic 32x32): FP32 ONNX and W4A4 QCDQ exports, batch 1,
median of interleaved rounds, ratio TVM / ORT (ORT: default session, i.e. its QDQ fusions on).
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")
warnings.filterwarnings("ignore")


def main():
    import numpy as np
    import onnxruntime as ort
    import torch
    from _timing import interleaved

    from bitfold.export.onnx_export import export_model
    from bitfold.export.tvm_backend import build
    from bitfold.boards import load_board
    from bitfold.toolchain.models import build_model
    from bitfold.toolchain.train import calibrate
    import tvm
    from tvm import relax
    torch.set_num_threads(1)
    print("batch 1, 1 thread, median of 7 interleaved rounds; TVM untuned (no MetaSchedule), Relax VM")
    print(f"{'model':<26}{'ORT ms':>9}{'TVM ms':>9}{'TVM/ORT':>9}")
    with tempfile.TemporaryDirectory() as td:
        for name, shape in (("cnn", (1, 8, 8)), ("resnet20", (3, 32, 32))):
            x = np.random.default_rng(0).standard_normal((1, *shape)).astype("float32")
            for variant in ("fp32", "w4a4 qcdq"):
                path = Path(td) / f"{name}_{variant.split()[0]}.onnx"
                if variant == "fp32":
                    m = build_model(name, shape, 10, method="float").eval()
                    torch.onnx.export(m, torch.zeros(1, *shape), str(path), input_names=["input"],
                                      output_names=["logits"], dynamo=False)
                else:
                    m = build_model(name, shape, 10, bits="w4a4")
                    calibrate(m, torch.randn(64, *shape), 32)
                    export_model(m, "qcdq", path, torch.randn(16, *shape))
                so = ort.SessionOptions()
                so.intra_op_num_threads = 1
                sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
                b = build(path, load_board("host-cpu"), Path(td) / f"b_{path.stem}", samples=4)
                vm = relax.VirtualMachine(tvm.runtime.load_module(b.artefacts["library"]), tvm.cpu())
                xt = tvm.runtime.tensor(x, tvm.cpu())
                med = interleaved({"ort": lambda: sess.run(None, {"input": x}), "tvm": lambda: vm["main"](xt)},
                                  rounds=7, steps=50)
                print(f"{name + ' ' + variant:<26}{med['ort'] * 1e3:>9.3f}{med['tvm'] * 1e3:>9.3f}"
                      f"{med['tvm'] / med['ort']:>8.1f}x")


if __name__ == "__main__":
    main()
