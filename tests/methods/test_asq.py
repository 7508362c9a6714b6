"""ASQ: POST weight levels, adaptive activation step, folded / dynamic / index exports."""
import math

import pytest
import torch

from bitfold.export.dynamic import export_dynamic_run
from bitfold.export.index_form import export_index_run
from bitfold.export.onnx_export import export_run
from bitfold.toolchain.asq import ASQAct, POSTWeight
from bitfold.core.errors import BitfoldError
from bitfold.toolchain.runs import TrainConfig
from bitfold.toolchain.train import train


def test_post_levels_are_signed_powers_of_sqrt2_with_zero():
    p = POSTWeight(4)
    w = torch.randn(64, 32)
    q = p(w)
    assert len(p.unit_levels) == 2 ** 4 - 1 and float(p.unit_levels.abs().min()) == 0.0
    mags = sorted({round(float(v), 6) for v in p.unit_levels.abs() if v > 0})
    assert all(math.isclose(b / a, math.sqrt(2), rel_tol=1e-5) for a, b in zip(mags, mags[1:]))
    alpha = float(p.alpha)
    assert alpha == pytest.approx(float(w.abs().max()))
    allowed = {round(alpha * float(v), 5) for v in p.unit_levels}
    assert {round(float(v), 5) for v in q.unique()} <= allowed
    q.sum().backward()  # alpha learns through the level values
    assert p.alpha.grad is not None and float(p.alpha.grad) != 0.0


def test_uniform_level_ablation_is_an_evenly_spaced_grid_of_the_same_size():
    """levels=uniform (the ablation): as many levels as POST, evenly spaced, zero included, alpha learned."""
    for bits in (2, 3, 4):
        lv = POSTWeight(bits, None).unit_levels
        assert len(lv) == len(POSTWeight(bits).unit_levels) == 2 ** bits - 1
        assert torch.allclose(lv[1:] - lv[:-1], torch.full((len(lv) - 1,), 2.0 / (len(lv) - 1)), atol=1e-6)
        assert float(lv.abs().min()) == 0.0 and float(lv.max()) == 1.0


def test_asq_activation_step_adapts_and_learns():
    torch.manual_seed(0)
    act = ASQAct(4, signed=False)
    x = torch.rand(8, 4, 5, 5) * 3
    y = act(x)
    s = float(act.log_s.exp())
    assert torch.allclose(act.beta(x), torch.ones(8, 1, 1, 1))  # zero-initialised adapter: beta = 1
    ints = y / s
    # (c * s) / s is c only to within a rounding of float32: the same tolerance on the top code
    assert torch.allclose(ints, ints.round(), atol=1e-4) and float(ints.max()) <= 15 + 1e-4
    (y ** 2).sum().backward()
    assert act.log_s.grad is not None and act.adapter[2].weight.grad.abs().sum() > 0
    off = ASQAct(4, signed=True, adapter=False)
    assert torch.equal(off.beta(x), torch.ones(8, 1, 1, 1))


@pytest.fixture(scope="module")
def asq_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("asq") / "run"
    m = train(TrainConfig(model="cnn", bits="w4a4", method="asq", epochs=4), out, progress=False)
    return out, m


def test_metrics_show_lut_width_and_adapter_ops(asq_run):
    layer = {r["name"]: r for r in asq_run[1]["layers"]}["convs.1"]
    assert layer["w"] == 4 and layer["arith_w"] == 8 and layer["adapter_macs"] == 2 * 8 + 8 * 1
    assert asq_run[1]["accuracy"] > 0.85


@pytest.mark.parametrize("fmt", ["qonnx", "qcdq"])
def test_folded_exports_verify(asq_run, fmt, tmp_path):
    res = export_run(asq_run[0], fmt, tmp_path / "f.onnx")
    assert res.report.passed and res.report.argmax_agreement >= 0.99
    assert abs(res.accuracy["trained"] - res.accuracy["exported"]) <= 0.03  # folding beta + 8-bit LUT grid


def test_dynamic_and_index_exports_verify(asq_run, tmp_path):
    import onnx
    path, report, acc = export_dynamic_run(asq_run[0], tmp_path / "d.onnx")
    assert report.passed and acc > 0.85
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Round", "Sigmoid", "Clip"} <= ops
    _, rep2, stats = export_index_run(asq_run[0], tmp_path / "i.onnx")
    assert rep2.passed and stats["convs.1"]["entries"] == 15


def test_one_bit_post_is_refused():
    from bitfold.toolchain.models import build_model
    with pytest.raises(BitfoldError, match="cannot quantize weights"):
        build_model("cnn", (1, 8, 8), 10, bits="w1a4", method="asq")


def test_ablation_options_from_the_cli(tmp_path, capsys):
    """--opt reaches the method: POT levels are powers of 2; an unknown option is one clear error."""
    from bitfold.cli import main
    from bitfold.toolchain.asq import POSTWeight
    from bitfold.toolchain.quant import get_method
    assert get_method("asq", levels="pot").levels == "pot" and not get_method("asq", adapter=False).adapter
    lv = POSTWeight(3, base=2.0).unit_levels
    assert torch.allclose(lv, torch.tensor([-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0]))
    with pytest.raises(SystemExit) as e:
        main(["train", "--method", "asq", "--opt", "foo=1", "--epochs", "1", "-o", str(tmp_path / "r")])
    assert e.value.code != 0 and "does not take option(s) foo" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("path", ["c++ node", "python node", "operations"])
