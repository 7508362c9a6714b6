"""hw_models: energy model (literature + CSV calibration), table files (corrupt / foreign),
whole-model calibration, and the `bitfold calibrate` / `bitfold costs` commands."""
import json

import pytest
import torch

from bitfold.cli import main
from bitfold.hw_models.cost import get_cost_model
from bitfold.hw_models.layers import LayerDesc
from bitfold.core.errors import BitfoldError

LIN = LayerDesc("l", "linear", (64,), (32,), 64, 32, (1, 1), (1, 1), 1, 2048, 2048, None)


def _cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
        raise SystemExit(0)
    out = capsys.readouterr()
    return e.value.code, out.out + out.err


def test_energy_model_literature_values_scaling_and_gradient():
    em = get_cost_model("energy")
    assert em.unit == "pJ" and "Horowitz" in em.table["provenance"]["citation"]
    one = LayerDesc("m", "linear", (1,), (1,), 1, 1, (1, 1), (1, 1), 1, 1, 1, None)
    parts = em.per_layer(one, torch.tensor(8.0), torch.tensor(8.0))
    assert float(parts["mul"]) == pytest.approx(0.2)            # 8x8 multiply, 45 nm
    assert float(parts["add"]) == pytest.approx(0.03 + 8 / 24 * 0.07)   # 16-bit accumulator
    assert float(parts["weights"]) == pytest.approx(8 * 10 / 64)
    e = {b: float(em([LIN], {"l": (b, b)}).total) for b in (2, 4, 8)}
    assert e[2] < e[4] < e[8]
    bw = torch.tensor(3.5, requires_grad=True)
    em([LIN], {"l": (bw, torch.tensor(4.0))}).total.backward()
    assert float(bw.grad) > 0


def test_energy_csv_calibration_replaces_ops_and_trains(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BITFOLD_HOME", str(tmp_path / "home"))
    csv = tmp_path / "e.csv"
    csv.write_text("op,bits,energy_pj\nmul,4x4,0.1\nmul,8x8,0.8\n")
    code, out = _cli(["calibrate", "--energy-csv", str(csv), "--name", "energy-chip"], capsys)
    assert code == 0 and "energy-chip" in out
    em = get_cost_model("energy-chip")
    assert em.table["provenance"]["source"] == "measured" and em.table["provenance"]["replaced_ops"] == ["mul"]
    one = LayerDesc("m", "linear", (1,), (1,), 1, 1, (1, 1), (1, 1), 1, 1, 1, None)
    assert float(em.per_layer(one, torch.tensor(8.0), torch.tensor(8.0))["mul"]) == pytest.approx(0.8)
    assert float(em.per_layer(one, torch.tensor(4.0), torch.tensor(4.0))["mul"]) == pytest.approx(0.1)
    # the add/sram ops stay the literature's
    assert em.table["ops"]["add"] == get_cost_model("energy").table["ops"]["add"]
    from bitfold.toolchain.runs import TrainConfig
    from bitfold.toolchain.train import train
    m = train(TrainConfig(model="mlp", bits="w6a6", method="adaqat", epochs=1,
                          method_options={"cost": "energy-chip", "lam": 1.0, "finetune_epochs": 1}),
              tmp_path / "r", progress=False)
    assert m["adaqat"]["cost_unit"] == "pJ" and m["adaqat"]["final_cost"] > 0


@pytest.mark.parametrize("text,match", [("op,bits\nmul,4\n", "columns op,bits,energy_pj"),
                                        ("op,bits,energy_pj\ndiv,4,1\n", "unknown op 'div'"),
                                        ("op,bits,energy_pj\nmul,four,1\n", "line 2: bits 'four'"),
                                        ("op,bits,energy_pj\nadd,8,-1\n", "energy >= 0")])
def test_bad_energy_csv_is_one_clear_error(tmp_path, monkeypatch, capsys, text, match):
    monkeypatch.setenv("BITFOLD_HOME", str(tmp_path / "home"))
    (tmp_path / "e.csv").write_text(text)
    code, out = _cli(["calibrate", "--energy-csv", str(tmp_path / "e.csv")], capsys)
    assert code != 0 and match in out.replace("\n", " ")
    assert not (tmp_path / "home" / "tables").exists() or not list((tmp_path / "home" / "tables").iterdir())


def test_corrupt_or_foreign_table_files(tmp_path, monkeypatch):
    from bitfold.hw_models.table import find_table, load_table_file, shipped_table_path
    monkeypatch.setenv("BITFOLD_HOME", str(tmp_path))
    (tmp_path / "tables").mkdir()
    user = tmp_path / "tables" / "ulx3s-85f.json"
    user.write_text("{not json")
    with pytest.raises(BitfoldError, match="corrupt or not a bitfold cost table"):
        find_table("ulx3s-85f")
    user.write_text(json.dumps({"hello": 1}))
    with pytest.raises(BitfoldError, match="corrupt or not a bitfold cost table.*KeyError"):
        get_cost_model("ulx3s-85f")
    user.write_text(shipped_table_path("icebreaker").read_text())   # a real table, of another board
    with pytest.raises(BitfoldError, match="belongs to board 'icebreaker', not 'ulx3s-85f'"):
        find_table("ulx3s-85f")
    t = json.loads(shipped_table_path("host-cpu").read_text())
    t["kinds"]["linear"]["per_mac"] = t["kinds"]["linear"]["per_mac"][:-1]    # grid and values disagree
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(t))
    with pytest.raises(BitfoldError, match="grid and per_mac do not match"):
        load_table_file(bad)
    t = json.loads(shipped_table_path("ulx3s-85f").read_text())
    t["kinds"]["linear"]["coef"] += [0.5, 0.5]           # a structural table of another layout
    bad.write_text(json.dumps(t))
    with pytest.raises(BitfoldError, match="this file has 6 .an older bitfold's table"):
        load_table_file(bad)
    t["kinds"]["linear"]["coef"] = t["kinds"]["linear"]["coef"][:-2]
    t["kinds"]["linear"]["G"]["value"][0].append(1.0)
    bad.write_text(json.dumps(t))
    with pytest.raises(BitfoldError, match="per-lane grid G does not match"):
        load_table_file(bad)
    with pytest.raises(BitfoldError, match="does not exist"):
        get_cost_model(str(tmp_path / "missing.json"))
    user.unlink()
    assert "hw_models" in find_table("ulx3s-85f").source      # the shipped one again


