"""`pip install .` builds one `bitfold` namespace: no stray top-level modules, boards shipped."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())


def test_wheel_holds_one_bitfold_namespace_with_board_files(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("bitfold-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"bitfold", wheel.name.split("-py3")[0] + ".dist-info"}, tops
    for sub in ("core", "app", "cli", "toolchain", "export", "export/tvm", "export/open_fpga", "export/finn",
                "hw_models", "boards"):
        assert f"bitfold/{sub}/__init__.py" in names
    assert "bitfold/boards/pynq-z2.toml" in names and "bitfold/cli/__main__.py" in names
    assert "bitfold/export/open_fpga/rtl/bf_mvau.v" in names and "bitfold/hw_models/tables/ulx3s-85f.json" in names
    # the fast-QAT sources compiled on first use (the C++ nodes include the C passes)
    assert "bitfold/toolchain/qkernels.c" in names and "bitfold/toolchain/qautograd.cpp" in names
    entry = zipfile.ZipFile(wheel).read(wheel.name.split("-py3")[0] + ".dist-info/entry_points.txt").decode()
    assert "bitfold = bitfold.cli:main" in entry
    assert "[bitfold.backends]" in entry and "open-fpga = bitfold.export.open_fpga:OpenFPGABackend" in entry