@pytest.mark.parametrize("signed,shape", [(False, (16, 8, 6, 6)), (True, (16, 20))])
def test_fused_activation_step_equals_the_plain_expression(signed, shape, path, monkeypatch):
    """ASQAct's training step (one autograd node: in C++, or the Python one on its compiled pass, or on
    its tensor operations) gives the output and every gradient - input, step, adapter - of
    clamp(round(x / (s * beta)), n, p) * s through autograd, bit for bit."""
    import copy

    from bitfold.toolchain import qkernels
    from bitfold.toolchain.asq import _RoundSTE
    monkeypatch.setattr(qkernels, "_enabled", path != "operations")
    monkeypatch.setattr(qkernels, "_nodes", path == "c++ node")
    assert qkernels.available() == (path != "operations"), qkernels.status()
    assert (qkernels.ops_for(torch.zeros(1)) is not None) == (path == "c++ node"), qkernels.status()
    torch.manual_seed(0)
    a = ASQAct(3, signed=signed)
    x0 = torch.randn(*shape) * 2
    a(x0.clone())                      # the step's initialisation
    with torch.no_grad():              # a working adapter (its last layer starts at zero)
        a.adapter[2].weight.normal_()
        a.adapter[2].bias.normal_()
    b = copy.deepcopy(a)
    g = torch.randn(*shape)
    for x_grad in (True, False):      # an activation, and the network's input (no gradient to it)
        a.zero_grad()
        b.zero_grad()
        x1, x2 = x0.clone().requires_grad_(x_grad), x0.clone().requires_grad_(x_grad)
        out = a(x1)
        # the whole step as one C++ node (bitfold_q.asq_site) where the nodes are on
        assert ("ASQSite" in out.grad_fn.name()) == (path == "c++ node"), out.grad_fn.name()
        (out * g).sum().backward()
        s = b.log_s.exp()
        ref = torch.clamp(_RoundSTE.apply(x2 / (s * b.beta(x2))), b.n, b.p) * s
        (ref * g).sum().backward()
        assert torch.equal(out, ref)
        assert torch.equal(x1.grad, x2.grad) if x_grad else x1.grad is None and x2.grad is None
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(a.parameters(), b.parameters()))
        assert (ref == b.p * s).any() and all(float(p.grad.abs().sum()) > 0 for p in a.parameters())
        assert not x_grad or float(x1.grad.abs().sum()) > 0     # the clamp bites; every gradient is there



@pytest.mark.parametrize("threads", [1, 2])
def test_adapter_statistics_node_equals_the_tensor_operations(threads):
    """The adapter's per-sample statistics in C++ (bitfold_q.row_stats: mean |x| and std, sums in double)
    equal the tensor operations (the fallback, and what the export traces) within float rounding, values
    and input gradient - a row of zero spread (std 0: only mean |x| passes a gradient) and a row of zeros
    included, a channels-last activation flattened, the rows split over 2 threads - and are closer to a
    float64 reference than those operations."""
    from bitfold.toolchain import qkernels
    from bitfold.toolchain.asq import row_std
    ops = qkernels.ops()
    assert ops is not None, qkernels.status()
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(6)
        x = torch.randn(40, 16, 14, 14).contiguous(memory_format=torch.channels_last) * 3 + 1   # 3136 per row
        x[1] = 0.25
        x[2] = 0.0
        g = torch.randn(40, 2)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        a = ops.row_stats(x1.flatten(1))
        f2 = x2.flatten(1)
        b = torch.stack([f2.abs().mean(1), row_std(f2)], 1)
        (a * g).sum().backward()
        (b * g).sum().backward()
        assert a.shape == (40, 2) and x1.grad.shape == x.shape
        assert torch.allclose(a, b, rtol=1e-6, atol=0) and float(a[1, 1]) == 0.0 and float(a[2, 0]) == 0.0
        assert torch.allclose(x1.grad, x2.grad, rtol=1e-5, atol=1e-9) and float(x1.grad.abs().sum()) > 0
        assert torch.equal(x1.grad[1], torch.full_like(x1.grad[1], float(g[1, 0]) / 3136))   # abs path only
        ref = x.double().flatten(1)
        ref = torch.stack([ref.abs().mean(1), ref.std(1)], 1)
        assert (a.double() - ref).abs().max() <= (b.double() - ref).abs().max()
    finally:
        torch.set_num_threads(prev)


def test_adapter_direct_operations_equal_the_module_path():
    """In training on the CPU the adapter runs as one C++ node (bitfold_q.asq_adapter, no module calls):
    beta, the adapter's gradients and the input's equal the module path's (taken when a hook is
    registered) bit for bit."""
    import copy
    from bitfold.toolchain import qkernels
    from bitfold.toolchain.asq import ASQAct
    assert qkernels.ops() is not None, qkernels.status()
    torch.manual_seed(0)
    a = ASQAct(4, False)
    torch.nn.init.normal_(a.adapter[2].weight)
    b = copy.deepcopy(a)
    calls = []
    b.adapter.register_forward_hook(lambda *args: calls.append(1))
    x0 = torch.randn(64, 300).relu()
    for x_grad in (False, True):
        xa, xb = x0.clone().requires_grad_(x_grad), x0.clone().requires_grad_(x_grad)
        oa, ob = a.beta(xa), b.beta(xb)
        g = torch.randn_like(oa)
        oa.backward(g)
        ob.backward(g)
        assert calls == [1] * (1 + x_grad) and torch.equal(oa, ob)
        assert "ASQAdapter" in oa.grad_fn.next_functions[0][0].name()   # the C++ node ran
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(a.adapter.parameters(), b.adapter.parameters()))
        assert not x_grad or torch.equal(xa.grad, xb.grad)
