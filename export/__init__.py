"""Verified export of quantized models: QONNX and standard ONNX QCDQ.

The package itself is callable, so ``bitfold.export(model, example_input, "qonnx", "m.onnx")``
exports any Brevitas model (see :func:`bitfold.export.onnx_export.export_brevitas`), while
``bitfold.export.onnx_export`` / ``bitfold.export.verify`` stay importable as modules.
"""
import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, model, example_input, fmt="qonnx", out_path="model.onnx", x_verify=None, **tol):
        from bitfold.export.onnx_export import export_brevitas
        return export_brevitas(model, example_input, fmt, out_path, x_verify, **tol)


sys.modules[__name__].__class__ = _CallableModule
