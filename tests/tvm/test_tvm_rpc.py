"""TVM RPC on loopback: a tracker, a server standing in for the board, a real `bitfold measure`."""
import os
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("tvm", reason="apache-tvm is not installed")
pytest.importorskip("tornado", reason="the TVM RPC tracker needs tornado")

from bitfold.cli import main  # noqa: E402
from bitfold.export.tvm.rpc import free_devices, measure_rpc, rpc_server_command  # noqa: E402
from bitfold.hw_models.store import MeasurementStore  # noqa: E402
from bitfold.core.errors import BitfoldError  # noqa: E402


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tracker():
    port = _port()
    p = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port),
                          "--port-end", str(port + 1)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    addr = f"127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            free_devices(addr, "x")
            break
        except BitfoldError:
            time.sleep(0.3)
    yield addr
    p.kill()


@pytest.fixture(scope="module")
def host_build(trained_run, tmp_path_factory):
    from bitfold.export.backends import build
    from bitfold.export.onnx_export import export_run
    d = tmp_path_factory.mktemp("rpc")
    export_run(trained_run[0], "qcdq", d / "m.onnx")
    build(d / "m.onnx", "host-cpu", d / "b")
    return d / "b"


def test_measure_over_a_loopback_tracker_records_rows(tracker, host_build, tmp_path, capsys):
    server = subprocess.Popen(rpc_server_command("loopback", tracker, port=_port()), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "TVM_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 60
        while free_devices(tracker, "loopback") == 0 and time.time() < deadline:
            time.sleep(0.3)
        with pytest.raises(SystemExit) as e:
            main(["measure", str(host_build), "--board", "host-cpu", "--tracker", tracker, "--key", "loopback",
                  "--repeat", "3", "--db", str(tmp_path / "m.sqlite")])
            raise SystemExit(0)
        assert e.value.code == 0, capsys.readouterr().err
        # per-layer rows for a cost table, timed on the "board" behind the tracker
        from bitfold.boards import load_board
        from bitfold.export.tvm.probe import measure
        layer_rows = measure(load_board("host-cpu"), {"conv": [], "linear": [(32, 16)], "bits": [2, 8]},
                             number=3, repeat=3, tracker=tracker, key="loopback")
    finally:
        server.kill()
    all_rows = MeasurementStore(tmp_path / "m.sqlite").query("host-cpu", "latency")
    rows = [r for r in all_rows if r.kind == "model"]
    assert len(rows) == 1 and rows[0].value > 0 and rows[0].device_id == "loopback"
    assert rows[0].extra["p10"] <= rows[0].value <= rows[0].extra["p90"]
    # ... and one row per kernel of the build, the conv/matmul ones naming their ONNX layer and arithmetic
    import json
    kernels = json.loads((host_build / "build.json").read_text())["kernels"]
    krows = sorted((r for r in all_rows if r.kind == "kernel"), key=lambda r: r.extra["index"])
    assert [r.extra["kernel"] for r in krows] == [k["kernel"] for k in kernels]
    assert all(r.value > 0 and r.device_id == "loopback" for r in krows)
    named = [r.extra for r in krows if "layer" in r.extra]
    assert [e["layer"] for e in named] == ["/convs.0/Conv", "/convs.1/Conv", "/convs.2/Conv", "/head/Gemm"]
    assert {e["arith"] for e in named} == {"int"}
    assert "per kernel" in capsys.readouterr().out
    assert len(layer_rows) == 4 and {r.device_id for r in layer_rows} == {f"loopback@{tracker}"}
    for r in layer_rows:
        assert r.value > 0 and r.extra["via"] == "rpc" and r.extra["repeat"] == 3 and r.extra["std"] >= 0
        assert r.extra["p10"] <= r.value <= r.extra["p90"] and r.source == "measured"


def test_remote_board_without_tracker_is_refused():
    from bitfold.boards import load_board
    from bitfold.export.tvm.probe import measure
    with pytest.raises(BitfoldError, match="TVM RPC tracker"):
        measure(load_board("rpi4"))


def test_absent_device_is_retried_then_reported_not_recorded(tracker, host_build, tmp_path):
    with pytest.raises(BitfoldError, match="failed after 2 attempts.*nothing recorded"):
        measure_rpc(host_build, tracker, "no-such-board", retries=2, wait_s=0.1)


def test_unreachable_tracker():
    with pytest.raises(BitfoldError, match="cannot reach the TVM RPC tracker"):
        free_devices(f"127.0.0.1:{_port()}", "x")


def test_device_dropping_mid_measurement_is_retried_then_reported_not_recorded(tracker, host_build):
    """The board (its RPC server and workers) dies while time_evaluator runs: bounded retries, then one
    clear error; no number comes back."""
    import signal
    import threading
    server = subprocess.Popen(rpc_server_command("dropper", tracker, port=_port()), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "TVM_NUM_THREADS": "1"},
                              start_new_session=True)
    out = {}
    try:
        deadline = time.time() + 60
        while free_devices(tracker, "dropper") == 0 and time.time() < deadline:
            time.sleep(0.3)

        def run():
            try:
                out["result"] = measure_rpc(host_build, tracker, "dropper", number=20000, repeat=20, retries=2,
                                            wait_s=0.2, session_timeout=60)
            except BitfoldError as e:
                out["error"] = e
        t = threading.Thread(target=run)
        t.start()
        while free_devices(tracker, "dropper") != 0 and t.is_alive():   # wait until the session holds the device
            time.sleep(0.05)
        time.sleep(1.0)
        os.killpg(server.pid, signal.SIGKILL)
        t.join(180)
        assert not t.is_alive()
    finally:
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert "result" not in out
    assert "failed after 2 attempts" in str(out["error"]) and "nothing recorded" in str(out["error"])


def test_tuning_over_the_tracker_times_candidates_on_the_device(tracker, tmp_path):
    """--tune-trials with --tracker: MetaSchedule's candidates run on the board behind the tracker (here an
    x86 server on loopback standing in for it); the records land in the board's database."""
    pytest.importorskip("xgboost", reason="MetaSchedule's cost model needs xgboost (pip install xgboost-cpu)")
    import json

    from test_tvm_backend import _one_gemm_qcdq

    from bitfold.export.backends import build
    server = subprocess.Popen(rpc_server_command("tuner", tracker, port=_port()), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "TVM_NUM_THREADS": "1"},
                              start_new_session=True)
    try:
        deadline = time.time() + 60
        while free_devices(tracker, "tuner") == 0 and time.time() < deadline:
            time.sleep(0.3)
        onnx_path = _one_gemm_qcdq(tmp_path / "fc.onnx")
        r = build(onnx_path, "host-cpu", tmp_path / "b", tune_trials=3, tracker=tracker, key="tuner", retune=True)
    finally:
        import signal
        os.killpg(server.pid, signal.SIGKILL)
    t = json.loads((tmp_path / "b" / "build.json").read_text())["tuning"]
    assert r.verified and t["tuned_now"] == 1 and t["trials"] > 0 and t["kernels_scheduled"] == 1
