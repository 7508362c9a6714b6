"""ADQ: codebook init/EMA, Fisher allocation, snapped + index-form exports, exact resume."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bitfold.export.index_form import export_index_run
from bitfold.export.onnx_export import export_run
from bitfold.hw_models.cost import weight_bits
from bitfold.toolchain.adq import CodebookWeight, allocate, assign, quantile_codebook
from bitfold.hw_models.layers import LayerDesc
from bitfold.core.errors import BitfoldError
from bitfold.toolchain.runs import TrainConfig, load_checkpoint
from bitfold.toolchain.train import train


def test_quantile_init_places_equal_counts_per_bin():
    w = torch.randn(4096, generator=torch.Generator().manual_seed(0)) ** 3  # skewed, heavy-tailed
    for bits in (2, 3, 4):
        k = 2 ** bits
        c = quantile_codebook(w, bits)
        edges = torch.quantile(w, torch.linspace(0, 1, k + 1))
        counts = np.histogram(w.numpy(), bins=edges.numpy())[0]
        assert counts.max() - counts.min() <= 2  # equal-count bins ...
        assert all(edges[i] <= c[i] <= edges[i + 1] for i in range(k))  # ... one entry (its median) in each


def test_ema_moves_entries_toward_assigned_means():
    cw = CodebookWeight(2, momentum=0.5).train()
    w = torch.tensor([-2.0, -1.9, -0.1, 0.0, 0.1, 1.0, 1.1, 3.0])
    cw.ema_update(w)  # first call: quantile init, then one EMA step
    before = cw.codebook.clone()
    idx = assign(w, before)
    used = torch.tensor([bool((idx == k).any()) for k in range(4)])
    means = torch.stack([w[idx == k].mean() if used[k] else before[k] for k in range(4)])
    assert not used.all()  # this data leaves one entry without weights: it must stay put
    cw.ema_update(w)
    assert torch.all((cw.codebook - means).abs()[used] < (before - means).abs()[used])
    assert torch.allclose(cw.codebook, 0.5 * before + 0.5 * means, atol=1e-6)


def _desc(name, n):
    return LayerDesc(name, "linear", (n,), (1,), n, 1, (1, 1), (1, 1), 1, n, n, None)


def test_allocation_respects_the_budget_and_favours_the_sensitive_layer():
    g = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(1000, generator=g), "b": torch.randn(1000, generator=g)}
    layers = [_desc("a", 1000), _desc("b", 1000)]
    bm, cost = allocate(layers, weights, {"a": 10.0, "b": 0.1}, weight_bits, budget=8000)
    assert cost <= 8000
    assert bm["a"].w > bm["b"].w
    with pytest.raises(BitfoldError, match="no allocation"):
        allocate(layers, weights, {"a": 1.0, "b": 1.0}, weight_bits, budget=100)


def test_allocation_counts_layer_size_once():
    """Same weight distribution, one layer 100x larger with 10x the Fisher trace, cost = weight bits:
    narrowing the large layer saves 100x the cost for 10x the loss estimate (F * MSE), so it is
    narrowed first. (With the size counted twice - F * MSE * n - the small layer went to 2 bits.)"""
    g = torch.Generator().manual_seed(0)
    weights = {"big": torch.randn(20000, generator=g), "small": torch.randn(200, generator=g)}
    layers = [_desc("big", 20000), _desc("small", 200)]
    bm, _ = allocate(layers, weights, {"big": 10.0, "small": 1.0}, weight_bits, budget=8 * 20200 - 2 * 20000,
                     candidates=(2, 4, 6, 8))
    assert bm["big"].w == 6 and bm["small"].w == 8


def test_init_and_ema_ablations():
    from bitfold.toolchain.adq import ADQMethod, uniform_codebook
    w = torch.tensor([-1.0, -0.9, 0.0, 0.05, 0.1, 2.0])
    assert torch.allclose(uniform_codebook(w, 2), torch.tensor([-1.0, 0.0, 1.0, 2.0]))
    cw = CodebookWeight(2, 0.5, init="uniform")
    cw(w)
    assert torch.allclose(cw.codebook, torch.tensor([-1.0, 0.0, 1.0, 2.0]))
    with pytest.raises(BitfoldError, match="init"):
        ADQMethod(init="kmeans")
    # sign split with an explicit zero, kept at zero by the EMA
    g = torch.Generator().manual_seed(1)
    ws = torch.cat([-torch.rand(300, generator=g), torch.rand(100, generator=g)])
    sc = CodebookWeight(3, 0.5, init="signed")
    sc.ema_update(ws)
    sc.ema_update(ws * 0.7)
    cb = sc.codebook
    assert len(cb) == 8 and int((cb == 0).sum()) == 1 and int((cb < 0).sum()) == 5 and int((cb > 0).sum()) == 2
    from bitfold.toolchain.models import build_model
    m = build_model("mlp", (1, 8, 8), 10, bits="w3a4", method=ADQMethod(ema=False))
    m.train()
    m(torch.randn(4, 1, 8, 8))
    from bitfold.toolchain.quant import compute_layers
    before = [l.parametrizations.weight[0].codebook.clone() for l in compute_layers(m).values()]
    with torch.no_grad():
        for l in compute_layers(m).values():
            l.parametrizations.weight.original.mul_(1.5)
    m.quant_method.after_step(m, 0)
    assert all(torch.equal(b, l.parametrizations.weight[0].codebook) for b, l in zip(before, compute_layers(m).values()))


@pytest.fixture(scope="module")
def adq_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("adq") / "run"
    bits = {"*": {"w": 3, "a": 4}, "convs.0": {"w": 8, "a": 8}, "head": {"w": 8, "a": 8}}
    m = train(TrainConfig(model="cnn", bits=bits, method="adq", epochs=4), out, progress=False)
    return out, m


def test_adq_trains_and_counts_index_bits_for_memory_and_grid_bits_for_bitops(adq_run):
    out, m = adq_run
    assert m["accuracy"] > 0.85
    layer = {r["name"]: r for r in m["layers"]}["convs.1"]
    assert layer["w"] == 3 and layer["arith_w"] == 8
    assert layer["weight_bits"] == 3 * layer["weights"] and layer["bitops"] == layer["macs"] * 8 * 4


@pytest.mark.parametrize("fmt", ["qonnx", "qcdq"])
def test_snapped_grid_exports_verify(adq_run, fmt, tmp_path):
    res = export_run(adq_run[0], fmt, tmp_path / "m.onnx")
    assert res.report.passed and res.bit_map["convs.1"]["w"] == 8  # the arithmetic width reaches the file
    assert abs(res.accuracy["trained"] - res.accuracy["exported"]) <= 0.02


def test_index_form_verifies_and_stores_indices(adq_run, tmp_path):
    import onnx
    path, report, stats = export_index_run(adq_run[0], tmp_path / "i.onnx")
    assert report.passed and report.argmax_agreement >= 0.99
    assert stats["convs.1"] == {"index_bits": 3, "entries": 8, "weights": 32 * 16 * 9}
    m = onnx.load(str(path))
    assert sum(n.op_type == "Gather" for n in m.graph.node) == 4
    idx = next(i for i in m.graph.initializer if i.name == "convs_1_index")
    assert onnx.numpy_helper.to_array(idx).max() < 8
    # the int16 pair-sum check reads the weights the Gathers produce: every layer has its bound
    from bitfold.export.qcdq_safety import pair_sum_bounds
    layers = [n for n in m.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    bounds = pair_sum_bounds(m)
    assert len(bounds) == len(layers) and all(b.safe for b in bounds)
    info = json.loads(Path(str(path) + ".verify.json").read_text())
    assert len(info["int8_pair_sums"]) == len(layers)
    assert {r["executor"] for r in info["runtimes"]} >= {"onnxruntime default session"}


def test_resume_keeps_codebooks_bit_exact(tmp_path):
    cfg = TrainConfig(model="mlp", bits="w3a4", method="adq", epochs=2, batch_size=128)
    train(cfg, tmp_path / "full", progress=False)

    class Stop(Exception):
        pass

    def stop(epoch, _):
        raise Stop

    with pytest.raises(Stop):
        train(cfg, tmp_path / "split", progress=False, on_epoch=stop)
    train(cfg, tmp_path / "split", resume=True, progress=False)
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")["model"]
    books = [k for k in a if k.endswith("codebook")]
    assert books
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_allocate_then_continue_training(adq_run, tmp_path):
    from bitfold.toolchain.adq import allocate_run
    r = allocate_run(adq_run[0], "weight_bits", 85000, out_path=tmp_path / "alloc.json")
    assert r["final_cost"] <= 85000
    m = train(TrainConfig(model="cnn", bits=json.loads((tmp_path / "alloc.json").read_text()), method="adq",
                          epochs=1, init_from=str(adq_run[0])), tmp_path / "r2", progress=False)
    assert m["accuracy"] > 0.85
    with pytest.raises(BitfoldError, match="--cost weight_bits"):
        allocate_run(adq_run[0], "bitops", 1e6)


def test_nonuniform_activations_levels_and_generalised_ste():
    """act=nonuniform: ReLU, nearest of 2^b learned levels (0 fixed); the input's gradient passes up to
    the top level and is cut above; each level gets the summed gradient of its outputs."""
    from bitfold.toolchain.adq import NonUniformAct
    q = NonUniformAct(2)
    with torch.no_grad():
        q.levels.copy_(torch.tensor([0.5, 1.0, 3.0]))
    q.initialized.fill_(True)
    x = torch.tensor([-1.0, 0.2, 0.3, 0.8, 1.9, 2.1, 3.0, 5.0], requires_grad=True)
    y = q(x)
    assert y.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0, 3.0, 3.0, 3.0]   # thresholds 0.25, 0.75, 2.0
    g = torch.arange(1.0, 9.0)
    y.backward(g)
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 0.0]  # cut by the ReLU below 0, above 3.0
    assert q.levels.grad.tolist() == [3.0, 4.0 + 5.0, 6.0 + 7.0 + 8.0]


def test_nonuniform_activations_train_and_refuse_export(tmp_path):
    from bitfold.toolchain.adq import NonUniformAct
    m = train(TrainConfig(model="mlp", bits="w3a3", method="adq", epochs=1, subset=(256, 128),
                          method_options={"act": "nonuniform"}), tmp_path / "nu", progress=False)
    assert m["accuracy"] > 0.3
    sd = load_checkpoint(tmp_path / "nu" / "checkpoint.pt")["model"]
    lv = [v for k, v in sd.items() if k.endswith(".levels")]
    assert lv and {len(v) for v in lv} == {7, 255}      # 2^3 - 1 per hidden site; the head reads 8 bits
    with pytest.raises(BitfoldError, match="non-uniform activations"):
        export_run(tmp_path / "nu", "qcdq", tmp_path / "nu.onnx")
    assert not (tmp_path / "nu.onnx").exists()
    with pytest.raises(BitfoldError, match="unknown ADQ activation quantizer"):
        train(TrainConfig(model="mlp", method="adq", epochs=1, subset=(64, 32), method_options={"act": "log"}),
              tmp_path / "bad", progress=False)
    assert NonUniformAct(2).levels.shape == (3,)
