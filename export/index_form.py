"""Index + codebook ONNX form for non-uniform (codebook) weights - the storage-bound deployment.

Starting from the verified QCDQ export of the snapped model, every codebook layer's integer weight
initializer (``int8``, the ``grid_bits`` grid) is replaced by

    Gather(codebook:int8[2^b], Cast(index:uint8[weight shape]) -> int64)

so the file stores a b-bit index per weight plus 2^b grid values, and onnxruntime computes the
same integer weights before the unchanged DequantizeLinear -> Conv/Gemm. The rewritten file is
verified against torch like every export.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bitfold.core.atomic import atomic_path, write_json
from bitfold.core.errors import BitfoldError
from bitfold.toolchain.quant import compute_layers

from bitfold.export.qcdq_safety import pair_sum_bounds
from bitfold.export.verify import verify_file


def rewrite_to_index_form(onnx_path: Path, snapped_model) -> dict:
    import onnx
    from onnx import helper, numpy_helper
    m = onnx.load(str(onnx_path))
    inits = {i.name: i for i in m.graph.initializer}
    arrays = {n: numpy_helper.to_array(i) for n, i in inits.items()}
    stats = {}
    new_nodes = []
    for name, layer in compute_layers(snapped_model).items():
        idx, cb = getattr(layer, "_adq_index", None), getattr(layer, "_adq_codebook", None)
        if idx is None:
            continue
        with torch.no_grad():
            ints = layer.quant_weight().int().numpy().astype(np.int8)
        match = [n for n, a in arrays.items() if a.dtype == np.int8 and a.shape == ints.shape and np.array_equal(a, ints)]
        if len(match) != 1:
            raise BitfoldError(f"index form: cannot locate the weight initializer of {name} in the QCDQ graph")
        scale = float(layer.quant_weight().scale)
        cb_int = np.round(cb.numpy() / scale).astype(np.int8)
        if not np.array_equal(cb_int[idx.numpy().astype(np.int64)], ints):
            raise BitfoldError(f"index form: codebook of {name} does not reproduce its integer weights")
        target = match[0]
        safe = name.replace(".", "_")
        m.graph.initializer.remove(inits[target])
        m.graph.initializer.extend([numpy_helper.from_array(idx.numpy().astype(np.uint8), f"{safe}_index"),
                                    numpy_helper.from_array(cb_int, f"{safe}_codebook")])
        new_nodes += [helper.make_node("Cast", [f"{safe}_index"], [f"{safe}_index64"], to=onnx.TensorProto.INT64),
                      helper.make_node("Gather", [f"{safe}_codebook", f"{safe}_index64"], [target], axis=0)]
        stats[name] = {"index_bits": int(np.ceil(np.log2(len(cb_int)))), "entries": len(cb_int),
                       "weights": int(ints.size)}
    if not stats:
        raise BitfoldError("this model has no codebook layers", "the index form is for --method adq / asq runs")
    nodes = new_nodes + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.checker.check_model(m)
    onnx.save(m, str(onnx_path))
    return stats


def export_index_run(run_dir, out_path=None):
    """Export an ADQ run in index + codebook form (QCDQ integer grid behind Gathers), verified."""
    import onnx

    from bitfold.toolchain.runs import dataset_of, load_run

    from bitfold.export.onnx_export import export_model
    cfg, model, _ = load_run(run_dir)
    if not hasattr(model.quant_method, "snapped_codebooks"):
        raise BitfoldError(f"run {run_dir} (--method {cfg.method}) has no codebook weights",
                           "the index form is for --method adq / asq runs")
    ds = dataset_of(cfg)
    model.quant_method.prepare_export(model, ds.x_train)
    snapped = model.quant_method.for_export(model).eval()
    out_path = Path(out_path or Path(run_dir) / "model.index.onnx")
    with torch.no_grad():
        ref = snapped(ds.x_test).numpy()
    with atomic_path(out_path, suffix=".onnx") as tmp:
        export_model(snapped, "qcdq", tmp, ds.x_test, ds.input_shape)
        Path(str(tmp) + ".verify.json").unlink(missing_ok=True)
        stats = rewrite_to_index_form(tmp, snapped)
        # the same gates as a QCDQ file: pair sums of the weights the Gathers produce, then the
        # file's own arithmetic (fusions off), the default onnxruntime session and OpenVINO
        bounds = pair_sum_bounds(onnx.load(str(tmp)))
        unsafe = [b for b in bounds if not b.safe]
        if unsafe:
            raise BitfoldError("index-form export: int8 kernels without VNNI can saturate in "
                               + ", ".join(f"{b.node} (pair sum {b.bound} > 32767)" for b in unsafe),
                               "train these layers with <= 7-bit weights or <= 7-bit unsigned inputs")
        report = verify_file("qcdq", str(tmp), ds.x_test.numpy(), ref)
        if not report.passed:
            raise BitfoldError(f"index-form export does not match the torch model - {report.summary()}; "
                               f"runtimes: {report.runtimes}")
    write_json(out_path.with_name(out_path.name + ".verify.json"),
               {"format": "qcdq-index", "layers": stats, **report.as_dict(),
                "int8_pair_sums": [b.as_dict() for b in bounds]})
    return out_path, report, stats
