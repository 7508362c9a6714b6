"""ASQ's dynamic deployment: the activation adapters exported as ONNX ops, verified in onnxruntime.

Unlike the folded QONNX/QCDQ export, the step of every activation quantizer stays input-dependent
(ReduceMean/Gemm/Sigmoid compute beta per sample; Div, Round, Clip, Mul quantize), so the file is
a float ONNX graph that onnxruntime runs but integer dataflow backends cannot.
"""
from __future__ import annotations

from pathlib import Path

import torch

from bitfold.core.atomic import atomic_path, write_json
from bitfold.core.errors import BitfoldError

from bitfold.export.verify import compare, run_ort
from bitfold.export.onnx_export import output_step


def export_dynamic_run(run_dir, out_path=None):
    from bitfold.toolchain.asq import ASQMethod, dynamic_export
    from bitfold.toolchain.runs import dataset_of, load_run
    cfg, model, _ = load_run(run_dir)
    if not isinstance(model.quant_method, ASQMethod):
        raise BitfoldError(f"run {run_dir} (--method {cfg.method}) has no adaptive activation steps",
                           "the dynamic form is for --method asq runs")
    ds = dataset_of(cfg)
    out_path = Path(out_path or Path(run_dir) / "model.dynamic.onnx")
    model.eval()
    with torch.no_grad():
        ref = model(ds.x_test).numpy()
    with atomic_path(out_path, suffix=".onnx") as tmp:
        try:
            dynamic_export(model, torch.zeros((1, *ds.input_shape)), tmp)
        except Exception as e:  # noqa: BLE001
            raise BitfoldError(f"dynamic export failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
        report = compare("onnx-dynamic", "onnxruntime", ref, run_ort(str(tmp), ds.x_test.numpy()),
                         output_step(model, ds.x_test))
        if not report.passed:
            raise BitfoldError(f"dynamic export does not match the torch model - {report.summary()}")
    acc = float((torch.from_numpy(ref).argmax(1) == ds.y_test).float().mean())
    write_json(out_path.with_name(out_path.name + ".verify.json"), {"format": "onnx-dynamic", "torch_accuracy": acc,
                                                                    **report.as_dict()})
    return out_path, report, acc
