"""FINN backend with real finn-plus, in its own environment (created once per test session:
``$BITFOLD_FINN_ENV`` if set, else ``$BITFOLD_HOME/finn-env``)."""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from bitfold.core.errors import BitfoldError, ToolMissingError


@pytest.fixture(scope="session")
def finn_env():
    from bitfold.export.finn.backend import env_dir, setup
    info = setup()
    return env_dir(), info


@pytest.fixture(scope="module")
def exports(tmp_path_factory, trained_run):
    from bitfold.export.onnx_export import export_run
    from bitfold.toolchain.runs import TrainConfig
    from bitfold.toolchain.train import train
    root = tmp_path_factory.mktemp("finn_models")
    train(TrainConfig(model="mlp", bits="w2a2", method="fixed", epochs=2), root / "mlp", progress=False)
    run, _ = trained_run
    return {"mlp": export_run(root / "mlp", "qonnx", root / "mlp.onnx").path,
            "cnn": export_run(run, "qonnx", root / "cnn.onnx").path,
            "cnn_qcdq": export_run(run, "qcdq", root / "cnn.qcdq.onnx").path}


class TFC(nn.Module):
    """A TFC-style MLP written the way FINN's examples write them (not built by bitfold):
    8-bit input quantizer, then W2A2 layers. (With a 2-bit signed *input* quantizer FINN 1.6.1's
    ConvertQONNXtoFINN changes the outputs of this model on digits inputs; bitfold reports that
    as a verification failure after step_qonnx_to_finn.)"""

    def __init__(self, bits=2):
        super().__init__()
        import brevitas.nn as qnn
        self.inp = qnn.QuantIdentity(bit_width=8, return_quant_tensor=True)
        layers = []
        for a, b in ((64, 32), (32, 32)):
            layers += [qnn.QuantLinear(a, b, bias=False, weight_bit_width=bits), nn.BatchNorm1d(b),
                       qnn.QuantReLU(bit_width=bits, return_quant_tensor=True)]
        self.body = nn.Sequential(*layers)
        self.out = qnn.QuantLinear(32, 10, bias=False, weight_bit_width=bits)

    def forward(self, x):
        return self.out(self.body(self.inp(x.flatten(1))))


def test_env_is_separate_and_reused(finn_env):
    from bitfold.export.finn.backend import setup
    env, info = finn_env
    assert info["finn-plus"] == "1.6.1" and info["onnx"] == "1.21.0" and info["brevitas"] is None
    assert info["torch"].startswith("2.13.0")   # the CPU wheel, not a CUDA build
    again = setup()            # reuse: checks, does not reinstall
    assert "setup_s" not in again
    assert not any(m == "finn" or m.startswith("finn.") for m in sys.modules)   # never imported here


