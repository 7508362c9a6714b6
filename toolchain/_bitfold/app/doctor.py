"""``bitfold doctor``: what is installed, and what each missing piece disables.

The core packages are listed here; every backend lists its own requirements
(:meth:`bitfold.export.backends.Backend.requirements`)."""
from __future__ import annotations

from bitfold.export.backends import Requirement

CORE = [
    Requirement("torch", ("dist", "torch"), "everything (training)", "pip install torch==2.13.0"),
    Requirement("brevitas", ("dist", "brevitas"), "quantized layers (every method)", "pip install -e ."),
    Requirement("qonnx", ("dist", "qonnx"), "QONNX export and its verification", "pip install -e ."),
    Requirement("onnxruntime", ("dist", "onnxruntime"), "QCDQ export verification, TVM build checks",
                "pip install -e ."),
    Requirement("openvino", ("dist", "openvino"), "QCDQ exports also checked in OpenVINO (optional)",
                "pip install -e '.[openvino]'"),
    Requirement("distributed", ("dist", "distributed"), "sweeps on Dask (calibration blocks; else in-process)",
                "pip install -e '.[dist]'"),
]


def requirements() -> list[Requirement]:
    from bitfold.core.registry import backend_names, get_backend
    reqs = list(CORE)
    for name in backend_names():
        try:
            reqs += get_backend(name).requirements()
        except Exception as e:  # noqa: BLE001 - a backend that cannot load is itself a finding
            reqs.append(Requirement(f"backend {name}", ("call", lambda: None), f"the {name} backend ({e})",
                                    "reinstall bitfold"))
    return reqs


def diagnose() -> list[dict]:
    return [{"name": r.name, "found": r.found(), "enables": r.enables, "get": r.get} for r in requirements()]
