"""The open flow's hardware rules, in one place for the backend (which plans and builds) and the
cost model (which prices what the backend would build): block-RAM shapes and yosys's ROM placement,
the stage schedule (cycles per frame), the planning estimates, and the folding planner.

Stages are the open backend's lowered layers (``bitfold.export.lower``); this module reads their
fields only (``ic``, ``oc``, ``k``, ``mw``, ``wbits``, ``ibits``, ``acc_bits``, ``thresholds`` of a
matrix-vector stage; ``ch``, ``bits`` of a pooling stage), so it needs no import of the backend.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

#: fraction of the board's LUTs the automatic folding may plan for (the estimate is rough; the
#: real count comes from synthesis)
LUT_FRACTION = 0.6


def is_pool(s) -> bool:
    """A pooling stage (no output channels of its own)."""
    return not hasattr(s, "oc")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def simd_choices(s) -> list[int]:
    """The SIMD values (lanes per PE) an MVAU stage can take, ascending: the divisors of its input
    channels, then - for a K x K window - whole window rows (K * IC: K buffer copies read at K taps
    a cycle) and the whole window (K * K * IC); the RTL's ``TAPS`` = SIMD / IC there. A layer with
    one input channel (a first convolution) would otherwise stop at one lane per PE."""
    out = divisors(s.ic)
    return out + [s.ic * s.k, s.ic * s.k * s.k] if s.k > 1 else out


def in_simd(s, simd: int) -> int:
    """Input elements per beat of an MVAU stage at lanes ``simd`` (window taps share one beat)."""
    return min(simd, s.ic)


def taps(s, simd: int) -> int:
    """Window taps an MVAU stage reads a cycle at lanes ``simd`` (the RTL's TAPS: 1, K or K*K)."""
    return max(1, simd // s.ic)


def stage_cycles(s, pe: int = 1, simd: int = 1) -> int:
    """Cycles per frame of a stage in steady state, from the RTL's schedule: an MVAU loads one bank
    of its input buffer (up to IC elements a beat) while it computes on the other (one weight word
    per cycle, OH*OW*NF*SF), so the slower of the two; a pool stage takes one beat of ``pe``
    channels a cycle (``pe``: the lanes of the stream it sits on, the PE of the stage before it)."""
    if is_pool(s):
        return s.ih * s.iw * s.ch // pe
    sf = s.k * s.k * s.ic // simd
    nf = s.oc // pe
    return max(s.ih * s.iw * s.ic // in_simd(s, simd), s.oh * s.ow * nf * sf)


def pool_feeders(im) -> dict:
    """Pooling stage name -> the MVAU stage before it (None for a pool at the input): its PE sets
    how many channels a beat the pool takes."""
    feeders, prev = {}, None
    for st in im.stages:
        if is_pool(st):
            feeders[st.name] = prev
        else:
            prev = st
    return feeders


def pool_lanes(im, of) -> dict:
    """Channels per beat of each pooling stage: the stream it sits on (the PE of the MVAU before
    it, when that divides its channels; else 1). ``of(name) -> (pe, simd)``."""
    lanes, n = {}, 1
    for st in im.stages:
        if is_pool(st):
            n = n if st.ch % n == 0 else 1
            lanes[st.name] = n
        else:
            n = of(st.name)[0]
    return lanes


def input_cycles(im) -> int:
    """Cycles per frame of the design's input stream (one element a cycle): nothing goes faster."""
    return int(math.prod(im.input.shape))


def stages_cycles(im, of) -> dict:
    """Stage name -> cycles per frame under the folding ``of(name) -> (pe, simd)``."""
    lanes = pool_lanes(im, of)
    return {st.name: stage_cycles(st, lanes[st.name]) if is_pool(st) else stage_cycles(st, *of(st.name))
            for st in im.stages}


def frame_cycles(im, of) -> int:
    """Cycles per frame of a whole design in steady state (layers overlap, so the slowest part
    decides): every stage, the input stream (one element a cycle) and the output stream."""
    last = im.stages[-1]
    n_out = last.oh * last.ow * (last.ch if is_pool(last) else last.oc)
    return max([*stages_cycles(im, of).values(), input_cycles(im), n_out])


#: up to this many thresholds per channel (outputs of up to 2 bits) the RTL compares them all at
#: once (one ROM word per channel group); above it a pipelined binary search, one level per output
#: bit, each level a memory of its own per lane (bf_mvau.v). Measured with yosys (one-layer blocks,
#: PE 1): at 4-bit outputs the search takes 11-13 % fewer LUT4 where the accumulator is wide (W4A4:
#: 64x64 on the ECP5 8,973 -> 7,831, 64x32 on the iCE40 3,965 -> 3,514; +2 block RAMs) and the same
#: (+-4 %) at W2A2; at 2-bit outputs both are equal. At 3-bit outputs the parallel word (7 thresholds
#: x the accumulator) stayed a ROM in logic: the digits MLP W3A3 (SIMD 8) took 3,266 LUT4 on the
#: iCE40 with it and 2,215 with the search (17 -> 23 block RAMs, Fmax 43.96 -> 46.17 MHz), 2,079 ->
#: 1,813 LUT4 on the ECP5 (5 -> 6 block RAMs, 104.2 -> 121.9 MHz), so 3-bit outputs search too.
PARALLEL_THRESHOLDS = 3


def search_levels(s, parallel: bool = False) -> int:
    """Levels of the threshold binary search of an MVAU stage (0: parallel compare or no thresholds);
    ``parallel``: the stage's folding asks for the parallel compare whatever its thresholds
    (:meth:`Folding.parallel`: the search's level memories did not fit the board's block RAM)."""
    nt = 0 if s.thresholds is None else s.thresholds.shape[1]
    return s.obits if nt > PARALLEL_THRESHOLDS and not parallel else 0


def estimate_luts(s, pe: int = 1, simd: int = 1, dsp: bool = False, parallel: bool = False) -> int:
    """Rough LUT4 estimate of one stage (a planning model; synthesis gives the real figure).

    Multipliers ~ W*A LUTs per lane (none when they are in DSP blocks: ``dsp``), adder tree and
    accumulator ~ ACC bits per lane/channel, comparators ~ ACC/2 per parallel threshold or ~ ACC per
    search level (its comparison and address), plus control; the 1.6 factor was fitted to yosys
    synth_ice40 runs of the digits MLP and CNN (estimates were 1.6-1.7x low without it)."""
    if is_pool(s):
        return 200 + 6 * s.bits
    acc = s.acc_bits
    nt = 0 if s.thresholds is None else s.thresholds.shape[1]
    mult = 0 if dsp else pe * simd * max(1, s.wbits * s.ibits)
    add = pe * (simd + 1) * acc
    levels = search_levels(s, parallel)
    thr = pe * levels * acc if levels else pe * nt * acc // 2
    return int(1.6 * (300 + mult + add + thr))


#: block RAM shapes (width, depth) yosys can use: iCE40 SB_RAM40_4K, ECP5 DP16KD
BRAM_SHAPES = {"ice40": [(16, 256), (8, 512), (4, 1024), (2, 2048)],
                "ecp5": [(36, 512), (18, 1024), (9, 2048), (4, 4096), (2, 8192), (1, 16384)]}


def buffer_brams(width: int, depth: int, family: str) -> int:
    """Block RAMs of a read/write buffer: the iCE40 build asks yosys for block RAM (no LUT RAM);
    on the ECP5 small memories stay in LUT RAM."""
    if family != "ice40" and width * depth <= 1024:
        return 0
    return min(math.ceil(width / w) * math.ceil(depth / d) for w, d in BRAM_SHAPES[family])


#: yosys memory_libmap's costs: a block RAM (brams_16kd.txt / ice40 brams.txt) against 1/16 per
#: ROM bit in soft logic (its default -logic-cost-rom)
BRAM_COST = {"ecp5": 128, "ice40": 64}


def rom_brams(width: int, depth: int, family: str) -> int:
    """Block RAMs yosys gives a registered-read ROM of depth x width bits: it takes block RAM only
    where that costs less than the ROM in logic (ties stay in logic), so a weight or threshold ROM
    moves to block RAM at a width that depends on the shape (measured on the ECP5: predicts the
    block-RAM count of 150 of 158 synthesized blocks exactly)."""
    n = min(math.ceil(width / w) * math.ceil(depth / d) for w, d in BRAM_SHAPES[family])
    return n if BRAM_COST[family] * n < depth * width / 16 else 0


def estimate_brams(s, pe: int = 1, simd: int = 1, family: str = "ice40", parallel: bool = False) -> int:
    """Block RAMs of one stage: weight and threshold ROMs (as yosys places them) and input buffer."""
    if is_pool(s):        # one row of running maxima (OW x CH codes)
        return buffer_brams(s.bits, s.ow * s.ch, family) if family == "ice40" else 0
    w = rom_brams(pe * simd * s.wbits, (s.oc // pe) * (s.mw // simd), family)
    levels = search_levels(s, parallel)
    if levels:                     # per lane, level l holds 2^l thresholds per channel group
        w += pe * sum(rom_brams(s.acc_bits, (s.oc // pe) << level, family) for level in range(levels))
    elif s.thresholds is not None:
        w += rom_brams(pe * s.thresholds.shape[1] * s.acc_bits, s.oc // pe, family)
    n = in_simd(s, simd)     # two banks, one copy per window tap read a cycle
    return w + taps(s, simd) * buffer_brams(n * s.ibits, 2 * s.ih * s.iw * s.ic // n, family)


def bram_budget(board) -> int:
    r = board.resources
    return int(r.get("bram4", r.get("bram18", 0)))


#: families whose lane multipliers the open flow can put into DSP blocks (ECP5: one MULT18X18D per
#: lane - the products are at most 8 x 9 bits; the iCE40 UP5K's eight SB_MAC16 are not used)
DSP_FAMILIES = ("ecp5",)
#: below this product width (storage b_w x b_a) a lane's multiplier is a few LUTs: not worth a DSP
#: block. Measured (yosys synth_ecp5, a 64x16 layer, PE 4 x SIMD 16 = 64 lanes, with and without
#: -nodsp): a DSP per lane saves 8 LUT4 at W2A2, 71 at W4A4, 262 at W8A8
DSP_MIN_PRODUCT = 4


def dsp_budget(board) -> int:
    """DSP blocks the open flow may use on ``board`` (0 where it does not use them)."""
    return int(board.resources.get("dsp", 0)) if board.family in DSP_FAMILIES else 0


def assign_dsps(im, of, budget: int) -> set:
    """The MVAU stages whose multipliers go to DSP blocks (one per lane, PE x SIMD a stage), within
    ``budget`` blocks: the widest products first (a DSP saves the most LUTs there), a whole stage
    or none of it, stages below ``DSP_MIN_PRODUCT`` never."""
    left, chosen = budget, set()
    for s in sorted(im.mvaus, key=lambda s: -s.wbits * s.ibits):
        pe, simd = of(s.name)
        if s.wbits * s.ibits >= DSP_MIN_PRODUCT and pe * simd <= left:
            chosen.add(s.name)
            left -= pe * simd
    return chosen


@dataclass
class Folding:
    # name -> {"pe": .., "simd": .., "dsp": true, "parallel": true (both optional)}
    layers: dict = field(default_factory=dict)

    def of(self, name):
        f = self.layers.get(name, {"pe": 1, "simd": 1})
        return int(f["pe"]), int(f["simd"])

    def uses_dsp(self, name) -> bool:
        """The stage's lane multipliers are DSP blocks (else LUTs)."""
        return bool(self.layers.get(name, {}).get("dsp", False))

    def parallel(self, name) -> bool:
        """The stage compares all its thresholds at once even where the rule (``PARALLEL_THRESHOLDS``)
        would search them: no block RAM for the search's level memories."""
        return bool(self.layers.get(name, {}).get("parallel", False))

    def _with(self, key: str, chosen: set) -> "Folding":
        return Folding({k: {**{f: x for f, x in v.items() if f != key}, **({key: True} if k in chosen else {})}
                        for k, v in self.layers.items()})

    def with_dsps(self, im, board) -> "Folding":
        """This folding with the board's DSP blocks given to the stages where they save the most
        (:func:`assign_dsps`); the rest keep LUT multipliers."""
        return self._with("dsp", assign_dsps(im, self.of, dsp_budget(board)))

    def with_parallel(self, chosen: set) -> "Folding":
        """This folding with the stages in ``chosen`` on the parallel threshold compare."""
        return self._with("parallel", chosen)

    def brams(self, im, family: str) -> int:
        """Estimated block RAMs of the whole design under this folding (:func:`estimate_brams`)."""
        return sum(estimate_brams(st, family=family) if is_pool(st)
                   else estimate_brams(st, *self.of(st.name), family, self.parallel(st.name)) for st in im.stages)

    def within_brams(self, im, family: str, budget: int) -> "Folding":
        """This folding, or - where its threshold searches take more block RAM than ``budget`` - with
        stages moved to the parallel compare (logic instead of level memories) until the estimate
        fits or none is left: the fewest thresholds first (the cheapest compare in logic), then
        the most block RAM saved."""
        if self.brams(im, family) <= budget:
            return self
        plan, cands = self, []
        for st in im.mvaus:
            pe, simd = self.of(st.name)
            save = estimate_brams(st, pe, simd, family) - estimate_brams(st, pe, simd, family, parallel=True)
            if search_levels(st) and save > 0:
                cands.append((st.thresholds.shape[1], -save, st.name))
        chosen = set()
        for _, _, name in sorted(cands):
            chosen.add(name)
            plan = self.with_parallel(chosen)
            if plan.brams(im, family) <= budget:
                break
        return plan

    def as_dict(self):
        return {k: dict(v) for k, v in self.layers.items()}


#: target cycles per output vector of a layer: folding PE*SIMD ~ MACs / CYCLES
CYCLES = 64


def folding_for(n_in: int, n_out: int, simd_of: int | None = None) -> tuple[int, int]:
    """(PE, SIMD) with PE*SIMD close to n_in*n_out/CYCLES, SIMD first (as the backend's planner);
    SIMD divides ``simd_of`` (a conv's input channels; default n_in)."""
    want = max(1, (n_in * n_out) // CYCLES)
    simd = max(d for d in divisors(simd_of or n_in) if d <= want)
    pe = max(d for d in divisors(n_out) if d <= max(1, want // simd))
    return pe, simd


def fold_order(s) -> list[tuple[int, int]]:
    """The foldings (PE, SIMD) of an MVAU stage in the order the planners widen it, lanes growing
    and cycles per frame falling: SIMD over the divisors of the input channels (one input beat,
    one adder tree), then PE over the divisors of the output channels, then window taps (SIMD
    K * IC, K * K * IC: buffer copies, :func:`simd_choices`) at full PE."""
    first = [(1, d) for d in divisors(s.ic)]
    more = [(pe, s.ic) for pe in divisors(s.oc)[1:]]
    return first + more + [(s.oc, d) for d in simd_choices(s) if d > s.ic]


def fold_at_rate(s, cycles_budget: float) -> tuple[int, int]:
    """The smallest folding (PE, SIMD) of an MVAU stage whose cycles per frame
    (:func:`stage_cycles`) fit ``cycles_budget``, in :func:`fold_order`. When even the full unroll
    misses the budget, the full unroll (the fastest this stage can go)."""
    order = fold_order(s)
    return next((f for f in order if stage_cycles(s, *f) <= cycles_budget), order[-1])


def fold_for_cycles(im, budget: float) -> Folding:
    """The folding of a whole lowered model with every part within ``budget`` cycles per frame
    where it can be: each MVAU stage folded just enough (:func:`fold_at_rate`), and a slow pool
    stage given more channels a beat by the PE of the stage before it."""
    fold = {s.name: list(fold_at_rate(s, budget)) for s in im.mvaus}
    for pool, prev in pool_feeders(im).items():     # a pool runs at the lanes of the stage before it
        st = next(x for x in im.stages if x.name == pool)
        if prev is not None and stage_cycles(st, fold[prev.name][0]) > budget:
            ok = [d for d in divisors(prev.oc) if st.ch % d == 0 and stage_cycles(st, d) <= budget]
            if ok:
                fold[prev.name][0] = max(fold[prev.name][0], ok[0])
    return Folding({k: {"pe": v[0], "simd": v[1]} for k, v in fold.items()})


def rate_folding(im, clock_mhz: float, target_fps: float) -> Folding:
    """The folding of a whole lowered model that reaches ``target_fps`` at ``clock_mhz``
    (:func:`fold_for_cycles`). The cost tables price this folding when given a rate, and
    ``bitfold run --fps`` builds it, so prediction and build describe the same design."""
    return fold_for_cycles(im, max(clock_mhz * 1e6 / target_fps, input_cycles(im)))   # no lanes beyond the input


@dataclass(frozen=True)
class StageShape:
    """The shape fields of an MVAU stage, from a cost model's layer record (no lowering needed)."""
    name: str
    ih: int
    iw: int
    ic: int
    oc: int
    k: int
    oh: int
    ow: int

    @property
    def mw(self):
        return self.k * self.k * self.ic

    @classmethod
    def of_layer(cls, d) -> "StageShape":
        """From a :class:`bitfold.hw_models.layers.LayerDesc` (dense layers are 1x1 pixels)."""
        if d.kind == "conv":
            _, ih, iw = d.in_shape
            _, oh, ow = d.out_shape
            return cls(d.name, ih, iw, d.in_features // max(1, d.groups), d.out_features, d.kernel[0], oh, ow)
        return cls(d.name, 1, 1, d.in_features, d.out_features, 1, 1, 1)


def table_folding(im) -> Folding:
    """The folding the cost tables assume (PE*SIMD ~ MACs per output vector / ``CYCLES``), for a
    whole lowered model: builds made with it are the ones a table's prediction describes."""
    return Folding({s.name: dict(zip(("pe", "simd"), folding_for(s.k * s.k * s.ic, s.oc, s.ic))) for s in im.mvaus})


def choose_folding(im, board, lut_budget: int | None = None, target_fps: float | None = None,
                   default_fps: float | None = None, dsp: bool = False) -> Folding:
    """The folding for ``target_fps`` at the design clock (``board.design_mhz``), or - where that
    does not fit the budget (estimated LUTs within ``LUT_FRACTION`` of the board's, block RAMs
    within the board's) - for the fastest rate that does: the smallest cycles per frame whose
    just-enough folding (:func:`fold_for_cycles`, every stage folded only as far as that rate
    needs) fits, found by bisection over the cycle counts the stages can take. The default target
    is the rate the board's UART can feed (faster cores only wait on it); 0 = as fast as the
    budget allows (never past the input stream, one element a cycle). ``dsp``: the board's DSP
    blocks take the multipliers of the stages where they save the most (:func:`assign_dsps`), so
    those stages cost fewer LUTs."""
    budget = lut_budget if lut_budget is not None else int(board.resources.get("lut", 5000) * LUT_FRACTION)
    brams = bram_budget(board)
    dsps = dsp_budget(board) if dsp else 0

    def fits(plan: Folding) -> bool:
        on = assign_dsps(im, plan.of, dsps)
        luts = sum(estimate_luts(st) if is_pool(st) else estimate_luts(st, *plan.of(st.name), dsp=st.name in on,
                                                                     parallel=plan.parallel(st.name))
                   for st in im.stages)
        return luts <= budget and plan.brams(im, board.family) <= brams

    def at(cycles) -> Folding:
        return fold_for_cycles(im, cycles).within_brams(im, board.family, brams)

    if target_fps is None:
        target_fps = default_fps or 0
    floor = max(input_cycles(im), board.design_mhz * 1e6 / target_fps if target_fps else 0)
    # every cycle count a stage can take at or above the floor: the frame time is one of them
    steps = {stage_cycles(s, *f) for s in im.mvaus for f in fold_order(s)}
    steps |= {stage_cycles(st, d) for st in im.stages if is_pool(st) for d in divisors(st.ch)}
    cands = sorted({floor} | {c for c in steps if c > floor})
    lo, hi = 0, len(cands) - 1          # the slowest candidate folds every stage 1 x 1
    if fits(at(cands[0])):
        hi = 0
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(at(cands[mid])):
            hi = mid
        else:
            lo = mid + 1
    plan = at(cands[hi])
    return plan.with_dsps(im, board) if dsp else plan
