"""``bitfold demo``: the whole thin chain on the embedded digits data set.

FP32 CNN and a mixed-precision CNN are trained, the mixed one is exported to QONNX and QCDQ,
both files are verified against torch, and one table compares them.
"""
from __future__ import annotations

from pathlib import Path

from bitfold.toolchain.runs import TrainConfig

#: the demo's mixed-precision map: 8-bit input layer, 4/2-3 bit middle, 4-bit classifier
DEMO_MAP = {"convs.0": {"w": 8, "a": 8}, "convs.1": {"w": 4, "a": 4},
            "convs.2": {"w": 2, "a": 3}, "head": {"w": 4, "a": 4}}


def _fresh(out: Path) -> Path:
    if not out.exists():
        return out
    i = 2
    while Path(f"{out}-{i}").exists():
        i += 1
    return Path(f"{out}-{i}")


def run_demo(out: str | Path = "runs/demo", epochs: int = 15, progress: bool = True, console=None) -> dict:
    from rich.console import Console
    from rich.table import Table

    from bitfold.export.onnx_export import export_run

    from bitfold.toolchain.train import train
    console = console or Console()
    out = _fresh(Path(out))
    console.print(f"[bold]bitfold demo[/] -> {out}  (digits 8x8, CNN, {epochs} epochs)")
    fp = train(TrainConfig(model="cnn", method="float", epochs=epochs), out / "fp32", progress=progress)
    q = train(TrainConfig(model="cnn", bits=DEMO_MAP, method="fixed", epochs=epochs), out / "mixed", progress=progress)
    exports = {fmt: export_run(out / "mixed", fmt, out / f"cnn_mixed.{fmt}.onnx") for fmt in ("qonnx", "qcdq")}

    t = Table(title="bitfold demo: digits CNN, FP32 vs mixed precision")
    for c in ("model", "test acc", "BitOPs", "weight memory"):
        t.add_column(c)
    t.add_row("FP32", f"{fp['accuracy']:.2%}", f"{fp['bitops']:.3g}", f"{fp['weight_bits'] / 8192:.1f} KiB")
    t.add_row("mixed", f"{q['accuracy']:.2%}", f"{q['bitops']:.3g} ({q['bitops'] / fp['bitops']:.1%})",
              f"{q['weight_bits'] / 8192:.2f} KiB ({q['weight_bits'] / fp['weight_bits']:.1%})")
    console.print(t)
    lt = Table(title="mixed-precision map (a = width of the layer's input activation)")
    for c in ("layer", "kind", "MACs", "w", "a", "BitOPs"):
        lt.add_column(c)
    for r in q["layers"]:
        lt.add_row(r["name"], r["kind"], f"{r['macs']:,}", str(r["w"]), str(r["a"]), f"{r['bitops']:.3g}")
    console.print(lt)
    console.print(f"runs: {out / 'fp32'}  {out / 'mixed'}")
    for e in exports.values():
        console.print(f"verified {e.path}\n  " + e.report.summary())
    return {"out": str(out), "fp32": fp, "mixed": q,
            "exports": {k: {"path": str(v.path), **v.report.as_dict()} for k, v in exports.items()}}