@pytest.mark.parametrize("model,board", [("mlp", "pynq-z2"), ("mlp", "zcu104"), ("cnn", "pynq-z2"), ("cnn", "zcu104")])
def test_estimates_verified(finn_env, exports, tmp_path, model, board):
    from bitfold.export.backends import build
    out = tmp_path / "b"
    sim = board == "pynq-z2"            # FINN's RTL layers in verilator: once per model (same generator)
    r = build(exports[model], board, out, bitstream=False, rtl_sim=sim)
    info = json.loads((out / "build.json").read_text())
    assert r.backend == "finn" and info["status"] == "ok"
    checks = info["verification"]
    assert set(checks) == {"qonnx_to_finn", "tidy_up", "streamlined", "hw_generic", "hw_minimized", "partitioned",
                           "specialized", "folded", "final"}
    assert all(c["passed"] and c["samples"] == 20 and c["argmax_agreement"] >= 0.99 for c in checks.values())
    hw = info["hw_python_verification"]
    assert hw["outlier_fraction"] <= 0.05 and hw["argmax_agreement"] >= 0.99
    assert set(info["finn_single_sample_checks"]) == {"finn_onnx_python_0", "initial_python_0", "streamlined_python_0"}
    mvau = [row for row in info["layers"] if row["type"].startswith("MVAU")]
    assert len(mvau) == 4 and all(row["PE"] >= 1 and row["SIMD"] >= 1 for row in mvau)
    assert 0 < info["totals"]["LUT"] <= info["budget"]["LUT"] and info["fits"]
    assert info["performance"]["estimated_throughput_fps"] > 0
    assert "step_generate_estimate_reports" in info["steps"]
    if model == "mlp":
        assert info["rtl_lint"] and all(v["rc"] == 0 for v in info["rtl_lint"].values())
    if sim:                 # FINN's generated RTL in verilator vs FINN's Python execution, exact
        rs = info["rtl_sim"]
        done = {k: v for k, v in rs.items() if not v.get("skipped")}
        assert done and all(v["passed"] and v["mode"] == "exact" and v["samples"] == 20 and v["stall"]
                            for v in done.values())
        assert all("unisim" in v["skipped"] for k, v in rs.items() if k.startswith("MVAU_rtl"))
        if model == "mlp":
            assert "Thresholding_rtl_0" in done
            _wrong_threshold_is_caught(out / "finn")
        else:       # padding and sliding windows, the pooling one depthwise with SIMD < channels
            assert any(k.startswith("FMPadding_rtl") for k in done)
            assert sum(k.startswith("ConvolutionInputGenerator_rtl") for k in done) >= 2
    else:
        assert info["rtl_sim"] == {}
    assert "| total |" in (out / "report.md").read_text()
    if (model, board) == ("mlp", "pynq-z2"):    # what `bitfold run` / `bitfold sweep` record for a FINN board
        from bitfold.app.loop import FinnTarget
        from bitfold.app.sweep import RowCollector
        from bitfold.boards import load_board
        rows = RowCollector()
        m = FinnTarget(load_board(board), rows).measure(str(out), 0.0, {"run": "t"})
        assert m["value"] == info["totals"]["LUT"] and m["fps"] == info["performance"]["estimated_throughput_fps"]
        assert sorted(r.metric for r in rows.rows) == ["bram", "dsp", "lut"]
        assert all(r.source == "estimated" and r.tool == "finn-plus" and r.extra["run"] == "t" for r in rows.rows)


@pytest.mark.parametrize("model,fps", [("mlp", 100_000), ("mlp", 20_000_000), ("cnn", 100_000)])
def test_folding_rule_is_finns(finn_env, exports, trained_run, tmp_path, model, fps):
    """The cost model's FINN folding rule (hw_models.finn_rules, with FINN's second pass when a layer
    misses the rate) gives every MVAU the PE and SIMD that FINN's own SetFolding gave it in a real
    build at that rate (the FINN tables price lanes by it), and the build uses the MVAU style the
    tables are measured in."""
    from bitfold.export.backends import build
    from bitfold.hw_models.finn_rules import model_fold, target_cycles
    from bitfold.toolchain.describe import describe_layers
    from bitfold.toolchain.runs import load_run
    run = Path(exports["mlp"]).with_suffix("") if model == "mlp" else trained_run[0]
    _, net, ck = load_run(run)
    layers = describe_layers(net, tuple(ck["input_shape"]))
    out = tmp_path / "b"
    build(exports[model], "pynq-z2", out, {"verify": False, "bitstream": False, "target_fps": fps})
    info = json.loads((out / "build.json").read_text())
    assert info["mvau_style"] == "hls"
    mvau = [r for r in info["layers"] if r["type"].startswith("MVAU")]
    assert [r["type"] for r in mvau] == ["MVAU_hls"] * len(layers)
    expect = model_fold(layers, [int(ck["bit_map"][d.name]["w"]) for d in layers],
                        target_cycles(info["clock_mhz"], fps))
    assert [(r["PE"], r["SIMD"]) for r in mvau] == [tuple(f) for f in expect]