def test_whole_model_calibration_factor():
    from bitfold.hw_models.table import TableCostModel, fit_model_factor, shipped_table_path
    base = json.loads(shipped_table_path("pynq-z2").read_text())
    cal = fit_model_factor(base, [(100.0, 80.0), (200.0, 160.0), (0.0, 5.0)])
    assert cal["calibration"]["scale"] == pytest.approx(0.8) and cal["calibration"]["models"] == 2
    assert cal["calibration"]["mape_before"] == pytest.approx(0.25) and cal["calibration"]["mape_after"] < 1e-9
    assert "calibration" not in base
    a, b = TableCostModel(base), TableCostModel(cal)
    assert float(b([LIN], {"l": (4, 4)}).total) == pytest.approx(0.8 * float(a([LIN], {"l": (4, 4)}).total))


@pytest.mark.parametrize("board", ["ulx3s-85f", "pynq-z2"])
def test_costs_command_prints_provenance_and_plots(tmp_path, capsys, board):
    code, out = _cli(["costs", "--board", board, "--png", str(tmp_path / "c.png")], capsys)
    assert code == 0, out
    assert "provenance:" in out and "Spearman" in out and ("estimated" if board == "pynq-z2" else "measured") in out
    assert (tmp_path / "c.png").stat().st_size > 5000
    code, out = _cli(["costs", "--board", "energy", "--png", str(tmp_path / "e.png")], capsys)
    assert code == 0 and "Horowitz" in out


def test_calibrate_needs_something_to_do(capsys):
    code, out = _cli(["calibrate"], capsys)
    assert code != 0 and "--board B" in out
    code, out = _cli(["calibrate", "--board", "no-such-board"], capsys)
    assert code != 0 and "no-such-board" in out


def test_fold_at_rate_is_the_smallest_folding_that_meets_the_rate():
    from bitfold.hw_models.fpga_rules import StageShape, divisors, fold_at_rate, stage_cycles
    s = StageShape("fc", 1, 1, 784, 64, 1, 1, 1)
    for budget in (20000, 5000, 2000, 900):
        pe, simd = fold_at_rate(s, budget)
        assert stage_cycles(s, pe, simd) <= budget
        if pe == 1:   # the next narrower SIMD misses it
            narrower = [d for d in divisors(s.ic) if d < simd]
            assert not narrower or stage_cycles(s, 1, narrower[-1]) > budget
    assert fold_at_rate(s, 1e9) == (1, 1)
    assert fold_at_rate(s, 1) == (64, 784)   # unreachable: the full unroll


def test_fpga_cost_depends_on_the_target_rate_and_bitops_does_not():
    from bitfold.hw_models.cost import bitops, get_cost_model
    from bitfold.toolchain.describe import describe_layers
    from bitfold.toolchain.models import build_model
    m = build_model("mlp", (1, 28, 28), 10, bits="w4a4:all")
    layers = describe_layers(m, (1, 28, 28))
    table = get_cost_model("ulx3s-85f")
    cost = {}
    for fps in (1e3, 1e4):
        for bits in ((2, 2), (4, 4), (8, 8)):
            b = {d.name: bits for d in layers}
            cost[fps, bits] = float(table.at_rate(fps)(layers, b).total)
    # a faster target needs more lanes: more LUTs at every width
    assert all(cost[1e4, b] > cost[1e3, b] for b in ((2, 2), (4, 4), (8, 8)))
    # the price of widening from W4A4 to W8A8 grows with the rate; BitOPs' is one fixed ratio (4x)
    assert cost[1e4, (8, 8)] / cost[1e4, (4, 4)] > cost[1e3, (8, 8)] / cost[1e3, (4, 4)]
    b4, b8 = ({d.name: (w, w) for d in layers} for w in (4, 8))
    assert float(bitops(layers, b8).total) / float(bitops(layers, b4).total) == 4.0
    with pytest.raises(BitfoldError, match="no rate"):
        get_cost_model("host-cpu").at_rate(100.0)
    with pytest.raises(BitfoldError, match="target-fps"):
        table.at_rate(-1.0)


