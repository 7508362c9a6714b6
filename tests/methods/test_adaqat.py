import csv
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bitfold.export.onnx_export import export_run
from bitfold.toolchain.adaqat import AdaQATMethod, LearnedBitWidth
from bitfold.toolchain.bitmap import LayerBits
from bitfold.toolchain.describe import describe_layers
from bitfold.core.errors import BitfoldError
from bitfold.toolchain.quant import LayerBuilder
from bitfold.toolchain.runs import TrainConfig
from bitfold.toolchain.train import train


def _toy(estimator, bits=3):
    """One AdaQAT linear layer whose teacher is its own unquantized (normalised) weight."""
    torch.manual_seed(0)
    method = AdaQATMethod(estimator=estimator, learn_edges=True)
    method.edges = set()
    qb = LayerBuilder(method, {"fc": LayerBits(bits, 8)})
    model = nn.Sequential()
    model.add_module("inp", qb.act("fc", relu=False))
    model.add_module("fc", qb.linear("fc", 32, 8, bias=False))
    model.eval()
    x = torch.randn(256, 32)
    with torch.no_grad():
        teacher = x @ model.fc.weight.t()  # parametrised (tanh-normalised) float weight
        y = teacher.argmax(1)
    method.setup(model, describe_layers(model, (32,)))
    return method, model, x, y


def test_ste_estimator_sign_more_bits_lowers_the_loss():
    method, model, x, y = _toy("ste")
    bw = method.weight_widths(model)["fc"]
    loss = F.cross_entropy(model(x) * 5, y)
    loss.backward()
    assert bw.n.grad is not None and float(bw.n.grad) < 0


def test_fd_estimator_sign_more_bits_lowers_the_loss():
    method, model, x, y = _toy("fd")
    bw = method.weight_widths(model)["fc"]
    learn = [bw]
    method.site_widths(model)[("fc",)].frozen.fill_(8)
    surrogate = method._fd_surrogate(model, learn, (x, y * 1), step=0)
    surrogate.backward()
    assert float(bw.n.grad) < 0  # = L(4 bit) - L(3 bit)


@pytest.fixture(scope="module")
def lam_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("adaqat")
    out = {}
    for lam in (0.02, 0.3, 3.0):
        cfg = TrainConfig(model="cnn", bits="w8a8", method="adaqat", epochs=6,
                          method_options={"lam": lam, "finetune_epochs": 1})
        out[lam] = (root / f"lam{lam}", train(cfg, root / f"lam{lam}", progress=False))
    return out


def test_increasing_lambda_strictly_lowers_the_final_cost(lam_sweep):
    costs = [m["adaqat"]["final_cost"] for _, (_, m) in sorted(lam_sweep.items())]
    assert costs[0] > costs[1] > costs[2]
    assert all(m["accuracy"] > 0.5 for _, m in lam_sweep.values())


def test_widths_stay_in_range_and_outputs_are_written(tmp_path):
    # a strong penalty and a fast width learning rate push the widths hard against the floor
    # max_bits 5 bounds the learned widths only: the first and last layer keep their initial widths
    cfg = TrainConfig(model="mlp", bits="w6a6", method="adaqat", epochs=4,
                      method_options={"lam": 50.0, "bit_lr": 0.5, "finetune_epochs": 1, "min_bits": 3, "max_bits": 5})
    run = tmp_path / "r"
    train(cfg, run, progress=False)
    with open(run / "bit_trajectory.csv") as fh:
        rows = list(csv.DictReader(fh))
    edges = {rows[0]["name"], rows[-1]["name"]}
    hidden = [float(r["bits"]) for r in rows if r["name"] not in edges]
    assert hidden and all(3.0 <= b <= 5.0 for b in hidden)
    assert min(hidden) == 3.0
    first = {(r["name"], r["kind"]): float(r["bits"]) for r in rows[::-1]}
    for r in rows:
        if r["name"] in edges:
            assert float(r["bits"]) == first[(r["name"], r["kind"])]
    assert max(first[k] for k in first if k[0] in edges) > 5.0
    learned = json.loads((run / "learned_bitmap.json").read_text())
    assert learned == json.loads((run / "bitmap.json").read_text())
    assert all(isinstance(v["w"], int) and 2 <= v["w"] <= 8 for v in learned.values())
    assert (run / "bit_trajectory.png").stat().st_size > 1000


@pytest.mark.parametrize("fmt", ["qonnx", "qcdq"])
def test_learned_model_exports_and_verifies(lam_sweep, fmt, tmp_path):
    run, metrics = lam_sweep[0.3]
    res = export_run(run, fmt, tmp_path / "m.onnx")
    assert res.report.passed and res.report.argmax_agreement == 1.0
    assert res.bit_map == json.loads((run / "bitmap.json").read_text())


def test_budget_mode_ends_within_5_percent_of_the_budget(tmp_path):
    budget = 5.0e6  # BitOPs; uniform W8A8 of this CNN is 3.8e7
    cfg = TrainConfig(model="cnn", bits="w8a8", method="adaqat", epochs=6,
                      method_options={"budget": budget, "lam": 1.0, "finetune_epochs": 1})
    m = train(cfg, tmp_path / "b", progress=False)
    final = m["adaqat"]["final_cost"]
    assert abs(final - budget) / budget <= 0.05, final
    assert final <= budget


def test_board_cost_without_table_and_bad_options():
    with pytest.raises(BitfoldError, match="no cost table for board 'rpi4' yet"):
        AdaQATMethod(cost="rpi4")
    with pytest.raises(BitfoldError, match="unknown cost model"):
        AdaQATMethod(cost="joules")
    with pytest.raises(BitfoldError, match="estimator"):
        AdaQATMethod(estimator="magic")


