"""Run aarch64 TVM builds under user-mode emulation (qemu-aarch64-static), to check the ARM code itself.

``setup()`` assembles, once, an arm64 sysroot in ``$BITFOLD_HOME/arm64-sysroot``:

* Debian's arm64 Python 3.11 and the libraries it needs (``apt-get download <pkg>:arm64`` + ``dpkg -x``:
  no root needed, but the machine must know the arm64 architecture - ``dpkg --add-architecture arm64 &&
  apt-get update``, which ``.ci/run`` does);
* the aarch64 wheels of the *same* apache-tvm / apache-tvm-ffi versions as the host, numpy and ml_dtypes,
  unpacked into a ``site`` folder.

``run(build_dir, x)`` executes the build's ``model.so`` with that Python under qemu (``QEMU_LD_PREFIX``
pointing at the sysroot) through ``qemu_runner.py`` and returns its outputs; ``verify`` compares them with
onnxruntime on the host. The emulated run checks the plumbing and the ARM code's correctness; its timing
says nothing about a real board.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

from bitfold.core.events import events_of
from bitfold.core.errors import BitfoldError, ToolMissingError

#: Debian bookworm packages that make up an arm64 Python 3.11 able to import numpy and TVM
DEBS = ["python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6", "libstdc++6", "libgcc-s1",
        "libgomp1", "libexpat1", "zlib1g", "libffi8", "libssl3", "libbz2-1.0", "liblzma5", "libsqlite3-0",
        "libuuid1", "libncursesw6", "libtinfo6", "libreadline8", "libcrypt1", "libnsl2", "libtirpc3", "libdb5.3",
        "libgdbm6"]
QEMU = "qemu-aarch64-static"


def sysroot_dir() -> Path:
    from bitfold.core.paths import bitfold_home
    return Path(os.environ.get("BITFOLD_ARM64_SYSROOT", bitfold_home() / "arm64-sysroot"))


def _versions() -> dict:
    from importlib.metadata import version
    return {p: version(p) for p in ("apache-tvm", "apache-tvm-ffi", "numpy", "ml_dtypes")}


def _need_tools():
    if shutil.which(QEMU) is None:
        raise ToolMissingError(f"running aarch64 builds needs {QEMU}, which is not installed",
                               "Debian/Ubuntu: apt-get install qemu-user-static")
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise ToolMissingError("assembling the arm64 sysroot needs Debian's apt-get and dpkg",
                               "run on Debian/Ubuntu, or point BITFOLD_ARM64_SYSROOT at a ready sysroot")
    archs = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True, text=True).stdout.split()
    if "arm64" not in archs:
        raise ToolMissingError("the package manager does not know the arm64 architecture",
                               "as root: dpkg --add-architecture arm64 && apt-get update")


def is_ready(root: Path | None = None) -> bool:
    root = Path(root or sysroot_dir())
    try:
        info = json.loads((root / "sysroot.json").read_text())
    except (OSError, ValueError):
        return False
    return info.get("versions") == _versions() and shutil.which(QEMU) is not None


def setup(root: Path | None = None, force: bool = False, events=None) -> dict:
    """Assemble the arm64 sysroot (once; reused while the host's TVM versions match)."""
    say = events_of(events).say
    root = Path(root or sysroot_dir())
    if is_ready(root) and not force:
        return json.loads((root / "sysroot.json").read_text())
    _need_tools()
    t0 = time.time()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        debs = tmp / "debs"
        debs.mkdir()
        say(f"downloading {len(DEBS)} arm64 Debian packages (python3.11 and its libraries)")
        r = subprocess.run(["apt-get", "download", *[f"{p}:arm64" for p in DEBS]], cwd=debs,
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise BitfoldError(f"apt-get download failed: {r.stderr.strip().splitlines()[-1] if r.stderr else r.returncode}",
                               "as root: dpkg --add-architecture arm64 && apt-get update; then retry")
        for deb in sorted(debs.glob("*.deb")):
            subprocess.run(["dpkg", "-x", str(deb), str(tmp / "root")], check=True)
        shutil.rmtree(debs)
        vers = _versions()
        say("downloading the aarch64 wheels of " + ", ".join(f"{k}=={v}" for k, v in vers.items()))
        wheels = tmp / "wheels"
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--no-deps",
                            "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux2014_aarch64",
                            "--python-version", "3.11", "--implementation", "cp", "-d", str(wheels),
                            *[f"{k}=={v}" for k, v in vers.items()], "typing_extensions"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise BitfoldError("pip could not download the aarch64 wheels: "
                               + (r.stderr.strip().splitlines() or ["?"])[-1][:300], "check the network / PyPI access")
        for w in sorted(wheels.glob("*.whl")):
            with zipfile.ZipFile(w) as z:
                z.extractall(tmp / "site")
        shutil.rmtree(wheels)
        info = {"versions": vers, "debs": DEBS, "setup_s": round(time.time() - t0, 1)}
        (tmp / "sysroot.json").write_text(json.dumps(info, indent=2) + "\n")
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"arm64 sysroot ready in {root} ({info['setup_s']} s)")
    return info


def run(lib: Path, x: np.ndarray, root: Path | None = None, timeout: int = 600) -> tuple[np.ndarray, str]:
    """Run an aarch64 ``model.so`` on ``x`` under qemu: ``(outputs, runner's report line)``."""
    root = Path(root or sysroot_dir())
    if not is_ready(root):
        raise ToolMissingError(f"no arm64 sysroot at {root} (or it was made for other TVM versions)",
                               "bitfold setup arm64   (needs qemu-user-static and the arm64 apt architecture)")
    runner = Path(__file__).with_name("qemu_runner.py")
    with tempfile.TemporaryDirectory(prefix="bf-qemu-") as td:
        np.save(Path(td) / "x.npy", x.astype(np.float32))
        env = {"PATH": os.environ.get("PATH", ""), "QEMU_LD_PREFIX": str(root / "root"),
               "PYTHONPATH": str(root / "site"), "PYTHONNOUSERSITE": "1", "TVM_NUM_THREADS": "1",
               "HOME": td}
        try:
            r = subprocess.run([QEMU, str(root / "root/usr/bin/python3.11"), str(runner), str(lib),
                                str(Path(td) / "x.npy"), str(Path(td) / "y.npy")],
                               capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise BitfoldError(f"the emulated run of {lib} took longer than {timeout} s") from e
        if r.returncode != 0:
            tail = (r.stderr.strip().splitlines() or ["?"])[-1][:300]
            raise BitfoldError(f"the aarch64 build failed under qemu (exit {r.returncode}): {tail}")
        return np.load(Path(td) / "y.npy"), r.stdout.strip().splitlines()[-1]
