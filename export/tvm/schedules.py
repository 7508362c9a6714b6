"""Default CPU schedules for the kernels that no tuning record covers.

A kernel that TVM legalizes and MetaSchedule never touched compiles as the loop nest of its compute
definition: for a matmul ``out[i, j] = sum_k x[i, k] * w[k, j]`` the reduction ``k`` is the innermost
loop, so each output is a scalar dot product that LLVM cannot vectorize (measured on this project's
host: a 784x64 int8 matmul at batch 1 took 29 us untuned, 1.4 us with the loop order below).

:func:`apply_default` gives every unscheduled reduction block the order in which the innermost loop is
the innermost *spatial* axis of its output (a matmul's columns), with the reduction loops directly
outside it and the reduction's init split off. Consecutive iterations of that loop then write
consecutive outputs from consecutive inputs, which LLVM vectorizes for the target's vector width (AVX2/AVX-512 on x86, NEON on aarch64).
Nothing else changes: the same integer arithmetic per output, so the accumulators are exactly the
untuned kernel's. Kernels scheduled from a tuning database (``tirx.is_scheduled``) keep theirs.
Integer matmuls are reordered (measured gains). Integer NCHW convolutions - int8 and bit-serial - whose
output channels are a multiple of 8 are vectorized over the output channels instead
(:func:`_vectorize_output_channels`): the weights are laid out so that 8 or 16 consecutive output
channels are contiguous (an int8 kernel's repacked inside the kernel, a bit-serial kernel's filter
block written so), the accumulator is laid out the same way, and the innermost loop - one input value
(or input bit-plane word) against a vector of weights, added to a vector of accumulators - is
vectorized (a bit-serial one: AND and popcount per lane). The loop is marked vectorized before the
reduction's init is split off: marked after it, TVM refuses the update block (the int8 kernels had
relied on LLVM vectorizing that loop by itself, which it did: their times did not change when the
mark took). The same integer sums, so exact. Bit-serial convolutions measured 2-6x faster in this order
than with the output width innermost (W4A4 3x3, 16-32 channels; Fashion-MNIST CNN W4A4 whole model 0.14 ->
0.09 ms); they can still run width-innermost (the ``_xin`` kernel variant) or as computed (``_nat``),
and the per-layer choice times them.

Every unscheduled kernel also has its element-wise blocks inlined (:func:`_inline_elementwise`): the
requantize chain that Relax fuses behind a convolution (cast, scale, BatchNorm's subtract / divide /
multiply / add) otherwise makes one pass through memory per operation, and on the digits CNN took
longer than the bit-serial convolution in front of it (14 us of a 14.1 us kernel vs 4.5 us inlined;
whole model 77 -> 58 us int8, 35 -> 16 us bit-serial W2A2). Integer kernels stay exact; the float
chain may differ from the un-inlined one in the last bit (FMA), which the export gate allows.
"""
from __future__ import annotations


def _reorder_reduction(sch, block, any_rank: bool = False) -> bool:
    loops = sch.get_loops(block)
    iters = sch.get(block).iter_vars
    if len(loops) != len(iters) or not iters:
        return False
    kinds = [iv.iter_type for iv in iters]           # 0: data parallel, 2: reduction
    red = [lp for lp, k in zip(loops, kinds) if k == 2]
    spatial = [lp for lp, k in zip(loops, kinds) if k == 0]
    if not red or not spatial or len(red) + len(spatial) != len(loops):
        return False
    if len(spatial) != 2 and not any_rank:
        # matmuls only: on convolutions (NCHW) the output width is 4-28 lanes and this order measured
        # slower than the untuned nest (digits CNN, 3x3 convs at 8x8 / 4x4: 37 -> 43 us, 30 -> 50 us)
        return False
    if str(sch.get(block).body.buffer.dtype).startswith("float"):
        return False        # integer accumulators only: the result stays bit-identical
    inner = spatial[-1]
    sch.reorder(*spatial[:-1], *red, inner)
    sch.decompose_reduction(block, red[0])
    return True


