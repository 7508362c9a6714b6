"""The fused training path of fixed-width quantizers is bit-identical to Brevitas's own modules:
outputs, gradients, trained weights, exported files - for every method (each fuses the quantizers
it leaves fixed, and keeps Brevitas for its own)."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

from bitfold.toolchain.fastquant import fast_quant
from bitfold.toolchain.models import build_model
from bitfold.toolchain.runs import TrainConfig, load_checkpoint
from bitfold.toolchain.train import init_activation_stats, train


def _grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def _steps_equal(ref, fast, x, y, steps=3):
    """``steps`` Adam steps of both models (``fast`` inside its fast_quant block): outputs and every
    gradient equal bit for bit at each; returns the last step's gradients of ``ref``."""
    opt_r, opt_f = torch.optim.Adam(ref.parameters(), 1e-2), torch.optim.Adam(fast.parameters(), 1e-2)
    for _ in range(steps):
        outs = []
        for m, opt in ((ref, opt_r), (fast, opt_f)):
            opt.zero_grad()
            outs.append(m(x))
            F.cross_entropy(outs[-1], y).backward()
        assert torch.equal(*outs)
        g_r, g_f = _grads(ref), _grads(fast)
        assert g_r.keys() == g_f.keys()
        for k in g_r:
            assert torch.equal(g_r[k], g_f[k]), k
        opt_r.step(), opt_f.step()
    return g_r


@pytest.mark.parametrize("model,shape,bits,per_channel", [
    ("mlp", (1, 8, 8), "w4a4", False), ("cnn", (1, 8, 8), "w2a3", True), ("cnn", (1, 8, 8), "w8a8:all", False),
    ("resnet20", (3, 8, 8), "w3a5", True)])
def test_fused_step_equals_brevitas_bit_for_bit(model, shape, bits, per_channel):
    torch.manual_seed(0)
    x, y = torch.randn(16, *shape) * 3, torch.randint(0, 10, (16,))  # wide inputs: activation clamps bite
    ref = build_model(model, shape, 10, bits=bits, method="fixed", per_channel=per_channel)
    init_activation_stats(ref, x, 16)
    fast = copy.deepcopy(ref)
    with fast_quant(fast) as report:
        n_quant = len(report.fused) + len(report.brevitas)
        assert report.fused and not report.brevitas, report.summary()
        _steps_equal(ref, fast, x, y)
        sd_r, sd_f = ref.state_dict(), fast.state_dict()
        assert sd_r.keys() == sd_f.keys() and all(torch.equal(sd_r[k], sd_f[k]) for k in sd_r)
        # a copy made inside the block runs Brevitas (the plans belong to the originals)
        twin = copy.deepcopy(fast)
        assert torch.equal(twin(x), fast(x))
    assert all(type(a) is type(b) for a, b in zip(fast.modules(), ref.modules()))
    assert n_quant >= 4


def test_the_comparison_sees_a_wrong_gradient(monkeypatch):
    """The check above can fail: a fused backward that returns g instead of (g * s) / s differs."""
    import bitfold.toolchain.fastquant as fq
    orig = fq._QuantFromValue.backward

    def sloppy(ctx, g):
        gx, gs, *rest = orig(ctx, g)
        return (g if gx is not None else None), gs, *rest
    monkeypatch.setattr(fq._QuantFromValue, "backward", staticmethod(sloppy))
    monkeypatch.setattr(fq, "_native", lambda x, thr: None)      # the Python Functions, not the C++ nodes
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 8, 8) * 3, torch.randint(0, 10, (16,))
    ref = build_model("cnn", (1, 8, 8), 10, bits="w3a3", method="fixed")
    init_activation_stats(ref, x, 16)
    fast = copy.deepcopy(ref)
    F.cross_entropy(ref(x), y).backward()
    with fast_quant(fast):
        F.cross_entropy(fast(x), y).backward()
    assert not all(torch.equal(a, b) for a, b in zip(_grads(ref).values(), _grads(fast).values()))


#: quantizers fused in the digits CNN (4 compute layers, 4 activation sites): the fixed method's and
#: MEBQAT's all (its widths are switched, not learned); ADQ's activation sites (its weights are codebook
#: parametrizations); AdaQAT's widths are learned and ASQ's quantizers are its own: they keep Brevitas
FUSED = {"fixed": 8, "adq": 4, "asq": 0, "adaqat": 8, "mebqat": 8}
#: layers without a weight quantizer of their own (ADQ's and ASQ's codebook weights are parametrizations):
#: their training forward runs F.conv/F.linear directly, not through Brevitas's forward
DIRECT = {"adq": 4, "asq": 4}


@pytest.mark.parametrize("method", sorted(FUSED))
def test_every_method_trains_and_exports_identically(tmp_path, method):
    from bitfold.export.onnx_export import export_run
    cfg = TrainConfig(model="cnn", bits="w3a3", method=method, epochs=1, subset=(256, 64), batch_size=64)
    runs = {}
    for fast in (True, False):
        out = tmp_path / f"{method}_{fast}"
        m = train(cfg, out, progress=False, fast_quant=fast)
        runs[fast] = out
        if fast:
            assert len(m["fast_quant"]["fused"]) == FUSED[method], m["fast_quant"]
            assert len(m["fast_quant"]["direct"]) == DIRECT.get(method, 0), m["fast_quant"]
            if FUSED[method]:
                assert m["fast_quant"]["kernels"] == "compiled quantizer kernels: on, autograd nodes in C++", m["fast_quant"]
        else:
            assert m["fast_quant"]["fused"] == [] and m["fast_quant"]["direct"] == []
    a, b = (load_checkpoint(runs[f] / "checkpoint.pt") for f in (True, False))
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["history"] == b["history"]
    fa = export_run(runs[True], "qonnx", tmp_path / "a.onnx")
    fb = export_run(runs[False], "qonnx", tmp_path / "b.onnx")
    pa, pb = (getattr(f, "path", f) for f in (fa, fb))
    assert open(pa, "rb").read() == open(pb, "rb").read()


@pytest.mark.parametrize("method", ["adq", "asq"])
def test_direct_layers_call_their_parametrization_as_torch_does(method):
    """A direct layer's weight is its one parametrization called on the original (not the property): the
    same output and gradients as Brevitas's path; hooks on the parametrization itself still run, and a
    hook on the parametrization list or torch's parametrization cache sends the layer through the
    property (the hook runs, the cached weight is used)."""
    import torch.nn.utils.parametrize as P
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8)
    m = build_model("mlp", (1, 8, 8), 10, bits="w4a4", method=method)
    init_activation_stats(m, x, 16)
    m.train()
    ref = m(x)
    gref = torch.autograd.grad(ref.sum(), list(m.parameters()), allow_unused=True)
    layer = m.fcs[0]
    calls = {"param": 0, "list": 0}
    layer.parametrizations.weight[0].register_forward_hook(lambda *a: calls.__setitem__("param", calls["param"] + 1))
    with fast_quant(m) as rep:
        assert len(rep.direct) == 4, rep
        out = m(x)
        g = torch.autograd.grad(out.sum(), list(m.parameters()), allow_unused=True)
        assert torch.equal(out, ref) and all((a is None and b is None) or torch.equal(a, b) for a, b in zip(g, gref))
        assert calls["param"] == 1
        h = layer.parametrizations.weight.register_forward_hook(lambda *a: calls.__setitem__("list", calls["list"] + 1))
        assert torch.equal(m(x), ref) and calls == {"param": 2, "list": 1}
        h.remove()
        with P.cached():
            assert torch.equal(m(x), ref) and torch.equal(m(x), ref)
        assert calls == {"param": 3, "list": 1}    # the cache: one call for both forwards
        class Roll(torch.nn.Module):
            def forward(self, w):
                return w.roll(1, -1)

        P.register_parametrization(layer, "weight", Roll())      # a second one: the property (inputs moved by one)
        calls["param"] = 0                                        # (registering computed the weight)
        assert not torch.equal(m(x), ref) and calls == {"param": 1, "list": 1}


