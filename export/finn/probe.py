"""Measurement driver (probe) for FINN boards (``pynq-z2``, ``zcu104``, ``ultra96-v2``): a one-layer
quantized model goes through FINN's estimate flow; the MVAU's LUT/BRAM/DSP estimates become rows
labelled ``estimated`` (tool: finn-plus)."""
from __future__ import annotations

import tempfile
from pathlib import Path

from bitfold.core.errors import BitfoldError
from bitfold.core.events import events_of
from bitfold.hw_models.fpga_rules import CYCLES
from bitfold.hw_models.store import Measurement

#: FINN estimates are fast at any width
FINN_GRID = {"linear": [(32, 16), (64, 32)], "bits": [2, 4, 8]}
QUICK_GRID = FINN_GRID
FULL_GRID = FINN_GRID


def measure(board, grid=FINN_GRID, events=None) -> list[Measurement]:
    """FINN estimates of one-layer models (a quantized input + a dense layer) on a Xilinx board."""
    import json

    from bitfold.export.finn.backend import env_info
    from bitfold.export.finn.backend import build as finn_build
    from bitfold.export.onnx_export import export_model

    from bitfold.toolchain.probe_models import one_layer_model
    info = env_info()
    jobs = [(s, w, a) for s in grid["linear"] for w in grid["bits"] for a in grid["bits"] if w >= 2]
    rows = []
    for i, ((n_in, n_out), b_w, b_a) in enumerate(jobs):
        events_of(events).progress(i, len(jobs))
        with tempfile.TemporaryDirectory(prefix="bitfold-finn-") as d:
            import torch
            m, in_shape = one_layer_model("linear", (n_in, n_out), b_w, b_a)
            x = torch.randn(32, *in_shape)
            path = export_model(m, "qonnx", Path(d) / "l.onnx", x, in_shape).path
            fps = int(board.clock_mhz * 1e6 / CYCLES)
            # LUT-based (HLS) MVAUs: FINN's RTL MVAU puts >= 4-bit layers into DSPs (LUT estimate 0)
            finn_build(path, board, Path(d) / "b", verify=False, bitstream=False, target_fps=fps, impl_style="hls")
            rep = json.loads((Path(d) / "b" / "build.json").read_text())
        mv = [r for r in rep["layers"] if r["type"].startswith("MVAU")]
        if not mv:
            raise BitfoldError(f"FINN produced no MVAU for a {n_in}x{n_out} W{b_w}A{b_a} layer")
        for metric, key, unit in (("lut", "LUT", "LUT (estimate)"), ("bram", "BRAM_18K", "BRAM18 (estimate)"),
                                  ("dsp", "DSP", "DSP (estimate)")):
            rows.append(Measurement(board=board.name, kind="linear", macs=n_in * n_out, weights=n_in * n_out,
                                    b_w=b_w, b_a=b_a, metric=metric, value=float(sum(r[key] for r in mv)), unit=unit,
                                    source="estimated", tool="finn-plus", tool_version=info.get("finn-plus", ""),
                                    device_id=board.part, in_features=n_in, out_features=n_out,
                                    parallelism=int(mv[0]["PE"]) * int(mv[0]["SIMD"]),
                                    extra={"pe": mv[0]["PE"], "simd": mv[0]["SIMD"], "target_fps": fps}))
    events_of(events).progress(len(jobs), len(jobs))
    return rows