def _wrong_threshold_is_caught(finn_dir):
    """The RTL comparison can fail: one threshold of FINN's generated image moved -> mismatch."""
    from bitfold.export.finn.rtlsim import read_meta, simulate_node
    d = finn_dir / "bitfold_rtlsim" / "Thresholding_rtl_0"
    meta = read_meta(d)
    lib = str(Path(meta["files"][0]).parents[2])        # finn-rtllib
    ok = simulate_node("Thresholding_rtl_0", meta, lib, finn_dir, stall=False)
    assert ok["passed"]
    root = sorted((finn_dir / meta["code_gen_dir"][2:]).glob("*_threshs_0_0.dat"))[0]
    assert root.read_text().split()[0] != "3f000000"
    root.write_text("3f000000\n")       # the search tree's root threshold -> 0.5 (float32 bits)
    bad = simulate_node("Thresholding_rtl_0", meta, lib, finn_dir)
    assert not bad["passed"] and bad["flips"] > 0


def test_gated_steps_name_vivado_and_keep_estimates(finn_env, exports, tmp_path):
    from bitfold.export.backends import build
    out = tmp_path / "b"
    with pytest.raises(ToolMissingError, match="vivado") as ei:
        build(exports["mlp"], "pynq-z2", out)            # bitstream requested: stops at Vivado
    assert ei.value.exit_code == 3 and "Produced so far" in ei.value.message
    info = json.loads((out / "build.json").read_text())
    assert info["status"] == "tool_missing" and "vivado" in info["missing_tool"]
    assert (out / "finn" / "report" / "estimate_layer_resources.json").exists()


