"""The FINN backend (Xilinx boards): FINN's builder in its own environment, driven as a subprocess
through a versioned JSON contract (``worker.py``); estimates, HW-layer execution checks, RTL lint
and verilator simulation of FINN's RTL layers here; Vivado-gated steps named when Vivado is missing.

Modules: ``backend`` (environment set-up, build), ``worker`` (runs inside the FINN environment),
``rtlsim`` (FINN's RTL layers in verilator), ``probe`` (cost-table measurement driver: FINN
estimates of one-layer models).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from bitfold.export.backends import Backend, FpgaOptions, Requirement


def _env_ready():
    from bitfold.export.finn.backend import env_dir, env_info, env_ready
    return f"{env_info().get('finn-plus', '?')} at {env_dir()}" if env_ready() else None


class FinnBackend(Backend):
    name, board_kind, accepts, metric, unit = "finn", "fpga", ("qonnx",), "lut", "LUT (estimate)"

    @dataclass
    class Options(FpgaOptions):
        samples: int = 20
        env: Optional[object] = None          # the FINN environment (default: bitfold setup finn's)
        impl_style: str = "hls"               # MVAU style for every layer: "hls" (LUT-based, what the cost
                                              # tables price), "rtl" (DSP-based), "auto" (FINN chooses)
        rtl_sim: bool = True                  # simulate FINN's generated RTL layers in verilator (with verify)

    def build(self, onnx_path, board, out_dir, options=None, events=None):
        from bitfold.export.finn.backend import build
        o = options or self.Options()
        return build(Path(onnx_path), board, Path(out_dir), folding=o.folding, verify=o.verify, samples=o.samples,
                     bitstream=o.bitstream, events=events, target_fps=o.target_fps, env=o.env,
                     impl_style=o.impl_style, rtl_sim=o.rtl_sim)

    def probe(self, board, full: bool = False, events=None, **kw):
        from bitfold.export.finn.probe import measure
        return measure(board, events=events)

    def requirements(self):
        return [
            Requirement("FINN environment", ("call", _env_ready),
                        "FINN builds and estimates for Xilinx boards (pynq-z2, zcu104, ultra96-v2)", "bitfold setup finn"),
            Requirement("Vivado", ("exe", "vivado"), "Xilinx bitstreams and post-route reports (FINN's last steps)",
                        "install AMD Vivado and put it on PATH (not available here)"),
        ]
