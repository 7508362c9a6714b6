"""Fixtures shared by the TVM tests."""
import shutil

import pytest


@pytest.fixture(scope="session")
def arm64_sysroot():
    import subprocess
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64-linux-gnu-g++ is not installed (Debian: g++-aarch64-linux-gnu)")
    if shutil.which("qemu-aarch64-static") is None:
        pytest.skip("qemu-aarch64-static is not installed (Debian: qemu-user-static)")
    archs = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True, text=True).stdout.split()
    if "arm64" not in archs:
        pytest.skip("the arm64 apt architecture is not enabled (dpkg --add-architecture arm64 && apt-get update)")
    from bitfold.export.tvm.qemu import setup
    return setup()
