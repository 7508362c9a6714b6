"""FINN's folding rule for its matrix-vector units, as the cost model needs it: the PE and SIMD that
FINN's ``SetFolding`` gives a dense or convolutional layer for a target number of cycles per frame,
and from them the layer's lanes (PE x SIMD), the quantity its LUTs scale with at a given rate.

The rule (finn-plus 1.6, ``SetFolding`` for ``MVAU_hls``/``MVAU_rtl``): starting from PE = SIMD = 1,
SIMD walks the divisors of the matrix width MW until the expected cycles
``(MH/PE) * (MW/SIMD) * pixels`` reach the target, but stops one step back once the weight word
(``SIMD * b_w``) would exceed ``mvau_wwidth_max`` (36 bits in FINN's build configuration); then PE
walks the divisors of the matrix height MH the same way. The target is
``int(clock_hz / target_fps)`` cycles per frame, as FINN's builder computes it.
When a layer cannot reach the target (its weight word caps SIMD, or every lane is used), FINN's
two-pass relaxation folds the whole model again at the slowest layer's cycles, so no layer gets
lanes it cannot use (:func:`model_fold`). A test builds models through FINN and checks the PE/SIMD
it chose against this rule.
"""
from __future__ import annotations

from bitfold.hw_models.fpga_rules import divisors
from bitfold.hw_models.layers import LayerDesc

#: FINN's ``DataflowBuildConfig.mvau_wwidth_max`` default: the widest weight word a PE reads per cycle
MVAU_WWIDTH_MAX = 36

#: the rate ``bitfold build`` asks FINN for when none is given (inferences/s)
DEFAULT_FPS = 100_000


def target_cycles(clock_mhz: float, fps: float) -> int:
    """Cycles per frame FINN's builder targets for ``fps`` at ``clock_mhz`` (its own rounding)."""
    return int(clock_mhz * 1e6 / fps)


def mvau_shape(layer: LayerDesc) -> tuple[int, int, int]:
    """(MW, MH, pixels) of the matrix-vector unit FINN makes of a layer."""
    kh, kw = layer.kernel
    mw = kh * kw * layer.in_features // max(layer.groups, 1)
    pixels = 1
    if layer.kind == "conv" and len(layer.out_shape) == 3:
        pixels = layer.out_shape[1] * layer.out_shape[2]
    return mw, layer.out_features, pixels


def mvau_fold(mw: int, mh: int, pixels: int, cycles: int, w_bits: int,
              wwidth_max: int = MVAU_WWIDTH_MAX) -> tuple[int, int]:
    """(PE, SIMD) FINN's SetFolding chooses for one MVAU at a target of ``cycles`` per frame."""
    simd = 1
    for s in divisors(mw):
        prev, simd = simd, s
        if exp_cycles(mw, mh, pixels, 1, simd) <= cycles:
            break
        if simd * w_bits > wwidth_max:
            simd = prev
            break
    pe = 1
    for p in divisors(mh):
        pe = p
        if exp_cycles(mw, mh, pixels, pe, simd) <= cycles:
            break
    return pe, simd


def exp_cycles(mw: int, mh: int, pixels: int, pe: int, simd: int) -> int:
    return (mh // pe) * (mw // simd) * pixels


def model_fold(layers: list[LayerDesc], w_bits: list[int], cycles: int) -> list[tuple[int, int]]:
    """(PE, SIMD) of every layer's MVAU as FINN's SetFolding gives them for the whole model: one pass
    at ``cycles``, and if the slowest MVAU misses it, a second pass at that MVAU's cycles."""
    shapes = [mvau_shape(d) for d in layers]
    folds = [mvau_fold(*sh, cycles, w) for sh, w in zip(shapes, w_bits)]
    slowest = max((exp_cycles(*sh, *f) for sh, f in zip(shapes, folds)), default=0)
    if slowest > cycles:
        folds = [mvau_fold(*sh, slowest, w) for sh, w in zip(shapes, w_bits)]
    return folds
