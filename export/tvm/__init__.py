"""The TVM backend (CPU boards): QCDQ -> Relax -> integer kernels -> a shared library, verified
against onnxruntime; latency measured on this host or over a TVM RPC tracker.

Modules: ``backend`` (build, local timing), ``int_lowering`` (quantized conv/matmul -> int8
kernels), ``bitserial`` (sub-8-bit bit-serial kernels), ``schedules`` (default schedules for untuned
kernels), ``kernels`` (per-kernel entries), ``tune`` (MetaSchedule), ``rpc`` (tracker),
``qemu`` / ``qemu_runner`` (aarch64 under emulation), ``probe`` (cost-table measurement driver).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from bitfold.export.backends import Backend, Requirement


def _tuning_ready():
    from importlib.metadata import version

    from bitfold.export.tvm.tune import check_deps
    check_deps()
    import xgboost
    return f"apache-tvm-ffi {version('apache-tvm-ffi')}, xgboost {xgboost.__version__}"


def _arm64_ready():
    from bitfold.export.tvm.qemu import is_ready, sysroot_dir
    return str(sysroot_dir()) if is_ready() else None


class TVMBackend(Backend):
    name, board_kind, accepts, metric, unit = "tvm", "cpu", ("qcdq",), "latency", "s"

    @dataclass
    class Options:
        samples: int = 32
        integer: bool = True
        tune_trials: int = 0
        retune: bool = False
        tracker: Optional[str] = None
        key: Optional[str] = None
        qemu: Optional[bool] = None
        kernels: str = "auto"

    def build(self, onnx_path, board, out_dir, options=None, events=None):
        from bitfold.export.tvm.backend import build
        o = options or self.Options()
        return build(Path(onnx_path), board, Path(out_dir), samples=o.samples, integer=o.integer,
                     tune_trials=o.tune_trials, retune=o.retune, tracker=o.tracker, key=o.key,
                     events=events, qemu=o.qemu, kernels=o.kernels)

    def measure(self, build_dir, board, tracker: str | None = None, key: str | None = None, repeat: int = 7,
                **kw) -> dict:
        """Median / p10 / p90 latency (s) of a build: on this host, or on the board behind ``tracker``.
        ``device`` names the device (its RPC key, or this host's id), ``where`` where it ran."""
        from bitfold.core.errors import BitfoldError
        from bitfold.export.tvm.backend import is_host, measure_local
        if tracker:
            from bitfold.export.tvm.rpc import measure_rpc
            device = key or board.rpc_key or board.name
            return {**measure_rpc(Path(build_dir), tracker, device, repeat=repeat), "device": device,
                    "where": f"{device}@{tracker}"}
        if not is_host(board):
            raise BitfoldError(f"timing on this host, but board {board.name} is {board.triple}", "use --tracker")
        from bitfold.export.tvm.probe import device_id
        return {**measure_local(Path(build_dir), repeat=repeat), "device": device_id(), "where": device_id()}

    def probe(self, board, full: bool = False, events=None, tracker: str | None = None, key: str | None = None,
              grid: dict | None = None, **kw):
        from bitfold.export.tvm.probe import FULL_GRID, QUICK_GRID, measure
        return measure(board, grid or (FULL_GRID if full else QUICK_GRID), events=events,
                       tracker=tracker, key=key)

    def requirements(self):
        return [
            Requirement("apache-tvm", ("module", "tvm"),
                        "bitfold build --board host-cpu|rpi4, latency tables, bitfold run on CPU boards", "pip install -e ."),
            Requirement("aarch64 cross compiler", ("exe", "aarch64-linux-gnu-g++"), "TVM builds for ARM boards (rpi4)",
                        "apt-get install g++-aarch64-linux-gnu"),
            Requirement("MetaSchedule (tvm-ffi 0.1.14, xgboost)", ("call", _tuning_ready),
                        "bitfold build --tune-trials N (tuned TVM kernels)", "pip install -e '.[tvm]'"),
            Requirement("qemu-aarch64-static", ("exe", "qemu-aarch64-static"),
                        "running aarch64 TVM builds under emulation", "apt-get install qemu-user-static"),
            Requirement("arm64 sysroot", ("call", _arm64_ready),
                        "bitfold build --board rpi4 checks the ARM library under qemu", "bitfold setup arm64"),
        ]