def test_compiled_steps_forward_equals_eager_and_report_counts_graphs(tmp_path):
    """--compile inductor: the first training-mode forward equals the eager fused one bit for bit (the
    backward is where inductor rounds differently - not asserted equal); a run records its graphs."""
    from bitfold.toolchain.train import compile_steps
    torch.manual_seed(0)
    x = torch.randn(32, 1, 8, 8) * 3
    m = build_model("mlp", (1, 8, 8), 10, bits="w4a4", method="fixed")
    init_activation_stats(m, x, 32)
    with fast_quant(m):
        ref = m(x)
        net, info = compile_steps(m, "inductor")
        assert net is not m and info["backend"] == "inductor"
        assert torch.equal(net(x), ref)
    met = train(TrainConfig(model="mlp", bits="w4a4", epochs=1, subset=(256, 128), compile="inductor"),
                tmp_path / "c", progress=False)
    assert met["compile"]["graphs"] >= 1 and not met["compile"]["eager"], met["compile"]
    assert json.loads((tmp_path / "c" / "config.json").read_text())["compile"] == "inductor"


def test_compile_falls_back_to_eager_when_the_backend_fails(tmp_path):
    """A backend that raises: dynamo runs the code eagerly, the run says so, and its weights are those of
    the eager run bit for bit; an unknown backend name is refused before any work."""
    import torch._dynamo

    from bitfold.core.errors import BitfoldError

    @torch._dynamo.register_backend
    def bitfold_test_failing_backend(gm, example_inputs):
        raise RuntimeError("this backend always fails")

    cfg = dict(model="mlp", bits="w4a4", epochs=1, subset=(256, 128))
    met = train(TrainConfig(**cfg, compile="bitfold_test_failing_backend"), tmp_path / "f", progress=False)
    assert met["compile"]["eager"] and met["compile"]["graphs"] == 0, met["compile"]
    train(TrainConfig(**cfg), tmp_path / "e", progress=False)
    a, b = load_checkpoint(tmp_path / "f" / "checkpoint.pt")["model"], load_checkpoint(tmp_path / "e" / "checkpoint.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(BitfoldError, match="no such backend"):
        train(TrainConfig(**cfg, compile="no-such-backend"), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("per_channel", [False, True])
def test_weight_statistic_ties_route_the_gradient_as_autograd_does(per_channel):
    """Weights whose largest magnitude occurs several times (per tensor: autograd spreads the max's
    gradient evenly over the ties; per channel: to the one index torch.max returns)."""
    torch.manual_seed(1)
    x, y = torch.randn(16, 1, 8, 8) * 3, torch.randint(0, 10, (16,))
    ref = build_model("mlp", (1, 8, 8), 10, bits="w3a3", method="fixed", per_channel=per_channel)
    init_activation_stats(ref, x, 16)
    with torch.no_grad():
        for layer in ref.fcs:
            w = layer.weight
            top = float(w.abs().max()) * 1.5
            w[0, 0], w[0, 3], w[1, 1], w[2, 5] = top, -top, -top, top   # ties, in one row and across rows
    fast = copy.deepcopy(ref)
    F.cross_entropy(ref(x), y).backward()
    with fast_quant(fast) as report:
        assert len(report.fused) == 8
        F.cross_entropy(fast(x), y).backward()
    g_r, g_f = _grads(ref), _grads(fast)
    assert g_r.keys() == g_f.keys() and all(torch.equal(g_r[k], g_f[k]) for k in g_r)
    a = ref.fcs[0].weight.abs()
    assert int((a == a.max()).sum()) == 4   # the set-up has its ties


@pytest.mark.parametrize("model,shape", [("mlp", (1, 8, 8)), ("cnn", (1, 8, 8))])
def test_learned_widths_fused_equal_brevitas(model, shape):
    """AdaQAT's quantizers (learned widths, normalised weights): fused, the outputs and every gradient -
    the widths' included - equal Brevitas's bit for bit over three steps."""
    from bitfold.toolchain.describe import describe_layers
    torch.manual_seed(0)
    x, y = torch.randn(16, *shape) * 3, torch.randint(0, 10, (16,))
    ref = build_model(model, shape, 10, bits="w4a4", method="adaqat")
    init_activation_stats(ref, x, 16)
    fast = copy.deepcopy(ref)
    for m in (ref, fast):
        m.quant_method.setup(m, describe_layers(m, shape))
    with fast_quant(fast) as report:
        assert len(report.fused) == 8 and not report.brevitas, report.summary()
        g_r = _steps_equal(ref, fast, x, y)
    widths = [k for k in g_r if k.endswith(".n")]
    assert widths and any(float(g_r[k].abs()) > 0 for k in widths)   # the widths' gradients are compared
    assert all(type(a) is type(b) for a, b in zip(fast.modules(), ref.modules()))


def test_compiled_learned_widths_stay_on_brevitas_and_forward_equals_eager():
    """Under torch.compile the trainer leaves AdaQAT's learned-width quantizers to Brevitas
    (``learned=False``: dynamo traced the swapped classes into another layer's weight); the compiled
    forward then equals the eager one bit for bit."""
    from bitfold.toolchain.describe import describe_layers
    from bitfold.toolchain.train import compile_steps
    torch.manual_seed(0)
    x = torch.randn(32, 1, 8, 8) * 3
    m = build_model("mlp", (1, 8, 8), 10, bits="w4a4", method="adaqat")
    init_activation_stats(m, x, 32)
    m.quant_method.setup(m, describe_layers(m, (1, 8, 8)))
    with fast_quant(m, learned=False) as report:
        assert not report.fused and len(report.brevitas) == 8, report.summary()
        ref = m(x)
        net, _ = compile_steps(m, "inductor")
        assert torch.equal(net(x), ref)


def _ties_case(s: float, channels_last_grad: bool):
    """An activation batch with values on rounding ties (k + 1/2 steps of ``s``), beyond both bounds
    and zeros, and a gradient for it (row-major or channels-last)."""
    torch.manual_seed(0)
    x = torch.randn(8, 16, 6, 6) * 3
    x.view(-1)[:200] = (torch.randint(-300, 300, (200,)) + 0.5) * s      # exact rounding ties
    x[:, :2] = 0.0
    g = torch.randn(8, 16, 6, 6)
    return x, (g.contiguous(memory_format=torch.channels_last) if channels_last_grad else g)


def _quant_both_paths(fn, *tensors):
    """Outputs and gradients of ``fn`` with the compiled kernels and with the tensor operations."""
    from bitfold.toolchain import qkernels
    res = []
    for on in (True, False):
        prev = qkernels.set_enabled(on)
        try:
            leaves = [t.detach().clone().requires_grad_(True) for t in tensors[:-1]]
            out = fn(*leaves)
            out.backward(tensors[-1])
            res.append([out.detach()] + [t.grad for t in leaves])
        finally:
            qkernels.set_enabled(prev)
    return res


@pytest.mark.parametrize("relu,lo,hi,ste", [(True, 0.0, 7.0, False), (False, -8.0, 7.0, False),
                                            (False, -7.0, 7.0, True), (True, 0.0, 255.0, False)])
@pytest.mark.parametrize("grad_layout", ["row-major", "channels-last"])
def test_compiled_kernels_equal_the_tensor_operations(relu, lo, hi, ste, grad_layout):
    """The compiled single-pass quantizer (bitfold.toolchain.qkernels) is built here - CI installs the
    C compiler, so a missing one fails - and gives the tensor operations' outputs and gradients bit for
    bit: values on rounding ties (k + 1/2 steps), beyond both bounds, zeros; a gradient in
    channels-last order takes the operations' path (its sums add in that order)."""
    from bitfold.toolchain import fastquant as fq, qkernels
    assert qkernels.available(), qkernels.status()
    value = torch.tensor(1.7)
    s = float(value) / 4.0
    x, g = _ties_case(s, grad_layout == "channels-last")
    assert qkernels.layout(x, torch.tensor(s)) is not None
    a, b = _quant_both_paths(lambda x_, v_: fq._QuantFromValue.apply(x_, v_, relu, 1e-8, 4.0, lo, hi, ste), x, value, g)
    for p, q in zip(a, b):
        assert torch.equal(p, q)


@pytest.mark.parametrize("per_channel", [False, True])
def test_compiled_weight_kernels_equal_the_tensor_operations(per_channel):
    """The weight quantizer with its max-abs statistic through the compiled passes (the statistic's
    gradient to the arg-max per channel, spread over ties per tensor) equals the tensor operations."""
    from bitfold.toolchain import fastquant as fq
    torch.manual_seed(2)
    w = torch.randn(12, 5, 3, 3)
    top = float(w.abs().max()) * 1.2
    w[0, 0, 0, 0], w[0, 1, 1, 1], w[3, 2, 0, 1], w[7, 4, 2, 2] = top, -top, -top, top   # ties
    g = torch.randn_like(w)
    shape = (12, 1, 1, 1) if per_channel else ()
    a, b = _quant_both_paths(lambda w_: fq._QuantFromAbsMax.apply(w_, per_channel, shape, 1e-8, 3.0, -4.0, 3.0, True), w, g)
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def _native_and_python(native, python, *tensors):
    """Outputs and gradients of the C++ autograd node ``native`` and the Python Function ``python``."""
    res = []
    for fn in (native, python):
        leaves = [t.detach().clone().requires_grad_(True) for t in tensors[:-1]]
        out = fn(*leaves)
        out.backward(tensors[-1])
        res.append([out.detach()] + [t.grad for t in leaves])
    return res


@pytest.mark.parametrize("relu,lo,hi,ste", [(True, 0.0, 7.0, False), (False, -8.0, 7.0, False),
                                            (False, -7.0, 7.0, True), (True, 0.0, 255.0, False)])
@pytest.mark.parametrize("layout", ["row-major", "channels-last gradient", "channels-last input"])
def test_cpp_activation_node_equals_the_python_function(relu, lo, hi, ste, layout):
    """The activation quantizer's autograd node in C++ (qautograd.cpp, built here - CI installs g++)
    gives the Python Function's output and gradients bit for bit - ties, both bounds, zeros; a
    channels-last gradient (the operations' path in the backward) and a channels-last input (the
    operations' path throughout)."""
    from bitfold.toolchain import fastquant as fq, qkernels
    ops = qkernels.ops()
    assert ops is not None, qkernels.status()
    value, thr = torch.tensor(1.7), torch.tensor(4.0)
    x, g = _ties_case(float(value) / 4.0, layout == "channels-last gradient")
    if layout == "channels-last input":
        x = x.contiguous(memory_format=torch.channels_last)
    a, b = _native_and_python(lambda x_, v_: ops.quant_value(x_, v_, relu, 1e-8, thr, lo, hi, ste),
                              lambda x_, v_: fq._QuantFromValue.apply(x_, v_, relu, 1e-8, thr, lo, hi, ste), x, value, g)
    for p, q in zip(a, b):
        assert torch.equal(p, q) and p.stride() == q.stride()
    assert float(a[2].abs()) > 0


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("layout", ["row-major", "channels-last gradient", "channels-last weight"])
@pytest.mark.parametrize("ties", [True, False])
def test_cpp_weight_node_equals_the_python_function(per_channel, layout, ties):
    """The max-abs weight quantizer's node in C++ equals the Python Function: output, the weight's
    gradient with the statistic's share (per-channel arg-max, per-tensor ties, or the one maximum the
    forward's pass found), in each layout."""
    from bitfold.toolchain import fastquant as fq, qkernels
    ops = qkernels.ops()
    assert ops is not None, qkernels.status()
    torch.manual_seed(2)
    w = torch.randn(12, 5, 3, 3)
    top = float(w.abs().max()) * 1.2
    if ties:
        w[0, 0, 0, 0], w[0, 1, 1, 1], w[3, 2, 0, 1], w[7, 4, 2, 2] = top, -top, -top, top
    else:   # one maximum, late in the tensor and negative: its gradient is the statistic's whole share
        w[9, 3, 2, 1] = -top
    g = torch.randn_like(w)
    if layout == "channels-last gradient":
        g = g.contiguous(memory_format=torch.channels_last)
    if layout == "channels-last weight":
        w = w.contiguous(memory_format=torch.channels_last)
    shape, thr = ((12, 1, 1, 1) if per_channel else ()), torch.tensor(3.0)
    a, b = _native_and_python(lambda w_: ops.quant_absmax(w_, per_channel, shape, 1e-8, thr, -4.0, 3.0, True),
                              lambda w_: fq._QuantFromAbsMax.apply(w_, per_channel, shape, 1e-8, thr, -4.0, 3.0, True), w, g)
    for p, q in zip(a, b):
        assert torch.equal(p, q) and p.stride() == q.stride()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("x_layout", ["row-major", "column-major", "no gradient"])
def test_cpp_quant_linear_equals_the_weight_node_and_linear(bias, per_channel, x_layout):
    """The weight quantizer and F.linear as one C++ node (bitfold_q.quant_linear) equal the weight's node
    followed by F.linear under autograd: output and the gradients of the input (row- or column-major, or
    none), the weight and the bias."""
    from bitfold.toolchain import qkernels
    ops = qkernels.ops()
    assert ops is not None, qkernels.status()
    torch.manual_seed(4)
    x0 = torch.randn(24, 40) if x_layout != "column-major" else torch.randn(40, 24)
    w0, b0, g = torch.randn(12, 40), torch.randn(12), torch.randn(24, 12)
    shape, thr = ((12, 1) if per_channel else ()), torch.tensor(7.0)
    res = []
    for fused in (True, False):
        leaf = x0.clone().requires_grad_(x_layout != "no gradient")
        x = leaf.t() if x_layout == "column-major" else leaf[:]    # a view: its gradient as the node returns it
        seen = []
        if leaf.requires_grad:
            x.register_hook(seen.append)
        w, b = w0.clone().requires_grad_(), (b0.clone().requires_grad_() if bias else None)
        if fused:
            out = ops.quant_linear(x, w, b, per_channel, shape, 1e-8, thr, -8.0, 7.0, True)
            assert "QuantLinear" in out.grad_fn.name()
        else:
            out = F.linear(x, ops.quant_absmax(w, per_channel, shape, 1e-8, thr, -8.0, 7.0, True), b)
        out.backward(g)
        res.append([out.detach(), seen[0] if seen else None, w.grad, b.grad if bias else None])
    for p, q in zip(*res):
        assert (p is None and q is None) or (torch.equal(p, q) and p.stride() == q.stride())
    assert (res[0][1] is None) == (x_layout == "no gradient") and float(res[0][2].abs().sum()) > 0


@pytest.mark.parametrize("per_channel", [False, True])
def test_cpp_nodes_split_over_threads_equal_the_python_functions(per_channel):
    """Tensors large enough that the C++ nodes split their passes over torch's threads (2 here) give
    the Python Functions' (single-pass) outputs and gradients bit for bit."""
    from bitfold.toolchain import fastquant as fq, qkernels
    ops = qkernels.ops()
    assert ops is not None, qkernels.status()
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(5)
        x, value, thr = torch.randn(64, 16, 12, 12) * 3, torch.tensor(0.9), torch.tensor(7.0)   # 147 k elements
        g = torch.randn_like(x)
        a, b = _native_and_python(lambda x_, v_: ops.quant_value(x_, v_, True, 1e-8, thr, 0.0, 7.0, False),
                                  lambda x_, v_: fq._QuantFromValue.apply(x_, v_, True, 1e-8, thr, 0.0, 7.0, False), x, value, g)
        assert all(torch.equal(p, q) for p, q in zip(a, b))
        shape = (64, 1, 1, 1) if per_channel else ()
        a, b = _native_and_python(lambda w_: ops.quant_absmax(w_, per_channel, shape, 1e-8, thr, -7.0, 7.0, True),
                                  lambda w_: fq._QuantFromAbsMax.apply(w_, per_channel, shape, 1e-8, thr, -7.0, 7.0, True), x, g)
        assert all(torch.equal(p, q) for p, q in zip(a, b))
    finally:
        torch.set_num_threads(prev)


def test_ordered_sum_is_torchs_sum():
    """The C++ nodes sum a quantizer's scale products inside their backward pass, in the order of torch's
    CPU sum (qautograd.cpp: bfq_sum_ordered at the vector width found by comparison with torch): a width
    is found here, and the ordered sum equals torch.sum bit for bit at lengths across that order's cases
    (vector tails, whole blocks, the level steps at 16, 256 and 4096 blocks) - below torch's grain on 1
    and 2 threads, above it on 1 (where torch's sum does not split)."""
    from bitfold.toolchain import qkernels
    ops = qkernels.ops()
    assert ops is not None, qkernels.status()
    assert ops.ordered_sum_width() in (4, 8, 16, 32)
    prev = torch.get_num_threads()
    torch.manual_seed(11)
    try:
        for th in (1, 2):
            torch.set_num_threads(th)
            lens = [8, 9, 31, 32, 33, 100, 511, 512, 513, 4095, 4096, 4097, 8191, 8192, 8193, 32767, 32768]
            lens += [32769, 50176, 131072 * 2 + 77, 600_000] if th == 1 else []
            for n in lens:
                x = torch.randn(n) * torch.exp(torch.randn(n) * 3)   # magnitudes over ~25 binades
                assert torch.equal(ops.ordered_sum(x), x.sum()), (th, n)
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("threads,shape", [(1, (64, 784)), (2, (63, 520)), (2, (64, 512)), (2, (64, 520))])
def test_cpp_nodes_with_sums_in_the_pass_equal_the_python_functions(threads, shape):
    """The scale products summed inside the backward pass (one scale; on one thread at any size, on two
    up to torch's grain: 63 x 520 = 32,760 and 64 x 512 = 32,768 values) or written and summed by torch
    (two threads at 64 x 520 = 33,280: torch's sum splits there): the Python Functions' gradients bit for bit."""
    from bitfold.toolchain import fastquant as fq, qkernels
    ops = qkernels.ops()
    assert ops is not None, qkernels.status()
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(sum(shape))
        x, value, thr = torch.randn(*shape) * 3, torch.tensor(0.9), torch.tensor(7.0)
        g = torch.randn_like(x) * torch.exp(torch.randn_like(x) * 2)
        a, b = _native_and_python(lambda x_, v_: ops.quant_value(x_, v_, False, 1e-8, thr, -7.0, 7.0, False),
                                  lambda x_, v_: fq._QuantFromValue.apply(x_, v_, False, 1e-8, thr, -7.0, 7.0, False), x, value, g)
        assert all(torch.equal(p, q) for p, q in zip(a, b)) and float(a[2].abs()) > 0
        a, b = _native_and_python(lambda w_: ops.quant_absmax(w_, False, (), 1e-8, thr, -7.0, 7.0, True),
                                  lambda w_: fq._QuantFromAbsMax.apply(w_, False, (), 1e-8, thr, -7.0, 7.0, True), x, g)
        assert all(torch.equal(p, q) for p, q in zip(a, b))
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("relu,unsigned,ste", [(True, True, False), (False, False, False), (False, False, True)])
@pytest.mark.parametrize("layout", ["row-major", "channels-last gradient", "channels-last input"])
def test_cpp_learned_range_node_equals_the_python_function(relu, unsigned, ste, layout):
    """AdaQAT's quantizer node in C++ (tensor scale and bounds with gradients) equals the Python
    Function: output and the gradients of x, the scale and both bounds, in each layout."""
    from bitfold.toolchain import fastquant as fq, qkernels
    ops = qkernels.ops()
    assert ops is not None, qkernels.status()
    torch.manual_seed(3)
    x = torch.randn(15, 8, 5, 5) * 4   # 3,000 values: whole blocks of the ordered sums and a tail
    x.view(-1)[:100] = (torch.randint(-20, 20, (100,)) + 0.5) * 0.37
    s = torch.tensor(0.37)
    lo, hi = (torch.tensor(0.0), torch.tensor(7.0)) if unsigned else (torch.tensor(-4.0), torch.tensor(3.0))
    g = torch.randn_like(x)
    if layout == "channels-last gradient":
        g = g.contiguous(memory_format=torch.channels_last)
    if layout == "channels-last input":
        x = x.contiguous(memory_format=torch.channels_last)
    a, b = _native_and_python(lambda x_, s_, lo_, hi_: ops.quant_range(x_, s_, lo_, hi_, relu, ste, unsigned),
                              lambda x_, s_, lo_, hi_: fq._QuantTensorRange.apply(x_, s_, lo_, hi_, relu, ste, unsigned),
                              x, s, lo, hi, g)
    for p, q in zip(a, b):
        assert (p is None and q is None) or (torch.equal(p, q) and p.stride() == q.stride())
    if not ste:
        assert a[3] is not None and float(a[4].abs()) > 0


#: (kind, signed, narrow, relu, ste, with value, frozen, n trains, value trains): the forms AdaQAT's chain
#: sends to the node - a weight (signed narrow, constant scale, straight-through clamp), a ReLU's unsigned
#: range with a learned value, a signed activation at a frozen width, widths that do not train
_LEARNED_CASES = [("weight", True, True, False, True, False, 0.0, True, False),
                  ("relu act", False, False, True, False, True, 0.0, True, True),
                  ("signed act frozen", True, False, False, False, True, 4.0, True, True),
                  ("relu act, width fixed", False, False, True, False, True, 0.0, False, True),
                  ("weight frozen", True, True, False, True, False, 3.0, True, False)]


@pytest.mark.parametrize("case", _LEARNED_CASES, ids=[c[0] for c in _LEARNED_CASES])
@pytest.mark.parametrize("layout", ["row-major", "channels-last gradient", "channels-last input"])
def test_cpp_quant_learned_equals_the_two_nodes(case, layout):
    """AdaQAT's quantizer as one C++ node (bitfold_q.quant_learned) gives the two nodes it merges
    (learned_scale, then quant_range) bit for bit: the output and the gradients of x, the width and
    the learned value, in each layout (channels-last input: the two nodes themselves run)."""
    from bitfold.toolchain import qkernels
    ops = qkernels.ops()
    assert ops is not None, qkernels.status()
    _, signed, narrow, relu, ste, has_value, frozen, n_trains, v_trains = case
    torch.manual_seed(6)
    x = torch.randn(16, 8, 5, 5) * 3
    g = torch.randn_like(x)
    if layout == "channels-last gradient":
        g = g.contiguous(memory_format=torch.channels_last)
    if layout == "channels-last input":
        x = x.contiguous(memory_format=torch.channels_last)
    consts = (signed, narrow, 0.0 if has_value else 0.41, 1e-6 if has_value else None, 2.0, 8.0, frozen)
    res = []
    for merged in (True, False):
        xl = x.clone().requires_grad_(True)
        n = torch.tensor(4.3).requires_grad_(n_trains)
        v = torch.tensor(1.9).requires_grad_(v_trains) if has_value else None
        if merged:
            out = ops.quant_learned(xl, n, v, *consts, relu, ste)
        else:
            s, lo, hi = ops.learned_scale(n, v, *consts)
            out = ops.quant_range(xl, s, lo, hi, relu, ste, not signed)
        out.backward(g)
        res.append([out.detach(), xl.grad, n.grad, v.grad if v is not None else None])
    for p, q in zip(*res):
        assert (p is None and q is None) or (torch.equal(p, q) and p.stride() == q.stride()), (p, q)
    assert (res[0][2] is not None) == (n_trains and frozen == 0.0)
    with pytest.raises(RuntimeError, match="0-dim float32 CPU"):
        ops.quant_learned(x, torch.tensor([4.0]), None, *consts, relu, ste)   # a width of shape (1,)
    if res[0][2] is not None:
        assert float(res[0][2].abs()) > 0


@pytest.mark.parametrize("case", ["learned", "frozen", "width fixed", "tied maximum", "channels-last gradient",
                                  "channels-last weight", "sums by torch"])
def test_cpp_tanh_learned_equals_the_two_nodes(case):
    """AdaQAT's weight - tanh normalisation, then the learned-width quantizer - as one C++ node
    (bitfold_q.tanh_learned, one pass each way) gives the two nodes it merges (tanh_normalize, then
    quant_learned) bit for bit: the output and the gradients of the weight and the width; a tied
    maximum or a weight in another layout runs the two nodes, a gradient in another layout recomputes
    them under autograd; "sums by torch": 33,280 values on two threads, where the node's products are
    written out and summed by torch rather than in its pass."""
    from bitfold.toolchain import qkernels
    ops = qkernels.ops()
    assert ops is not None, qkernels.status()
    torch.manual_seed(7)
    shape = (64, 520) if case == "sums by torch" else (16, 8, 3, 3)
    prev = torch.get_num_threads()
    if case == "sums by torch":
        torch.set_num_threads(2)
    w0 = torch.randn(*shape) * 0.8
    if case == "tied maximum":
        w0.view(-1)[5] = w0.abs().max() + 1.0
        w0.view(-1)[9] = -w0.view(-1)[5]
    if case == "channels-last weight":
        w0 = w0.contiguous(memory_format=torch.channels_last)
    g = torch.randn(*shape)
    if case == "channels-last gradient":
        g = g.contiguous(memory_format=torch.channels_last)
    frozen = 3.0 if case == "frozen" else 0.0
    consts = (True, True, 1.0)
    res, names = [], []
    try:
        for merged in (True, False):
            w = w0.clone().requires_grad_(True)
            n = torch.tensor(4.3).requires_grad_(case != "width fixed")
            if merged:
                out = ops.tanh_learned(w, n, 1e-8, *consts, 2.0, 8.0, frozen)
            else:
                out = ops.quant_learned(ops.tanh_normalize(w, 1e-8), n, None, *consts, None, 2.0, 8.0, frozen, False,
                                        True)
            names.append(out.grad_fn.name())
            out.backward(g)
            res.append([out.detach(), w.grad, n.grad])
    finally:
        torch.set_num_threads(prev)
    for p, q in zip(*res):
        assert (p is None and q is None) or torch.equal(p, q), (case, p, q)
    one_node = case not in ("tied maximum", "channels-last weight")
    assert names[0].endswith("TanhLearned>") == one_node and "TanhLearned" not in names[1]
    assert (res[0][2] is not None) == (case not in ("frozen", "width fixed"))
    assert res[0][2] is None or float(res[0][2].abs()) > 0


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", ["row-major", "column-major input", "no input gradient", "width fixed", "tied maximum"])
def test_cpp_tanh_learned_linear_equals_the_node_and_linear(bias, case):
    """AdaQAT's weight node and F.linear as one C++ node (bitfold_q.tanh_learned_linear) equal
    tanh_learned followed by F.linear under autograd: output and the gradients of the input (as the node
    returns it, through a hook), the weight, the width and the bias; a tied maximum runs the two."""
    from bitfold.toolchain import qkernels
    ops = qkernels.ops()
    assert ops is not None, qkernels.status()
    torch.manual_seed(8)
    x0 = torch.randn(40, 24) if case == "column-major input" else torch.randn(24, 40)
    w0, b0, g = torch.randn(12, 40) * 0.8, torch.randn(12), torch.randn(24, 12)
    if case == "tied maximum":
        w0[3, 5] = w0.abs().max() + 1.0
        w0[7, 9] = -w0[3, 5]
    res, names = [], []
    for merged in (True, False):
        leaf = x0.clone().requires_grad_(case != "no input gradient")
        x = leaf.t() if case == "column-major input" else leaf[:]
        seen = []
        if leaf.requires_grad:
            x.register_hook(seen.append)
        w, b = w0.clone().requires_grad_(), (b0.clone().requires_grad_() if bias else None)
        n = torch.tensor(4.3).requires_grad_(case != "width fixed")
        if merged:
            out = ops.tanh_learned_linear(x, w, b, n, 1e-8, True, True, 1.0, 2.0, 8.0, 0.0)
        else:
            out = F.linear(x, ops.tanh_learned(w, n, 1e-8, True, True, 1.0, 2.0, 8.0, 0.0), b)
        names.append(out.grad_fn.name())
        out.backward(g)
        res.append([out.detach(), seen[0] if seen else None, w.grad, n.grad, b.grad if bias else None])
    for p, q in zip(*res):
        assert (p is None and q is None) or (torch.equal(p, q) and p.stride() == q.stride()), case
    assert ("TanhLearnedLinear" in names[0]) == (case != "tied maximum")
    assert (res[0][3] is None) == (case == "width fixed") and float(res[0][2].abs().sum()) > 0


@pytest.mark.parametrize("layout", ["channels-last gradient", "channels-last input", "one step per tensor (1,)"])
def test_cpp_asq_step_equals_the_python_node_in_other_layouts(layout):
    """ASQ's activation step in C++ (bitfold_q.asq_step) equals the Python node where the compiled
    pass does not take the tensors: a channels-last gradient (the operations in the backward), a
    channels-last input and a step of shape (1,) (the operations throughout); test_asq compares both
    with the plain expression in row-major order."""
    from bitfold.toolchain import qkernels
    from bitfold.toolchain.asq import _ASQQuantStep
    ops = qkernels.ops()
    assert ops is not None, qkernels.status()
    torch.manual_seed(4)
    x = torch.randn(16, 8, 6, 6) * 2
    s = torch.tensor([0.3]) if layout.startswith("one step") else torch.tensor(0.3)
    beta = torch.rand(16, 1, 1, 1) + 0.5
    g = torch.randn_like(x)
    if layout == "channels-last gradient":
        g = g.contiguous(memory_format=torch.channels_last)
    if layout == "channels-last input":
        x = x.contiguous(memory_format=torch.channels_last)
    a, b = _native_and_python(lambda *t: ops.asq_step(*t, 0.0, 7.0), lambda *t: _ASQQuantStep.apply(*t, 0.0, 7.0),
                              x, s, beta, g)
    for p, q in zip(a, b):
        assert torch.equal(p, q) and p.stride() == q.stride()
    assert float(a[2].abs().sum()) > 0 and float(a[3].abs().sum()) > 0


def test_cpp_node_comparison_sees_a_difference():
    """The comparison above can fail: another clamp (ste off) changes the C++ node's gradient."""
    from bitfold.toolchain import fastquant as fq, qkernels
    ops = qkernels.ops()
    torch.manual_seed(0)
    x, value, thr, g = torch.randn(4, 8) * 9, torch.tensor(1.0), torch.tensor(4.0), torch.randn(4, 8)
    a, b = _native_and_python(lambda x_, v_: ops.quant_value(x_, v_, False, 1e-8, thr, -2.0, 1.0, True),
                              lambda x_, v_: fq._QuantFromValue.apply(x_, v_, False, 1e-8, thr, -2.0, 1.0, False), x, value, g)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])


