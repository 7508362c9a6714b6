"""The FINN boards' rate-aware cost: FINN's folding rule as the cost model applies it, and the
"lanes" table form (its checks against FINN's own builds are in tests/finn)."""
import json

import pytest
import torch

from bitfold.core.errors import BitfoldError
from bitfold.hw_models.finn_rules import DEFAULT_FPS, model_fold, mvau_fold, mvau_shape, target_cycles
from bitfold.hw_models.layers import LayerDesc


def dense(n_in, n_out, name="d"):
    return LayerDesc(name, "linear", (n_in,), (n_out,), n_in, n_out, (1, 1), (1, 1), 1, n_in * n_out, n_in * n_out, None)


def test_folding_rule_by_hand():
    # 64x32 W4 at 1000 cycles: SIMD 1, 2 miss (2048, 1024), SIMD 4 meets (512)
    assert mvau_fold(64, 32, 1, 1000, 4) == (1, 4)
    # at 100 cycles SIMD stops at 8 (16 x 4 bits > 36), then PE 4 gives 8 x 8 = 64 cycles
    assert mvau_fold(64, 32, 1, 100, 4) == (4, 8)
    # FINN checks the rate before the word width: 2-bit weights reach 100 cycles at SIMD 32 (64 bits)
    assert mvau_fold(64, 32, 1, 100, 2) == (1, 32)
    # unreachable rate: everything unrolled that the weight word allows
    assert mvau_fold(64, 32, 1, 1, 4) == (32, 8)
    assert target_cycles(100.0, 100_000) == 1000 and target_cycles(100.0, 48_828) == 2048
    conv = LayerDesc("c", "conv", (8, 8, 8), (16, 8, 8), 8, 16, (3, 3), (1, 1), 1, 8 * 9 * 16 * 64, 8 * 9 * 16, None)
    assert mvau_shape(conv) == (72, 16, 64)
    assert mvau_fold(*mvau_shape(conv), 10 ** 9, 4) == (1, 1)


def test_second_pass_when_a_layer_misses_the_rate():
    # at 5 cycles the W7 first layer stops at SIMD 4 and PE 64: 16 cycles; FINN folds everything again
    # at 16, so the W2 layers get PE 16 instead of the 64 the first pass gave them
    layers = [dense(64, 64, "a"), dense(64, 64, "b"), dense(64, 10, "c")]
    assert mvau_fold(64, 64, 1, 5, 2) == (64, 16)
    assert model_fold(layers, [7, 2, 2], 5) == [(64, 4), (16, 16), (5, 16)]
    assert model_fold(layers, [2, 2, 2], 5) == [mvau_fold(64, 64, 1, 5, 2)] * 2 + [mvau_fold(64, 10, 1, 5, 2)]


def _lanes_table():
    from bitfold.hw_models.table import find_table
    t = find_table("pynq-z2")
    assert t is not None and t.prices_rate, "the shipped pynq-z2 table prices a rate (lanes form)"
    return t


def test_lanes_table_prices_the_rate():
    t = _lanes_table()
    layers = [dense(784, 64, "a"), dense(64, 64, "b"), dense(64, 10, "c")]
    bits = {d.name: (4.0, 4.0) for d in layers}
    slow, default, fast = (float(t.at_rate(f)(layers, bits).total) for f in (1_000, None, 1_000_000))
    assert slow < default < fast
    assert default == pytest.approx(float(t.at_rate(DEFAULT_FPS)(layers, bits).total))
    # narrower widths cost less at the same rate, and the cost has a gradient in the widths
    bw = torch.tensor(4.0, requires_grad=True)
    c = t(layers, {"a": (bw, 4.0), "b": (4.0, 4.0), "c": (4.0, 4.0)}).total
    c.backward()
    assert bw.grad is not None and float(bw.grad) > 0
    assert float(t(layers, {d.name: (2.0, 2.0) for d in layers}).total) < float(c)


def test_lanes_entry_checked(tmp_path):
    from bitfold.hw_models.table import load_table_file, shipped_table_path
    t = json.loads(shipped_table_path("pynq-z2").read_text())
    k = next(iter(t["kinds"].values()))
    assert k["form"] == "lanes"
    k["per_lane"] = k["per_lane"][:-1]
    p = tmp_path / "pynq-z2.json"
    p.write_text(json.dumps(t))
    with pytest.raises(BitfoldError, match="per_lane does not match"):
        load_table_file(p, "pynq-z2")


def test_cpu_table_still_has_no_rate():
    from bitfold.hw_models.table import find_table
    with pytest.raises(BitfoldError, match="has no rate"):
        find_table("host-cpu").at_rate(1000)
