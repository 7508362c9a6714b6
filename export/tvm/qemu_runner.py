"""Runs a TVM build's library on inputs from a .npy file and saves the outputs (stdlib + numpy + tvm only).

Executed by ``bitfold.export.tvm.qemu`` with the board's Python under ``qemu-<arch>-static``; it must not
import bitfold (bitfold is not installed in the emulated sysroot).
usage: python qemu_runner.py model.so x.npy y.npy
"""
import platform
import sys

import numpy as np
import tvm
from tvm import relax


def main(lib, xin, yout):
    vm = relax.VirtualMachine(tvm.runtime.load_module(lib), tvm.cpu())
    x = np.load(xin)
    outs = []
    for i in range(len(x)):
        o = vm["main"](tvm.runtime.tensor(x[i:i + 1], tvm.cpu()))
        outs.append((o if hasattr(o, "numpy") else o[0]).numpy())
    np.save(yout, np.concatenate(outs))
    print(f"machine={platform.machine()} samples={len(x)} tvm={tvm.__version__}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
