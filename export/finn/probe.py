"""Measurement driver (probe) for FINN boards (``pynq-z2``, ``zcu104``, ``ultra96-v2``): a one-layer
quantized model (input quantizer + dense layer) goes through FINN's estimate flow at several target
rates; each build's estimates become rows labelled ``estimated`` (tool: finn-plus).

A row holds the whole build's total (the input quantizer's thresholds + the MVAU), with the PE and
SIMD FINN chose, the target rate and the cycles per frame it implies: the table fitted from them
prices a layer at a rate (``hw_models.finn_rules``: FINN's folding rule gives the lanes). The MVAUs
are built in the style ``bitfold build`` uses for FINN boards by default (:data:`MVAU_STYLE`).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from bitfold.core.errors import BitfoldError
from bitfold.core.events import events_of
from bitfold.hw_models.finn_rules import target_cycles
from bitfold.hw_models.store import Measurement

#: the MVAU implementation style of the probe and of ``bitfold build``'s default for FINN boards:
#: LUT-based HLS MVAUs, which FINN's estimates price in LUTs (its DSP-based RTL MVAU is estimated
#: at 0 LUT, so a LUT table could not price it)
MVAU_STYLE = "hls"

#: one-layer shapes (in, out) x target cycles per frame (at the board clock) x widths
FINN_GRID = {"linear": [(32, 16), (64, 64), (256, 32)], "cycles": [2048, 256, 32], "bits": [2, 4, 8]}
QUICK_GRID = {"linear": [(32, 16), (64, 64)], "cycles": [2048, 64], "bits": [2, 4, 8]}
FULL_GRID = FINN_GRID


def measure(board, grid=FINN_GRID, events=None) -> list[Measurement]:
    """FINN estimates of one-layer models on a Xilinx board, over shapes x rates x widths."""
    import json

    from bitfold.export.finn.backend import build as finn_build
    from bitfold.export.finn.backend import env_info
    from bitfold.export.onnx_export import export_model
    from bitfold.toolchain.probe_models import one_layer_model
    info = env_info()
    jobs = [(s, c, w, a) for s in grid["linear"] for c in grid["cycles"] for w in grid["bits"] for a in grid["bits"]]
    rows = []
    for i, ((n_in, n_out), cycles, b_w, b_a) in enumerate(jobs):
        events_of(events).progress(i, len(jobs))
        fps = board.clock_mhz * 1e6 / cycles
        with tempfile.TemporaryDirectory(prefix="bitfold-finn-") as d:
            import torch
            m, in_shape = one_layer_model("linear", (n_in, n_out), b_w, b_a)
            x = torch.randn(32, *in_shape)
            path = export_model(m, "qonnx", Path(d) / "l.onnx", x, in_shape).path
            finn_build(path, board, Path(d) / "b", verify=False, bitstream=False, target_fps=fps,
                       impl_style=MVAU_STYLE)
            rep = json.loads((Path(d) / "b" / "build.json").read_text())
        mv = [r for r in rep["layers"] if r["type"].startswith("MVAU")]
        if not mv:
            raise BitfoldError(f"FINN produced no MVAU for a {n_in}x{n_out} W{b_w}A{b_a} layer")
        pe, simd = int(mv[0]["PE"]), int(mv[0]["SIMD"])
        for metric, key, unit in (("lut", "LUT", "LUT (estimate)"), ("bram", "BRAM_18K", "BRAM18 (estimate)"),
                                  ("dsp", "DSP", "DSP (estimate)")):
            rows.append(Measurement(board=board.name, kind="linear", macs=n_in * n_out, weights=n_in * n_out,
                                    b_w=b_w, b_a=b_a, metric=metric, value=float(rep["totals"][key]), unit=unit,
                                    source="estimated", tool="finn-plus", tool_version=info.get("finn-plus", ""),
                                    device_id=board.part, in_features=n_in, out_features=n_out,
                                    parallelism=pe * simd,
                                    extra={"pe": pe, "simd": simd, "target_fps": int(fps), "cycles": cycles,
                                           "target_cycles": target_cycles(board.clock_mhz, int(fps)),
                                           "mvau_style": MVAU_STYLE, "mvau": float(sum(r[key] for r in mv))}))
    events_of(events).progress(len(jobs), len(jobs))
    return rows