def test_the_build_folds_what_the_rate_aware_table_prices(tmp_path):
    """The loop's build folding at a rate (lowered stages) equals the folding the cost model
    derives from the layer records: prediction and build describe one design."""
    import torch

    from bitfold.export.lower import lower
    from bitfold.export.onnx_export import export_model
    from bitfold.hw_models.fpga_rules import StageShape, fold_at_rate, rate_folding
    from bitfold.toolchain.describe import describe_layers
    from bitfold.toolchain.models import build_model
    from bitfold.toolchain.train import init_activation_stats
    for name in ("mlp", "cnn"):
        m = build_model(name, (1, 8, 8), 10, bits="w3a3:all")
        init_activation_stats(m, torch.rand(64, 1, 8, 8), 32)
        path = export_model(m, "qonnx", tmp_path / f"{name}.onnx", torch.rand(8, 1, 8, 8)).path
        im = lower(str(path))
        layers = describe_layers(m, (1, 8, 8))
        for fps in (2e3, 2e4):
            fold = rate_folding(im, 25.0, fps)
            budget = 25e6 / fps
            ours = [fold_at_rate(StageShape.of_layer(d), budget) for d in layers]
            assert [fold.of(s.name) for s in im.mvaus] == ours


def _cpu_rows(labelled: bool):
    """CPU latency rows at two layer sizes: a sub-8-bit kernel whose cost grows with w*a where both
    widths are <= 4, the int8 kernel's flat cost (with timing noise of up to 20 %) above."""
    from bitfold.hw_models.store import Measurement
    rows = []
    for w in (2, 4, 8):
        for a in (2, 4, 8):
            small = max(w, a) <= 4
            noise = 1.0 + 0.2 * ((w * 3 + a) % 3 - 1)      # int8 cells: 0.8x, 1.0x, 1.2x
            per_mac = 1e-12 * w * a if small else 1e-10 * noise
            for macs in (10_000, 40_000):
                extra = {"kernel": f"bitserial W{w}A{a}" if small else "int8"} if labelled else {}
                rows.append(Measurement(board="cpu", kind="conv", macs=macs, weights=macs, b_w=w, b_a=a,
                                        metric="latency", value=1e-6 + macs * per_mac, unit="s", source="measured",
                                        tool="tvm", extra=extra))
    return rows


def test_cpu_table_with_kernel_names_prices_the_int8_fallback_as_one_kernel_and_relaxes_it():
    """A width optimiser starting at W8A8 on a CPU table used to see a flat (or, from timing noise,
    uphill) grid next to W8A8: the bit-serial kernel runs only when both widths are <= 4. Rows that
    name their kernel make the int8 cells one fitted cell, and above the bit-serial widths the cost
    falls along the wider width."""
    from bitfold.hw_models.table import TableCostModel, fit_table
    t = fit_table(_cpu_rows(labelled=True), "cpu", "latency")
    k = t["kinds"]["conv"]
    assert k["fallback"] == {"kernel": "int8", "above": 4}
    pooled = [k["per_mac"][i][j] for i in range(3) for j in range(3) if max(k["w"][i], k["a"][j]) > 4]
    assert len(pooled) == 5 and max(pooled) == min(pooled) == pytest.approx(1.1e-10, rel=0.1)
    cm = TableCostModel(t)
    conv = LayerDesc("c", "conv", (16, 8, 8), (16, 8, 8), 16, 16, (3, 3), (1, 1), 1, 147456, 2304, None)

    def cost_and_grad(w, a):
        bw, ba = torch.tensor(float(w), requires_grad=True), torch.tensor(float(a), requires_grad=True)
        c = cm([conv], {"c": (bw, ba)}).total
        c.backward()
        return float(c), float(bw.grad), float(ba.grad)

    c88, gw, ga = cost_and_grad(8, 8)
    assert gw > 0 and ga > 0 and gw == pytest.approx(ga)         # narrowing both widths lowers the cost
    c48, gw48, ga48 = cost_and_grad(4, 8)
    assert c48 == pytest.approx(c88) and gw48 == 0 and ga48 > 0  # only the wider operand matters above 4
    c55, gw55, _ = cost_and_grad(5, 5)
    assert c55 == pytest.approx(c88) and gw55 > 0        # predicted as measured (int8), the gradient still ramps
    c44, _, _ = cost_and_grad(4, 4)
    c22, _, _ = cost_and_grad(2, 2)
    assert c22 < c44 < c88
    # the same rows without kernel names: the grid as measured (noise kept), no fallback, flat at W8A8 in w
    plain = fit_table(_cpu_rows(labelled=False), "cpu", "latency")["kinds"]["conv"]
    assert "fallback" not in plain and plain["per_mac"][2][2] != plain["per_mac"][2][1]
