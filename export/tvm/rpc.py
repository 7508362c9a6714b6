"""On-device latency over TVM RPC (tracker + server), for boards reachable on the network.

``measure_rpc(build_dir, "HOST:PORT", key)`` asks the tracker for a device with ``key``, uploads
the build's ``model.so``, runs it through the Relax VM on the remote CPU and times it with
``time_evaluator``. A device that is absent or drops mid-run is retried ``retries`` times and then
reported as an error - never recorded as a number. ``rpc_server_command`` is what
``bitfold rpc-server`` runs on the board (bound to 127.0.0.1 unless told otherwise).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from bitfold.core.errors import BitfoldError

from bitfold.export.tvm.backend import import_tvm, load_build_meta, time_build


def parse_address(tracker: str):
    host, _, port = tracker.rpartition(":")
    if not host or not port.isdigit():
        raise BitfoldError(f"--tracker {tracker!r} must be HOST:PORT", "e.g. --tracker 127.0.0.1:9190")
    return host, int(port)


def free_devices(tracker: str, key: str) -> int:
    import socket

    from tvm import rpc
    host, port = parse_address(tracker)
    try:  # a plain connect first: TVM's own client retries for a minute before giving up
        socket.create_connection((host, port), timeout=3).close()
    except OSError as e:
        raise BitfoldError(f"cannot reach the TVM RPC tracker at {tracker} ({e.strerror or e})",
                           "start it: python -m tvm.exec.rpc_tracker --host 127.0.0.1 --port 9190") from e
    try:
        summary = rpc.connect_tracker(host, port).summary()
    except Exception as e:  # noqa: BLE001 - connection refused, timeouts, protocol errors
        raise BitfoldError(f"cannot reach the TVM RPC tracker at {tracker} ({type(e).__name__}: {e})",
                           "start it: python -m tvm.exec.rpc_tracker --host 127.0.0.1 --port 9190") from e
    q = summary.get("queue_info", {}).get(key, {})
    return int(q.get("free", 0))


def measure_rpc(build_dir, tracker: str, key: str, number: int = 20, repeat: int = 7, retries: int = 3,
                wait_s: float = 2.0, session_timeout: int = 120, layers: bool = True) -> dict:
    tvm = import_tvm()
    from tvm import relax, rpc
    build_dir = Path(build_dir)
    meta = load_build_meta(build_dir)
    host, port = parse_address(tracker)
    last = None
    for attempt in range(1, retries + 1):
        if free_devices(tracker, key) == 0:
            last = f"no free device with key {key!r} on the tracker"
            time.sleep(wait_s)
            continue
        try:
            remote = rpc.connect_tracker(host, port).request(key, priority=1, session_timeout=session_timeout)
            remote.upload(str(build_dir / "model.so"))
            dev = remote.cpu()
            vm = relax.VirtualMachine(remote.load_module("model.so"), dev)
            out = time_build(vm, dev, meta, number, repeat, layers)
            out.update({"tracker": tracker, "key": key, "attempt": attempt})
            return out
        except Exception as e:  # noqa: BLE001 - a device that drops mid-run raises many kinds of errors
            last = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            time.sleep(wait_s)
    raise BitfoldError(f"measuring on {key!r} via {tracker} failed after {retries} attempts ({last}); nothing recorded",
                       f"check the board: bitfold rpc-server --key {key} --tracker {tracker}")


def rpc_server_command(key: str, tracker: str, host: str = "127.0.0.1", port: int = 9200) -> list[str]:
    return [sys.executable, "-m", "tvm.exec.rpc_server", "--host", host, "--port", str(port),
            "--port-end", str(port + 10), "--tracker", tracker, "--key", key]
