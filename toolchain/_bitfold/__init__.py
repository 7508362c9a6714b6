"""bitfold: hardware-aware quantization-aware training and deployment.

The installed package is one namespace:

* :mod:`bitfold.toolchain` - data, models, quantizer/method registry, training
* :mod:`bitfold.export`    - verified QONNX / QCDQ export
* :mod:`bitfold.hw_models` - cost models (BitOPs, weight memory, measured tables)
* :mod:`bitfold.boards`    - board descriptions

Heavy imports (torch, brevitas) happen lazily, so ``import bitfold`` is cheap.
"""
__version__ = "0.1.0"

__all__ = ["__version__", "build_model", "train", "quantize", "export", "export_run", "load_board"]


def __getattr__(name):  # lazy re-exports of the documented Python API
    if name == "build_model":
        from bitfold.toolchain.models import build_model
        return build_model
    if name == "train":
        from bitfold.toolchain.train import train
        return train
    if name == "quantize":
        from bitfold.toolchain.convert import quantize
        return quantize
    if name == "export":  # the subpackage, which is callable: bitfold.export(model, example_input, fmt, path)
        import importlib
        return importlib.import_module("bitfold.export")
    if name == "export_run":
        from bitfold.export.onnx_export import export_run
        return export_run
    if name == "load_board":
        from bitfold.boards import load_board
        return load_board
    raise AttributeError(f"module 'bitfold' has no attribute {name!r}")