@pytest.mark.parametrize("relu,unsigned,ste", [(True, True, False), (False, False, False), (False, False, True)])
def test_compiled_learned_range_kernel_equals_the_tensor_operations(relu, unsigned, ste):
    """AdaQAT's quantizer (bounds that are tensors with gradients, from a learned width) through the
    compiled passes: output and the gradients of x, the scale and both bounds equal the operations'."""
    from bitfold.toolchain import fastquant as fq, qkernels
    torch.manual_seed(3)
    x = torch.randn(16, 8, 5, 5) * 4
    s = torch.tensor(0.37)
    x.view(-1)[:100] = (torch.randint(-20, 20, (100,)) + 0.5) * 0.37
    lo, hi = (torch.tensor(0.0), torch.tensor(7.0)) if unsigned else (torch.tensor(-4.0), torch.tensor(3.0))
    g = torch.randn_like(x)
    assert qkernels.layout(x, s) is not None
    a, b = _quant_both_paths(lambda x_, s_, lo_, hi_: fq._QuantTensorRange.apply(x_, s_, lo_, hi_, relu, ste, unsigned),
                             x, s, lo, hi, g)
    for p, q in zip(a, b):
        assert (p is None and q is None) or torch.equal(p, q)
    if not ste:
        assert a[3] is not None and float(a[4].abs()) > 0     # the bounds' gradients are there (and not 0)


