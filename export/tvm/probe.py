"""Measurement driver: per-layer latency on a CPU board, compiled and timed by TVM.

For each (layer kind, shape, b_w, b_a) of a grid, a one-layer bitfold model (input quantizer +
Conv/Linear) is exported to QCDQ (verified like every export), compiled with the TVM backend for
the board's target, and timed with TVM's ``time_evaluator``; median / p10 / p90 go into the
measurement store as ``latency`` rows (seconds) with tool and device provenance.

The host is timed locally (``host-cpu``); a remote board is timed through a TVM RPC tracker
(``bitfold calibrate --board rpi4 --tracker host:port``), the one-layer libraries cross-compiled
for its triple.
"""
from __future__ import annotations

import json
import platform
import shutil
import tempfile
from pathlib import Path

import torch

from bitfold.core.events import events_of
from bitfold.core.errors import BitfoldError

from bitfold.hw_models.store import Measurement
from bitfold.toolchain.probe_models import one_layer_model

QUICK_GRID = {"conv": [(8, 8, 8), (16, 16, 8)], "linear": [(64, 32), (256, 64)], "bits": [2, 8]}
FULL_GRID = {"conv": [(16, 16, 8), (32, 32, 8), (16, 32, 16)], "linear": [(64, 64), (256, 128), (512, 256)],
             "bits": [2, 4, 8]}


def device_id() -> str:
    import os
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}|{cpu or platform.processor()}|{os.cpu_count()} cpus"


def measure(board, grid=QUICK_GRID, number: int = 20, repeat: int = 5, events=None,
            tracker: str | None = None, key: str | None = None) -> list[Measurement]:
    """Time every (kind, shape, b_w, b_a) of ``grid`` on ``board``: on this host, or on the board
    behind a TVM RPC tracker (``tracker="host:port"``, ``key`` default: the board file's rpc_key).
    Each one-layer model is built by the TVM backend (cross-compiled and checked against
    onnxruntime on the host) before it is timed."""
    import bitfold.export.tvm.backend as tvm_backend
    from bitfold.export.onnx_export import export_model
    from bitfold.export.tvm.rpc import measure_rpc
    if tracker is None and not tvm_backend.is_host(board):
        raise BitfoldError(f"measuring {board.name} needs the board itself, reached through a TVM RPC tracker",
                           f"start `bitfold rpc-server --key {getattr(board, 'rpc_key', '') or board.name} --tracker HOST:PORT` "
                           f"on the board, then pass --tracker HOST:PORT")
    key = key or getattr(board, "rpc_key", None) or board.name
    where = f"{key}@{tracker}" if tracker else device_id()
    rows = []
    jobs = [(k, s, w, a) for k in ("conv", "linear") for s in grid[k] for w in grid["bits"] for a in grid["bits"]]
    with tempfile.TemporaryDirectory() as td:
        for n, (kind, shape, b_w, b_a) in enumerate(jobs):
            # a hidden layer's input (unsigned codes after a ReLU): what most layers of a network read, and
            # what the bit-serial kernels take (the build times them against int8 and keeps the faster)
            model, in_shape = one_layer_model(kind, shape, b_w, b_a, unsigned_input=True)
            path = Path(td) / f"l{n}.onnx"
            # TVM is the consumer: its integer kernels accumulate in int32, W8/A8 probes are what it runs
            export_model(model, "qcdq", path, torch.randn(16, *in_shape), allow_saturation=True)
            bdir = Path(td) / f"b{n}"
            tvm_backend.build(path, board, bdir, samples=4)
            t = (measure_rpc(bdir, tracker, key, number, repeat) if tracker
                 else tvm_backend.measure_local(bdir, number, repeat))
            if kind == "conv":
                d = dict(macs=shape[0] * 9 * shape[1] * shape[2] ** 2, weights=shape[0] * 9 * shape[1],
                         in_features=shape[0], out_features=shape[1], kernel=3, spatial=shape[2])
            else:
                d = dict(macs=shape[0] * shape[1], weights=shape[0] * shape[1], in_features=shape[0],
                         out_features=shape[1])
            meta = json.loads((bdir / "build.json").read_text())
            rows.append(Measurement(board=board.name, kind=kind, b_w=b_w, b_a=b_a, metric="latency",
                                    value=t["median"], unit="s", source="measured", tool="tvm",
                                    tool_version=t["tvm"], device_id=where,
                                    extra={"p10": t["p10"], "p90": t["p90"], "std": t["std"], "number": number,
                                           "repeat": repeat, "target": meta["target"], "via": "rpc" if tracker else "local",
                                           "executor": "relax VM, integer kernels",
                                           "kernel": meta["layers"][0].get("kernel")},
                                    **d))
            shutil.rmtree(bdir)
            events_of(events).progress(n + 1, len(jobs))
    return rows