def test_foreign_brevitas_tfc(finn_env, tmp_path):
    from bitfold.export.backends import build
    from bitfold.export.onnx_export import export_brevitas
    from bitfold.toolchain.data import load_dataset
    torch.manual_seed(0)
    m = TFC()
    d = load_dataset("digits")
    xt, yt = torch.as_tensor(d.x_train), torch.as_tensor(d.y_train)
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    for _ in range(150):
        idx = torch.randint(0, len(xt), (64,))
        loss = nn.functional.cross_entropy(m(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    x = torch.as_tensor(d.x_test[:64])
    path = export_brevitas(m, x[:1], "qonnx", tmp_path / "tfc.onnx", x_verify=x).path
    build(path, "pynq-z2", tmp_path / "b", bitstream=False)
    info = json.loads((tmp_path / "b" / "build.json").read_text())
    assert all(c["passed"] for c in info["verification"].values()) and len(info["verification"]) == 9
    assert len([r for r in info["layers"] if r["type"].startswith("MVAU")]) == 3


def test_folding_file_and_small_budget(finn_env, exports, tmp_path):
    from bitfold.export.backends import build
    build(exports["cnn"], "pynq-z2", tmp_path / "auto", bitstream=False, target_fps=200_000, rtl_sim=False)
    auto = json.loads((tmp_path / "auto" / "build.json").read_text())
    fold = {r["layer"]: {"PE": 1, "SIMD": 1} for r in auto["layers"] if r["type"].startswith("MVAU")}
    (tmp_path / "fold.json").write_text(json.dumps({"Defaults": {}, **fold}))
    build(exports["cnn"], "pynq-z2", tmp_path / "serial", bitstream=False, folding=tmp_path / "fold.json", rtl_sim=False)
    ser = json.loads((tmp_path / "serial" / "build.json").read_text())
    assert all(r["PE"] == 1 and r["SIMD"] == 1 for r in ser["layers"] if r["type"].startswith("MVAU"))
    assert ser["totals"]["LUT"] < auto["totals"]["LUT"]
    assert ser["performance"]["max_cycles"] > auto["performance"]["max_cycles"]
    tiny = tmp_path / "tiny.toml"
    tiny.write_text(next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file()).joinpath("boards", "pynq-z2.toml").read_text()
                    .replace('name = "pynq-z2"', 'name = "tiny-z2"').replace("lut = 53200", "lut = 500"))
    with pytest.raises(BitfoldError, match=r"does not fit tiny-z2: LUT .* > 500 \(largest layer"):
        build(exports["cnn"], str(tiny), tmp_path / "t", bitstream=False, target_fps=200_000, rtl_sim=False)


def test_bad_inputs(finn_env, exports, tmp_path, monkeypatch):
    from bitfold.export.backends import build
    with pytest.raises(BitfoldError, match="QCDQ"):
        build(exports["cnn_qcdq"], "pynq-z2", tmp_path / "o1", bitstream=False)
    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(BitfoldError):
        build(tmp_path / "junk.onnx", "pynq-z2", tmp_path / "o2", bitstream=False)
    monkeypatch.setenv("BITFOLD_FINN_ENV", str(tmp_path / "no-env"))
    with pytest.raises(ToolMissingError, match="bitfold setup finn"):
        build(exports["mlp"], "pynq-z2", tmp_path / "o3", bitstream=False)
    for d in ("o1", "o2", "o3"):
        assert not (tmp_path / d).exists()


def test_residual_network_gets_a_specific_error(finn_env, tmp_path):
    from bitfold.export.backends import build
    from bitfold.export.onnx_export import export_run
    from bitfold.toolchain.runs import TrainConfig
    from bitfold.toolchain.train import train
    train(TrainConfig(model="resnet20", bits="w4a4", epochs=1, data="synthetic", synthetic_shape=[3, 8, 8],
                      batch_size=64), tmp_path / "res", progress=False)
    res = export_run(tmp_path / "res", "qonnx", tmp_path / "res.onnx").path
    with pytest.raises(BitfoldError, match=r"could not map res.onnx to hardware .*MatMul x\d+ \(first MatMul_") as ei:
        build(res, "zcu104", tmp_path / "b", bitstream=False, verify=False)
    assert "residual" in ei.value.hint and not (tmp_path / "b").exists()


def test_default_rate_steps_down_to_what_fits(finn_env, exports, tmp_path):
    """No rate asked and the default does not fit the board: FINN's estimates at slower rates pick the
    fastest one that fits (a fixed rate used to end in "does not fit" where a slower folding fits)."""
    from bitfold.boards import load_board
    from bitfold.export.finn.backend import build as finn_build
    from bitfold.hw_models.finn_rules import DEFAULT_FPS
    b = load_board("pynq-z2")
    finn_build(Path(exports["mlp"]), b, tmp_path / "d", verify=False, bitstream=False, rtl_sim=False)
    lut = json.loads((tmp_path / "d" / "build.json").read_text())["totals"]["LUT"]
    src = Path(__file__).parents[2] / "boards" / "pynq-z2.toml"
    small = tmp_path / "small.toml"
    small.write_text(src.read_text().replace('name = "pynq-z2"', 'name = "pynq-z2-small"')
                     .replace("lut = 53200", f"lut = {int(lut) - 1}"))
    finn_build(Path(exports["mlp"]), load_board(str(small)), tmp_path / "s", verify=False, bitstream=False,
               rtl_sim=False)
    info = json.loads((tmp_path / "s" / "build.json").read_text())
    assert info["fits"] and info["totals"]["LUT"] < lut and info["target_fps"] < DEFAULT_FPS
    tried = info["rate_search"]
    assert tried[0] == {**tried[0], "fps": DEFAULT_FPS, "fits": False}
    assert any(t["fits"] and t["fps"] == info["target_fps"] for t in tried)
    assert all(not t["fits"] for t in tried if t["fps"] > info["target_fps"])


def test_rate_search_logic(monkeypatch, tmp_path):
    """The search alone, over a stand-in for FINN's estimates (LUT grows with the rate; FINN stops
    getting faster at 1.6 M/s): up (--target-fps 0), down, and nothing fits."""
    from bitfold.boards import load_board
    from bitfold.export.finn import backend as be

    def fake(req, env=None):
        f = req["target_fps"]
        reached = min(f, 1_600_000)
        return {"estimates": {"estimate_layer_resources": {"MVAU_hls_0": {"LUT": 1000 + reached / 100}},
                              "estimate_network_performance": {"estimated_throughput_fps": reached}}}
    monkeypatch.setattr(be, "run_worker", fake)
    b = load_board("pynq-z2")                                    # 53,200 LUT: fits up to ~5.2 M/s
    fps, tried = be.rate_search({"onnx": "m.onnx"}, None, b, tmp_path, up=True)
    assert fps == 1_600_000 and [t["fps"] for t in tried] == [100_000, 400_000, 1_600_000, 6_400_000]
    fps, tried = be.rate_search({"onnx": "m.onnx"}, None, b, tmp_path, up=False,
                                known={"fits": False, "totals": {"LUT": 6e4, "BRAM_18K": 0, "DSP": 0},
                                       "performance": {"estimated_throughput_fps": 100_000}})
    assert [t["fps"] for t in tried] == [100_000, 25_000, 50_000, 70_711, 84_090] and fps == 84_090
    monkeypatch.setattr(be, "summarize", lambda res, board: {"fits": False, "totals": {"LUT": 9e9, "BRAM_18K": 0, "DSP": 0},
                                                              "performance": {}})
    with pytest.raises(BitfoldError, match="does not fit pynq-z2 at any rate"):
        be.rate_search({"onnx": "m.onnx"}, None, b, tmp_path, up=False)
    # the resource that does not fit is named (LFC W1A2's weights need more block RAM than a pynq-z2 has;
    # the message used to quote its 2,827 LUT only)
    monkeypatch.setattr(be, "summarize", lambda res, board: {
        "fits": False, "totals": {"LUT": 2827, "BRAM_18K": 400, "DSP": 0},
        "budget": {"LUT": 53200, "BRAM_18K": 280, "DSP": 220}, "performance": {}})
    with pytest.raises(BitfoldError, match="400 BRAM_18K of 280"):
        be.rate_search({"onnx": "m.onnx"}, None, b, tmp_path, up=False)


@pytest.mark.parametrize("bits", ["w1a1:all", "w1a2:all"])
def test_finn_classic_tfc_with_bipolar_activations_builds(finn_env, tmp_path, bits):
    """FINN's TFC at FINN's widths, trained by bitfold: the 1-bit activations (and the W1A1 input) are
    BipolarQuant at scale 1, which FINN converts (it refused bitfold's learned-scale ones: "FINN only
    supports Bipolar identity activations ... the scaling must be 1"); every step verified."""
    import onnx
    from onnx import numpy_helper
    from bitfold.export.backends import build
    from bitfold.export.onnx_export import export_run
    from bitfold.toolchain.runs import TrainConfig
    from bitfold.toolchain.train import train
    train(TrainConfig(model="tfc", bits=bits, method="fixed", epochs=1), tmp_path / "run", progress=False)
    path = export_run(tmp_path / "run", "qonnx", tmp_path / "tfc.onnx").path
    g = onnx.load(path).graph
    init = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    acts = [n for n in g.node if n.op_type == "BipolarQuant" and n.input[0] not in init]
    assert len(acts) == (4 if bits == "w1a1:all" else 0)
    assert all(init[n.input[1]].tolist() == [1.0] for n in acts)
    build(path, "pynq-z2", tmp_path / "b", bitstream=False)
    info = json.loads((tmp_path / "b" / "build.json").read_text())
    assert info["status"] == "ok" and len(info["verification"]) == 9
    assert all(c["passed"] and c["argmax_agreement"] >= 0.99 for c in info["verification"].values())
    assert len([r for r in info["layers"] if r["type"].startswith("MVAU")]) == 4
