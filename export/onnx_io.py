"""Loading ONNX files given by users: one clear error for anything that is not a valid model."""
from __future__ import annotations

import json
from pathlib import Path

from bitfold.core.errors import BitfoldError


def load_onnx(path: str | Path):
    import onnx
    path = Path(path)
    if not path.is_file():
        raise BitfoldError(f"ONNX file {path} does not exist")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:  # noqa: BLE001 - protobuf/checker raise many types for the same user error
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BitfoldError(f"{path} is not a valid ONNX model ({first[:160]})",
                           "re-export it with `bitfold export`, or check that the file is complete") from e
    if len(model.graph.input) == 0 or len(model.graph.output) == 0:
        raise BitfoldError(f"{path} has no graph inputs/outputs", "export a complete model")
    return model


def describe_onnx(model) -> dict:
    """Format, op histogram, quantizer widths and the bitfold bit map (if any) of an ONNX model."""
    ops: dict[str, int] = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    meta = {p.key: p.value for p in model.metadata_props}
    fmt = meta.get("bitfold.format") or ("qonnx" if {"Quant", "BipolarQuant"} & set(ops)
                                         else "qcdq" if "QuantizeLinear" in ops else "float")
    widths = []
    inits = {i.name: i for i in model.graph.initializer}
    from onnx import numpy_helper
    for n in model.graph.node:
        if n.op_type == "Quant" and len(n.input) > 3 and n.input[3] in inits:
            widths.append(float(numpy_helper.to_array(inits[n.input[3]])))
        elif n.op_type == "BipolarQuant":
            widths.append(1.0)
    bit_map = json.loads(meta["bitfold.bit_map"]) if "bitfold.bit_map" in meta else None
    return {"format": fmt, "ops": ops, "quant_widths": widths, "bit_map": bit_map,
            "inputs": [i.name for i in model.graph.input], "outputs": [o.name for o in model.graph.output]}
