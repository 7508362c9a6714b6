"""Per-kernel entry points in a TVM build, so each layer can be timed on its own, on the device.

After fusion, ``main`` is a sequence of ``call_tir`` bindings, one per fused kernel (a conv with its
requantize chain, a pool, ...). :func:`add_kernel_entries` adds one Relax function per kernel,
``bf_kernel_<i>(inputs...)``, that calls the same compiled kernel (constants such as weights stay
embedded), and returns a description of each: its name, input shapes and dtypes, and - for kernels that
hold a convolution or matmul - the ONNX layer it computes and whether it runs in integer arithmetic.
``measure`` code then calls ``time_evaluator("bf_kernel_<i>")`` with random inputs of those shapes.
"""
from __future__ import annotations

import numpy as np


def add_kernel_entries(mod, layers: list | None = None):
    import tvm
    from tvm import relax
    call_tir = tvm.ir.Op.get("relax.call_tir")
    main = mod["main"]
    found = []
    for block in main.body.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(v, relax.Call) and v.op == call_tir:
                found.append(v)
    bb = relax.BlockBuilder(mod)
    kernels = []
    compute = iter(layers or [])
    for i, call in enumerate(found):
        gv, args = call.args[0], call.args[1]
        params, call_args, inputs = [], [], []
        for j, a in enumerate(args.fields):
            if isinstance(a, tvm.ir.expr.Constant):
                call_args.append(a)
                continue
            ty = a.ty
            p = relax.Var(f"a{j}", relax.TensorType([int(d) for d in ty.shape], ty.dtype))
            params.append(p)
            call_args.append(p)
            inputs.append({"shape": [int(d) for d in ty.shape], "dtype": str(ty.dtype)})
        name = f"bf_kernel_{i}"
        with bb.function(name, params):
            out = bb.emit(relax.call_tir(gv, call_args, out_ty=list(call.ty_args)))
            bb.emit_func_output(out)
        entry = {"index": i, "function": name, "kernel": gv.name_hint, "inputs": inputs}
        if any(k in gv.name_hint for k in ("conv2d", "matmul", "dense")):
            la = next(compute, None)
            if la is not None:
                entry.update({"layer": la.layer, "op": la.op, "arith": la.arith, "detail": la.detail})
        kernels.append(entry)
    return bb.get(), kernels


def random_inputs(entry: dict, dev, seed: int = 0):
    import tvm
    rng = np.random.default_rng(seed)
    out = []
    for spec in entry["inputs"]:
        dt = np.dtype(spec["dtype"])
        if np.issubdtype(dt, np.integer):
            info = np.iinfo(dt)
            a = rng.integers(max(info.min, -128), min(info.max, 127) + 1, size=spec["shape"]).astype(dt)
        else:
            a = rng.standard_normal(spec["shape"]).astype(dt)
        out.append(tvm.runtime.tensor(a, dev))
    return out


def time_kernels(vm, dev, kernels: list[dict], number: int, repeat: int) -> list[dict]:
    """Median / p10 / p90 seconds of each kernel entry, on ``dev``."""
    rows = []
    for k in kernels:
        res = np.array(vm.time_evaluator(k["function"], dev, number=number, repeat=repeat)(
            *random_inputs(k, dev)).results)
        rows.append({**{key: k[key] for key in ("index", "kernel") if key in k},
                     **{key: k[key] for key in ("layer", "arith") if key in k},
                     "median": float(np.median(res)), "p10": float(np.percentile(res, 10)),
                     "p90": float(np.percentile(res, 90))})
    return rows