def test_unfrozen_fractional_model_is_refused_by_export(tmp_path):
    from bitfold.export.onnx_export import export_model
    from bitfold.toolchain.models import build_model
    model = build_model("mlp", (1, 8, 8), 10, bits="w8a8", method="adaqat")
    with pytest.raises(BitfoldError, match="not frozen"):
        export_model(model, "qonnx", tmp_path / "m.onnx", torch.zeros(2, 1, 8, 8))
    assert not (tmp_path / "m.onnx").exists()


def test_learned_bit_width_module_clamps_and_rounds():
    m = LearnedBitWidth(5, 2, 8, "ste")
    with torch.no_grad():
        m.n.fill_(9.7)
    assert float(m()) == 8.0
    with torch.no_grad():
        m.n.fill_(3.4)
    assert float(m()) == 3.0 and m.integer() == 3


def test_budget_repair_does_not_narrow_when_narrowing_cannot_help():
    """A flat cost table (latency independent of bits): an unreachable budget must not drive widths down."""
    from bitfold.hw_models.table import TableCostModel
    from bitfold.toolchain.models import build_model
    flat = {"board": "flat", "metric": "latency", "unit": "s",
            "kinds": {k: {"w": [2, 8], "a": [2, 8], "per_mac": [[1e-9, 1e-9], [1e-9, 1e-9]], "overhead": 0.0}
                      for k in ("conv", "linear")}}
    method = AdaQATMethod(budget=1e-9, lam=1.0)
    method.cost_model = TableCostModel(flat)
    model = build_model("cnn", (1, 8, 8), 10, bits="w8a8:all", method=method)
    method.setup(model, describe_layers(model, (1, 8, 8)))
    bm = method.freeze(model)
    assert all(b.w == 8 and b.a == 8 for b in bm.values())


def test_layer_outputs_stay_in_the_fpga_tables_measured_range():
    """ulx3s-85f's table fitted thresholds on <= 6-bit outputs: a learnable layer output is kept
    there (start, steps and the budget repair's raising pass); the model input may stay at 8."""
    from bitfold.toolchain.models import build_model
    method = AdaQATMethod(cost="ulx3s-85f", budget=1e12, lam=1.0, learn_edges=True)
    assert method.out_cap == 6
    model = build_model("mlp", (1, 8, 8), 10, bits="w8a8:all", method=method)
    layers = describe_layers(model, (1, 8, 8))
    method.setup(model, layers)
    sites = method.site_widths(model)
    first = layers[0].name
    assert all(float(m.n) <= 6 for k, m in sites.items() if first not in k) and len(method.capped) == len(sites) - 1
    method.after_step(model, 0)
    bm = method.freeze(model)          # a huge budget: the raising pass widens what it may
    assert bm[first].a == 8 and all(b.a <= 6 for n, b in bm.items() if n != first)
    assert all(b.w == 8 for b in bm.values())


def _width_drops(tmp_path, bit_opt):
    """Two linear layers, the first priced 4x the second per (b_w * b_a): how far each width fell."""
    from pathlib import Path

    from bitfold.hw_models.cost import COST_MODELS, _PerLayerCost, register_cost_model
    register_cost_model(_PerLayerCost("toy-4x", "u", lambda d, bw, ba: (4.0 if d.macs > 1000 else 1.0) * bw * ba))
    try:
        model = f"{Path(__file__).parents[1] / 'user_models.py'}:two_layer"
        cfg = TrainConfig(model=model, bits="w8a8:all", method="adaqat", epochs=2,
                          method_options={"cost": "toy-4x", "lam": 1.0, "learn_edges": True, "finetune_epochs": 0,
                                          "bit_opt": bit_opt})
        train(cfg, tmp_path / bit_opt, progress=False)
    finally:
        COST_MODELS.pop("toy-4x")
    rows = list(csv.DictReader(open(tmp_path / bit_opt / "bit_trajectory.csv")))
    last = {r["name"]: float(r["bits"]) for r in rows if r["kind"] == "w"}
    first_layer, second_layer = sorted(last)          # "1" (64x32, priced 4x) and "3" (32x10)
    return 8.0 - last[first_layer], 8.0 - last[second_layer]


def test_sgd_widths_follow_the_relative_price_and_adam_does_not(tmp_path):
    pricey, cheap = _width_drops(tmp_path, "sgd")
    assert cheap > 0.2 and pricey > 1.5 * cheap, (pricey, cheap)
    # Adam's normalised steps erase the 4x: both widths move alike (why sgd is the default)
    pricey, cheap = _width_drops(tmp_path, "adam")
    assert abs(pricey - cheap) < 0.15 * max(pricey, cheap), (pricey, cheap)


def test_brevitas_jit_is_refused_with_a_clear_error(monkeypatch):
    """Under BREVITAS_JIT=1 Brevitas scripts its quantizers and the learned widths cannot be found:
    AdaQAT says so (and what to do) instead of failing inside its cost walk."""
    from brevitas import config as brevitas_config

    from bitfold.core.errors import BitfoldError
    from bitfold.toolchain.describe import describe_layers
    from bitfold.toolchain.models import build_model
    m = build_model("mlp", (1, 8, 8), 10, bits="w4a4", method="adaqat", cost="bitops")
    monkeypatch.setattr(brevitas_config, "JIT_ENABLED", True)
    with pytest.raises(BitfoldError, match="BREVITAS_JIT"):
        m.quant_method.setup(m, describe_layers(m, (1, 8, 8)))
