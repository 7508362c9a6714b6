import hashlib
import shutil
import os
import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one of N pytest-xdist workers (the suite runs with -n logical): each gets its share of the
    # cores, so that N workers with torch's OpenMP pools do not oversubscribe the machine
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // max(1, _workers)))
else:
    os.environ.setdefault("OMP_NUM_THREADS", "2")
# hermetic: measurement databases and fitted tables of this test session live in a temp dir
import tempfile  # noqa: E402

os.environ["BITFOLD_HOME"] = tempfile.mkdtemp(prefix="bitfold-home-")


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A short digits CNN run (mixed bits incl. 2-bit), shared by export and CLI tests."""
    from bitfold.toolchain.runs import TrainConfig
    from bitfold.toolchain.train import train
    out = tmp_path_factory.mktemp("runs") / "cnn_mixed"
    bits = {"convs.0": {"w": 7, "a": 8}, "convs.1": {"w": 2, "a": 4}, "convs.2": {"w": 3, "a": 2},
            "head": {"w": 5, "a": 6}}
    metrics = train(TrainConfig(model="cnn", bits=bits, epochs=3), out, progress=False)
    return out, metrics


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


#: area markers: the folder a test lives in, and for tests elsewhere the tools their body names
AREA_BY_DIR = {"fpga": "fpga", "tvm": "tvm", "finn": "finn"}
TOOL_WORDS = {"fpga": ("ulx3s", "icebreaker", "open_fpga", "yowasp", "verilator", "run-fpga"),
              "tvm": ("host-cpu", "rpi4", "tvm", "qemu"),
              "finn": ("pynq-z2", "zcu104", "ultra96", "finn")}
#: tests that take minutes on 2 cores (measured with --durations); still run in CI
SLOW = {"test_every_case_verifies_or_is_refused", "test_kill_during_training_then_resume_equals_uninterrupted",
        "test_kill_during_fpga_build_then_the_loop_resumes", "test_kill_during_export_never_leaves_a_partial_file",
        "test_fewshot_adapts_to_unseen_classes_at_every_width", "test_selection_respects_the_budget_and_exports_at_it",
        "test_board_budget_needs_its_table_and_fixed_runs_cannot_switch", "test_user_models_train_export_verify",
        "test_demo_end_to_end", "test_torchrun_ddp_two_processes", "test_wheel_holds_one_bitfold_namespace_with_board_files"}


#: pytest-xdist (--dist loadfile): each test file runs on one worker, so its module fixtures are
#: built once. The longest files first (measured with --durations under -n 2), so that no worker is
#: left alone with a long file at the end; the rest keep collection order. (Not --dist loadgroup with
#: xdist_group marks: under pytest 9.2 xdist 3.8 cannot add the group to a test's node id, so every
#: test became a unit of its own and the open-flow builds fixture ran on both workers.)
XDIST_FIRST = ("tests/fpga/test_open_fpga.py", "tests/finn/test_finn_backend.py", "tests/tvm/test_tvm_backend.py",
               "tests/export/test_fuzz_export.py", "tests/fpga/test_demo.py", "tests/tvm/test_bitserial.py",
               "tests/export/test_faults.py", "tests/fpga/test_rtl_units.py", "tests/methods/test_byom.py",
               "tests/fpga/test_loop_fpga.py")


REPO = Path(__file__).resolve().parent.parent


def _test_file(item) -> str:
    path = Path(str(item.fspath)).resolve()
    return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else path.as_posix()


def pytest_collection_modifyitems(config, items):
    import inspect
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {f: i for i, f in enumerate(XDIST_FIRST)}
        items.sort(key=lambda it: rank.get(_test_file(it), len(rank)))   # stable: the rest keep their order
    for item in items:
        area = AREA_BY_DIR.get(Path(str(item.fspath)).parent.name)
        marks = {area} if area else set()
        if not area:
            try:
                src = inspect.getsource(item.function).lower()
            except (OSError, TypeError):
                src = ""
            src += " " + item.name.lower()
            marks |= {m for m, words in TOOL_WORDS.items() if any(w in src for w in words)}
        if not marks:
            marks = {"unit"}
        if item.originalname in SLOW:
            marks.add("slow")
        for m in marks:
            item.add_marker(m)


#: tools .ci/run installs (system packages) or the test extra brings (Python packages): under
#: CI=true a skip that names one of them is a failure - CI must not be green with a feature off
CI_PROVIDED = ("apache-tvm", "tvm", "tornado", "xgboost", "yowasp", "verilator", "aarch64", "qemu", "arm64",
               "finn", "dataset-fashion-mnist", "openvino", "distributed", "hls4ml")


def _ci_strict() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _provided(reason: str) -> bool:
    r = reason.lower()
    return any(w in r for w in CI_PROVIDED)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if _ci_strict() and rep.skipped and not hasattr(rep, "wasxfail"):
        reason = str(rep.longrepr[2]) if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        if _provided(reason):
            rep.outcome = "failed"
            rep.longrepr = f"CI=true: skipped for a tool that .ci/run provides: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    rep = outcome.get_result()
    if _ci_strict() and rep.skipped:
        reason = str(rep.longrepr[2]) if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        if _provided(reason):
            rep.outcome = "failed"
            rep.longrepr = f"CI=true: module skipped for a tool that .ci/run provides: {reason}"