def _vectorize_output_channels(sch, block) -> bool:
    """An integer NCHW convolution (loops n, f, y, x, then its reductions: c, ky, kx; a bit-serial one's
    c, ky, kx, weight bit, input bit) computed with the output channel as the innermost, vectorized
    loop: the weights are laid out as (f // L, ..., f % L) - an int8 kernel's parameter copied so in
    the kernel, a bit-serial kernel's filter block (:data:`..bitserial.WEIGHTS`) written so - and the
    accumulator as (n, f // L, y, x, f % L), L = 16 or 8 lanes (f must be a multiple). The integer
    products and sums per output are the untuned kernel's, so the result is exact. The vectorized loop
    is marked before the reduction's init is split off (after it, TVM refuses the update block)."""
    from bitfold.export.tvm.bitserial import WEIGHTS
    b = sch.get(block)
    serial = any(str(r).startswith(WEIGHTS) for r in b.reads)    # a bit-serial convolution's filters
    if not (serial or "conv2d_nchw" in b.name_hint) or str(b.body.buffer.dtype).startswith("float"):
        return False
    loops = sch.get_loops(block)
    n_red = 5 if serial else 3
    if len(loops) != 4 + n_red or [iv.iter_type for iv in b.iter_vars] != [0] * 4 + [2] * n_red:
        return False
    ext = int(sch.get(loops[1]).extent)
    lanes = 16 if ext % 16 == 0 else 8 if ext % 8 == 0 else 0
    if serial:   # the filters: the block the bit-serial compute made for them
        weights = [i for i, r in enumerate(b.reads) if len(r.region) == 5 and str(r).startswith(WEIGHTS)]
    else:        # the one 4-D read of a function parameter (Relax binds a layer's constants as params)
        weights = [i for i, r in enumerate(b.reads) if len(r.region) == 4 and str(r).startswith("param")]
    if not lanes or len(weights) != 1:
        return False
    if serial:
        sch.transform_layout(block, ("read", weights[0]), lambda f, *rest: (f // lanes, *rest, f % lanes))
    else:
        cache = sch.cache_read(block, weights[0], "global")
        sch.transform_layout(cache, ("write", 0), lambda f, c, h, w: (f // lanes, c, h, w, f % lanes))
    sch.transform_layout(block, ("write", 0), lambda n, f, h, w: (n, f // lanes, h, w, f % lanes))
    n, f, y, x, *red = sch.get_loops(block)
    fo, fi = sch.split(f, [None, lanes])
    sch.reorder(n, fo, y, x, *red, fi)
    sch.vectorize(fi)
    init = sch.decompose_reduction(block, red[0])
    sch.vectorize(sch.get_loops(init)[-1])
    return True


def _inline_elementwise(sch) -> bool:
    """Inline every element-wise block behind the kernel's reduction (or, without one, every block) into
    its consumer, the kernel's last block excepted: a fused kernel's requantize chain (cast, scale,
    BatchNorm, ...) then runs as one loop over the output instead of one pass through memory per operation. The same float operations per
    element, in the same order; LLVM may then fuse a multiply and an add into one FMA, so a float output
    can differ in its last bit (the build's gate against onnxruntime checks the result as before)."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    first_red = next((i for i, rv in enumerate(blocks) if sch.get(rv).init is not None), -1)
    done = False
    # only blocks behind the reduction: one in front of it (a packing, a zero-point shift) inlined into
    # it would be recomputed for every output that reads it (measured: bit-serial W3A3 dense 0.7 -> 13 us)
    for rv in blocks[first_red + 1:-1]:
        b = sch.get(rv)
        if b.init is not None or any(iv.iter_type != 0 for iv in b.iter_vars) or "pad" in b.name_hint:
            continue
        try:
            sch.compute_inline(rv)
            done = True
        except Exception:  # noqa: BLE001 - a block that cannot be inlined (several consumers, ...) stays
            continue
    return done


def apply_default(mod):
    """``(module, n)``: every unscheduled PrimFunc's reduction blocks reordered as above and its
    element-wise blocks inlined; ``n`` kernels changed."""
    import tvm
    from tvm.s_tir import Schedule

    out = mod
    changed = 0
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        if func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False)):
            continue
        sch = Schedule(tvm.IRModule({"main": func}))
        done = _inline_elementwise(sch)
        # bit-serial dense: popcount over packed words, LLVM vectorizes the word loop as it is;
        # bit-serial convolutions: filters innermost where their count allows, else (and in the "_xin"
        # variant) output width innermost (measured on a W4A4 3x3 conv, 32 -> 64 channels at 4x4: 101 ->
        # 22 us against the nest as computed)
        any_rank = "bitserial_conv2d" in gv.name_hint
        keep = "bitserial_dense" in gv.name_hint or "_nat" in gv.name_hint   # "_nat": the nest as computed
        width_inner = "_xin" in gv.name_hint     # a bit-serial variant: output width innermost (below)
        for block in ([] if keep else _reduction_blocks(sch)):
            try:
                if not width_inner and _vectorize_output_channels(sch, block):
                    done = True
                    continue
                done |= _reorder_reduction(sch, block, any_rank)
            except Exception:  # noqa: BLE001 - a block this simple rule cannot reorder keeps its order
                continue
        if done:
            new = sch.mod["main"].with_attr("global_symbol", gv.name_hint)
            out = _replace(out, gv, new)
            changed += 1
    return out, changed


def _reduction_blocks(sch):
    out = []
    for rv in sch.get_child_blocks(sch.get_sblock("root")):
        b = sch.get(rv)
        if b.init is not None and any(iv.iter_type == 2 for iv in b.iter_vars):
            out.append(rv)
    return out


def _replace(mod, gv, func):
    new = mod.__class__(dict(mod.functions_items()), attrs=mod.attrs)
    new[gv] = func
    return new
