"""``bitfold demo``: the whole thin chain on the embedded digits data set.

FP32 CNN and a mixed-precision CNN are trained, the mixed one is exported to QONNX and QCDQ,
both files are verified against torch, and one table compares them.
"""
from __future__ import annotations

from pathlib import Path

from bitfold.toolchain.runs import TrainConfig

#: the demo's mixed-precision map: W7/A8 input layer (7-bit weights: exact in every CPU int8 kernel), 4/2-3 bit middle, 4-bit classifier
DEMO_MAP = {"convs.0": {"w": 7, "a": 8}, "convs.1": {"w": 4, "a": 4},
            "convs.2": {"w": 2, "a": 3}, "head": {"w": 4, "a": 4}}


def _fresh(out: Path) -> Path:
    if not out.exists():
        return out
    i = 2
    while Path(f"{out}-{i}").exists():
        i += 1
    return Path(f"{out}-{i}")


def run_demo(out: str | Path = "runs/demo", epochs: int = 15, progress: bool = True, events=None) -> dict:
    """Train FP32 and the mixed map, export the mixed run to QONNX and QCDQ (each verified); returns
    ``{out, fp32, mixed, exports}`` (``progress``: training progress bars)."""
    from bitfold.core.events import events_of
    from bitfold.export.onnx_export import export_run
    from bitfold.toolchain.train import train
    ev = events_of(events)
    out = _fresh(Path(out))
    ev.say(f"bitfold demo -> {out}  (digits 8x8, CNN, {epochs} epochs)")
    fp = train(TrainConfig(model="cnn", method="float", epochs=epochs), out / "fp32", progress=progress)
    q = train(TrainConfig(model="cnn", bits=DEMO_MAP, method="fixed", epochs=epochs), out / "mixed", progress=progress)
    exports = {fmt: export_run(out / "mixed", fmt, out / f"cnn_mixed.{fmt}.onnx") for fmt in ("qonnx", "qcdq")}
    return {"out": str(out), "fp32": fp, "mixed": q,
            "exports": {k: {"path": str(v.path), "summary": v.report.summary(), **v.report.as_dict()}
                        for k, v in exports.items()}}