@pytest.mark.parametrize("nb", [1, 3, 15, 16, 255, 300, "even 255", "post 126", "post 14", "zero mid"])
def test_compiled_bucketize_equals_torch(nb):
    """ADQ's nearest-entry search at every width (bitfold.toolchain.qkernels.bucketize) gives
    torch.bucketize's index: values on a midpoint (ties go left), just below and above one, +-inf, +-0,
    NaN; random mids, evenly spaced ones (one per cell of the search's table), ASQ's POST levels' (sqrt(2)
    spacing, 8 and 4 bits: mids across 30 binades), a mid at 0."""
    import math
    from bitfold.toolchain import qkernels
    if isinstance(nb, str):
        if nb == "zero mid":
            mids = torch.tensor([-3.0, -1e-30, 0.0, 1e-38, 2.5])
        elif nb == "even 255":
            mids = torch.linspace(-2.0, 2.0, 255)
        else:
            k = (int(nb.split()[1]) + 2) // 4
            mags = torch.tensor([math.sqrt(2) ** -i for i in range(k)])
            lv = torch.cat([-mags, torch.zeros(1), mags.flip(0)]).sort().values * 0.37
            mids = (lv[1:] + lv[:-1]) / 2
        nb = mids.numel()
        torch.manual_seed(nb)
    else:
        torch.manual_seed(nb)
        mids = torch.randn(nb).sort().values
    for n in (4000, 5000):   # the search; from 4096 values on, with more than 31 mids, the cell table
        w = torch.randn(n)
        w[:nb] = mids
        w[nb:2 * nb] = torch.nextafter(mids, torch.tensor(-10.0))
        w[2 * nb:3 * nb] = torch.nextafter(mids, torch.tensor(10.0))
        w[-5:] = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0, float("nan")])
        got = qkernels.bucketize(w.view(n // 100, 100), mids)
        assert got is not None and torch.equal(got, torch.bucketize(w.view(n // 100, 100), mids))


@pytest.mark.parametrize("k", [16, 128, "post 127", "triples", "post 511", "crowded 200"])
def test_compiled_codebook_delta_takes_torchs_entry_at_ties(k):
    """The snap that takes the entry in the same pass (qkernels.codebook_delta: ADQ's codebook, ASQ's POST
    snap) gives ``c[bucketize(w, mids)] - w`` for weights on a midpoint, one ulp either side of it, +-0 and
    NaN, through each search: counted (16 entries), the cell table with one mid per cell (equal cells:
    random entries; log cells: POST's sqrt(2) levels), with 2 or 3 mids in a cell (entries in close
    triples: equal cells; 2^(1/16) levels: log cells), and the binary search (entries crowded at 0)."""
    import math
    from bitfold.toolchain import qkernels

    def post(base, k):
        mags = torch.tensor([base ** -i for i in range(k)])
        return torch.cat([-mags, torch.zeros(1), mags.flip(0)]).sort().values * 0.41

    torch.manual_seed(7)
    if k == "post 127":
        c = post(math.sqrt(2), 63)
    elif k == "post 511":
        c = post(2 ** (1 / 16), 255)
    elif k == "triples":
        c = torch.cat([torch.linspace(-1, 1, 60) + d for d in (0.0, 1e-4, 2e-4)]).sort().values
    elif k == "crowded 200":
        c = torch.cat([torch.randn(100) * 1e-3, torch.randn(100)]).sort().values
    else:
        c = torch.randn(k).sort().values
    mids = (c[1:] + c[:-1]) / 2
    nb = mids.numel()
    w = torch.randn(6000) * float(c.abs().max()) / 2
    w[:nb] = mids
    w[nb:2 * nb] = torch.nextafter(mids, torch.tensor(-10.0))
    w[2 * nb:3 * nb] = torch.nextafter(mids, torch.tensor(10.0))
    w[-4:] = torch.tensor([0.0, -0.0, float("nan"), float("inf")])
    w = w.view(60, 100)
    got = qkernels.codebook_delta(w, c)
    assert got is not None
    ref = c[torch.bucketize(w, mids)] - w
    assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.nan_to_num(), ref.nan_to_num())


@pytest.mark.parametrize("bits,init", [(2, "quantile"), (4, "signed"), (8, "uniform")])
def test_compiled_codebook_passes_equal_the_tensor_operations(bits, init):
    """ADQ's codebook weight and its update (bitfold.toolchain.qkernels.codebook_delta / codebook_ema)
    give the tensor operations' snapped weights and codebooks bit for bit over several steps - index_add_'s
    sums in element order, the update's float expression, the sort, a signed codebook's fixed zero."""
    from bitfold.toolchain import qkernels
    from bitfold.toolchain.adq import CodebookWeight
    torch.manual_seed(bits)
    w = torch.randn(64, 300)
    fast, ref = CodebookWeight(bits, 0.9, init), CodebookWeight(bits, 0.9, init)
    for _ in range(4):
        w = w + 0.05 * torch.randn_like(w)
        a = fast(w)
        prev = qkernels.set_enabled(False)
        try:
            b = ref(w)
            assert qkernels.codebook_delta(w, ref.codebook) is None    # the reference runs the operations
            ref.ema_update(w)
        finally:
            qkernels.set_enabled(prev)
        assert qkernels.codebook_delta(w, fast.codebook) is not None
        fast.ema_update(w)
        assert torch.equal(a, b) and torch.equal(fast.codebook, ref.codebook)
    assert (0.0 in fast.codebook.tolist()) == (init == "signed")
    unsorted = fast.codebook.flip(0).contiguous()
    assert qkernels.codebook_delta(w, unsorted) is None and not qkernels.codebook_ema(w, unsorted, 0.9, False)


@pytest.mark.parametrize("bits,base", [(2, 2 ** 0.5), (4, 2 ** 0.5), (8, 2.0), (4, None)])
@pytest.mark.parametrize("grad_layout", ["row-major", "channels-last"])
def test_cpp_post_snap_equals_the_tensor_operations(bits, base, grad_layout):
    """ASQ's POST weight in its C++ node (bitfold_q.post_snap: snap, then the gather's backward as a sum
    in element order) gives the tensor operations' output, weight gradient and alpha gradient bit for bit;
    levels out of order (a negative alpha) take the operations' path inside the node, with their result."""
    from bitfold.toolchain import qkernels
    from bitfold.toolchain.asq import POSTWeight
    assert qkernels.ops() is not None, qkernels.status()
    torch.manual_seed(bits)
    w0 = torch.randn(16, 3, 5, 5)
    g = torch.randn_like(w0)
    if grad_layout == "channels-last":
        g = g.contiguous(memory_format=torch.channels_last)
    for alpha in (1.7, -0.8):
        res = []
        for fast in (True, False):
            post = POSTWeight(bits, base)
            post(w0)                                      # initialises alpha
            with torch.no_grad():
                post.alpha.fill_(alpha)
            prev = qkernels.set_enabled(fast)
            try:
                w = w0.clone().requires_grad_()
                out = post(w)
                out.backward(g)
            finally:
                qkernels.set_enabled(prev)
            res.append((out.detach(), w.grad, post.alpha.grad))
        (a, ga, aa), (b, gb, ab) = res
        assert torch.equal(a, b) and torch.equal(ga, gb) and torch.equal(aa, ab), (alpha, aa, ab)
        assert float(aa.abs()) > 0


@pytest.mark.parametrize("estimator", ["ste", "fd"])
def test_learned_range_node_trains_as_brevitas_with_penalty_and_freeze(estimator):
    """AdaQAT as the trainer steps it (task loss + the cost penalty, the widths' own step, then frozen
    widths): the C++ nodes of the learned range and scale (bitfold_q.learned_scale) and of the weight
    normalisation (bitfold_q.tanh_normalize) give every gradient and the state of Brevitas's modules and
    the tensor operations (all compiled code off) bit for bit; the finite-difference estimator's widths
    keep Brevitas's modules."""
    from bitfold.toolchain import qkernels
    from bitfold.toolchain import fastquant as fq
    from bitfold.toolchain.describe import describe_layers
    from bitfold.toolchain.train import make_optimizer
    assert qkernels.ops() is not None, qkernels.status()
    torch.manual_seed(0)
    x, y = torch.rand(32, 1, 12, 12), torch.randint(0, 10, (32,))
    base = build_model("mlp", (1, 12, 12), 10, bits="w4a4", method="adaqat", estimator=estimator, lam=0.5)
    init_activation_stats(base, x, 32)
    base.quant_method.setup(base, describe_layers(base, (1, 12, 12)))
    runs = []
    for compiled in (True, False):
        m = copy.deepcopy(base)
        qm = m.quant_method
        opt = make_optimizer(qm.param_groups(m, 1e-2, 0.0))
        prev = qkernels.set_enabled(compiled)
        grads = []
        try:
            with fast_quant(m):
                chains = [p.chain for p in fq._ACTIVE.values() if isinstance(p, fq.LearnedPlan)]
                for step in range(6):
                    if step == 4:
                        qm.on_epoch_end(m, 0, 1)          # the last epochs: widths frozen to integers
                    opt.zero_grad()
                    loss = F.cross_entropy(m(x), y)
                    extra = qm.extra_loss(m, step, (x, y), loss)
                    (loss if extra is None else loss + extra).backward()
                    grads.append(_grads(m))
                    opt.step()
                    qm.after_step(m, step)
        finally:
            qkernels.set_enabled(prev)
        runs.append((grads, m.state_dict()))
        assert sum(c is not None for c in chains) == 8       # every quantizer has the node's form
        assert qm.frozen(m)
    (ga, sa), (gb, sb) = runs
    for a, b in zip(ga, gb):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    widths = [k for k in ga[0] if k.endswith(".n")]
    assert widths and any(float(ga[0][k].abs()) > 0 for k in widths)
    assert not any(k.endswith(".n") for k in ga[-1])        # frozen widths have no gradient


@pytest.mark.parametrize("node", ["cpp", "python"])
@pytest.mark.parametrize("net,cost", [("mlp", "bitops"), ("cnn", "weight_bits")])
def test_fused_penalty_trains_as_the_cost_models_graph(net, cost, node):
    """AdaQAT's penalty over a product-form cost (BitOPs, weight bits) as one node (ProductCost):
    every gradient, the widths' trajectory and the final state equal the cost model's own graph
    bit for bit, through the widths' steps and the freeze; a model whose activation site feeds two
    layers (ResNet's residual) keeps the graph."""
    from bitfold.toolchain import qkernels
    from bitfold.toolchain.adaqat import ProductCost
    from bitfold.toolchain.describe import describe_layers
    assert qkernels.ops() is not None, qkernels.status()
    prev = qkernels.set_nodes_enabled(node == "cpp")
    from bitfold.toolchain.train import make_optimizer
    torch.manual_seed(0)
    shape = (1, 12, 12) if net == "mlp" else (1, 8, 8)
    x, y = torch.rand(32, *shape), torch.randint(0, 10, (32,))
    base = build_model(net, shape, 10, bits="w4a4", method="adaqat", cost=cost, lam=2.0)
    init_activation_stats(base, x, 32)
    base.quant_method.setup(base, describe_layers(base, shape))
    runs = []
    for fused in (True, False):
        m = copy.deepcopy(base)
        qm = m.quant_method
        qm.fuse_penalty = fused
        opt = make_optimizer(qm.param_groups(m, 1e-2, 0.0))
        grads, nodes = [], []
        with fast_quant(m):
            for step in range(8):
                if step == 6:
                    qm.on_epoch_end(m, 0, 1)
                opt.zero_grad()
                loss = F.cross_entropy(m(x), y)
                extra = qm.extra_loss(m, step, (x, y), loss)
                if extra is not None:
                    nodes.append(extra.grad_fn.next_functions[0][0].next_functions[0][0].name())
                (loss if extra is None else loss + extra).backward()
                grads.append(_grads(m))
                opt.step()
                qm.after_step(m, step)
        runs.append((grads, m.state_dict(), qm.trajectory, nodes))
    qkernels.set_nodes_enabled(prev)
    (ga, sa, ta, na), (gb, sb, tb, nb) = runs
    want = "ProductCostNode>" if node == "cpp" else "ProductCostBackward"
    assert len(set(na)) == 1 and na[0].endswith(want) and not any("ProductCost" in n for n in nb)
    for a, b in zip(ga, gb):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ta == tb and len({r[3] for r in ta}) > 1          # the widths moved
    res = build_model("resnet20", (3, 16, 16), 10, bits="w4a4", method="adaqat")
    init_activation_stats(res, torch.rand(4, 3, 16, 16), 4)
    res.quant_method.setup(res, describe_layers(res, (3, 16, 16)))
    extra = res.quant_method.extra_loss(res, 1)
    assert "ProductCost" not in extra.grad_fn.next_functions[0][0].next_functions[0][0].name()
    assert ProductCost.__name__ + "Backward" == "ProductCostBackward"


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("grad_layout", ["row-major", "channels-last"])
def test_cpp_tanh_normalize_equals_the_operations(ties, grad_layout):
    """AdaQAT's weight normalisation tanh(w) / max|tanh(w)| in its C++ node: output and gradient equal
    the tensor operations' bit for bit - one maximum (its share routed in the node), tied maxima and
    a gradient in another layout (the operations' graph inside the node)."""
    from bitfold.toolchain import qkernels
    from bitfold.toolchain.adaqat import TanhNormalize
    assert qkernels.ops() is not None, qkernels.status()
    torch.manual_seed(3)
    w = torch.randn(16, 4, 3, 3)
    if ties:
        w[2, 1, 0, 0], w[9, 3, 2, 2] = 30.0, -30.0        # tanh saturates: |t| == 1 at both
    g = torch.randn_like(w)
    if grad_layout == "channels-last":
        g = g.contiguous(memory_format=torch.channels_last)
    a, b = _quant_both_paths(lambda w_: TanhNormalize()(w_), w, g)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    t = torch.tanh(w).abs()
    assert int((t == t.max()).sum()) == (2 if ties else 1)


@pytest.mark.parametrize("scale", [1e-3, 10.0], ids=["unclipped", "clipped"])
def test_cpp_width_step_equals_the_multi_tensor_operations(scale):
    """AdaQAT's widths' step in C++ (bitfold_q.width_step) against the Python multi-tensor operations it
    replaces: the same widths after 30 steps, with and without the one clip, widths at both bounds."""
    from bitfold.toolchain import qkernels
    from bitfold.toolchain.adaqat import MAX_BIT_STEP
    ops = qkernels.ops()
    assert ops is not None, qkernels.status()
    g = torch.Generator().manual_seed(3)
    init = [torch.tensor(v) for v in (2.0, 7.99, 4.3, 8.0, 3.1)]
    a = [t.clone() for t in init]
    b = [t.clone() for t in init]
    for _ in range(30):
        grads = [torch.randn((), generator=g) * scale for _ in init]
        live = [0, 2, 3, 4]                   # one width without a gradient (frozen)
        ops.width_step([a[i] for i in live], [grads[i] for i in live], 0.7, MAX_BIT_STEP, a, 2.0, 8.0)
        steps = torch._foreach_mul([grads[i] for i in live], 0.7)
        biggest = float(torch.stack(torch._foreach_abs(steps)).max())
        k = min(1.0, MAX_BIT_STEP / biggest) if biggest > 0 else 1.0
        torch._foreach_sub_([b[i] for i in live], torch._foreach_mul(steps, k))
        torch._foreach_clamp_min_(b, 2.0)
        torch._foreach_clamp_max_(b, 8.0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, y) for x, y in zip(a, init))
    assert torch.equal(a[1], init[1])         # no gradient: only clamped
