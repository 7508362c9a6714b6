"""Bit-serial sub-8-bit kernels in the TVM backend: exact against the int8 kernels and onnxruntime,
chosen per layer by measured latency, recorded in build.json, and correct as aarch64 code under qemu."""
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install -e '.[tvm]')")

from bitfold.export.backends import build
from bitfold.core.errors import BitfoldError


def _one_layer_qcdq(path, op: str, w_bits: int, a_bits: int, seed: int = 0, k: int = 100, n: int = 24):
    """A QCDQ model: ReLU -> uint8 quantizer clipped to a_bits -> dequantize -> Gemm / Conv whose int8
    weights are clipped to w_bits (signed; "b": bipolar +-1 codes), then a float bias - the form bitfold's
    exports take."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(seed)
    lo, hi = (-1, 1) if w_bits == "b" else (-(1 << (w_bits - 1)), (1 << (w_bits - 1)) - 1)
    if op == "gemm":
        xshape, wshape, yshape = [1, k], (n, k), [1, n]
    else:
        xshape, wshape, yshape = [1, 12, 6, 6], (n, 12, 3, 3), [1, n, 6, 6]
    # signed: wider than w_bits (the Clip narrows it); bipolar: +-1 codes
    w = rng.choice(np.array([-1, 1], np.int8), size=wshape) if w_bits == "b" else \
        rng.integers(-128, 128, size=wshape).astype(np.int8)
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "sx"),
             numpy_helper.from_array(np.array(0, np.uint8), "zx"),
             numpy_helper.from_array(np.array(0, np.uint8), "xlo"),
             numpy_helper.from_array(np.array((1 << a_bits) - 1, np.uint8), "xhi"),
             numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(np.array(lo, np.int8), "wlo"),
             numpy_helper.from_array(np.array(hi, np.int8), "whi"),
             numpy_helper.from_array((0.01 + 0.02 * rng.random(n)).astype(np.float32), "sw"),
             numpy_helper.from_array(np.zeros(n, np.int8), "zw"),
             numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")]
    nodes = [helper.make_node("Relu", ["x"], ["xr"]),
             helper.make_node("QuantizeLinear", ["xr", "sx", "zx"], ["xq"]),
             helper.make_node("Clip", ["xq", "xlo", "xhi"], ["xc"]),
             helper.make_node("DequantizeLinear", ["xc", "sx", "zx"], ["xd"]),
             helper.make_node("Clip", ["w", "wlo", "whi"], ["wc"]),
             helper.make_node("DequantizeLinear", ["wc", "sw", "zw"], ["wd"], axis=0)]
    if op == "gemm":
        nodes.append(helper.make_node("Gemm", ["xd", "wd", "b"], ["y"], name="fc", transB=1))
    else:
        nodes.append(helper.make_node("Conv", ["xd", "wd", "b"], ["y"], name="conv", pads=[1, 1, 1, 1]))
    graph = helper.make_graph(nodes, "one_layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, xshape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, yshape)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def _branches_qcdq(path, pairs, seed: int = 0, n: int = 16):
    """One QCDQ model holding, for each (w, a) of ``pairs``, a 3x3 convolution and a dense layer that
    read the input through their own a-bit quantizer (``w`` signed bits, or "b" for bipolar +-1 codes
    with no Clip); every output flattened and concatenated - all pairs in one build."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(np.array(0, np.uint8), "zx"), numpy_helper.from_array(np.array(0, np.uint8), "xlo")]
    nodes = [helper.make_node("Relu", ["x"], ["xr"])]
    outs = []
    for i, (w_bits, a_bits) in enumerate(pairs):
        sx = 0.4 / (1 << a_bits)                      # N(0, 1) inputs reach the top code
        inits += [numpy_helper.from_array(np.array(sx, np.float32), f"sx{i}"),
                  numpy_helper.from_array(np.array((1 << a_bits) - 1, np.uint8), f"xhi{i}")]
        nodes += [helper.make_node("QuantizeLinear", ["xr", f"sx{i}", "zx"], [f"xq{i}"]),
                  helper.make_node("Clip", [f"xq{i}", "xlo", f"xhi{i}"], [f"xc{i}"]),
                  helper.make_node("DequantizeLinear", [f"xc{i}", f"sx{i}", "zx"], [f"xd{i}"]),
                  helper.make_node("Flatten", [f"xd{i}"], [f"xf{i}"], axis=1)]
        for op, wshape in (("conv", (n, 12, 3, 3)), ("fc", (n, 12 * 6 * 6))):
            if w_bits == "b":
                w = rng.choice(np.array([-1, 1], np.int8), size=wshape)
                inits.append(numpy_helper.from_array(w, f"{op}w{i}"))
                wsrc = f"{op}w{i}"
            else:
                lo, hi = -(1 << (w_bits - 1)), (1 << (w_bits - 1)) - 1
                w = rng.integers(lo, hi + 1, size=wshape).astype(np.int8)
                inits += [numpy_helper.from_array(w, f"{op}w{i}"),
                          numpy_helper.from_array(np.array(lo, np.int8), f"{op}lo{i}"),
                          numpy_helper.from_array(np.array(hi, np.int8), f"{op}hi{i}")]
                nodes.append(helper.make_node("Clip", [f"{op}w{i}", f"{op}lo{i}", f"{op}hi{i}"], [f"{op}wc{i}"]))
                wsrc = f"{op}wc{i}"
            inits += [numpy_helper.from_array((0.01 + 0.02 * rng.random(n)).astype(np.float32), f"{op}sw{i}"),
                      numpy_helper.from_array(np.zeros(n, np.int8), f"{op}zw{i}"),
                      numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"{op}b{i}")]
            nodes.append(helper.make_node("DequantizeLinear", [wsrc, f"{op}sw{i}", f"{op}zw{i}"], [f"{op}wd{i}"], axis=0))
            if op == "conv":
                nodes += [helper.make_node("Conv", [f"xd{i}", f"convwd{i}", f"convb{i}"], [f"cy{i}"], name=f"conv{i}",
                                           pads=[1, 1, 1, 1]),
                          helper.make_node("Flatten", [f"cy{i}"], [f"cyf{i}"], axis=1)]
                outs.append(f"cyf{i}")
            else:
                nodes.append(helper.make_node("Gemm", [f"xf{i}", f"fcwd{i}", f"fcb{i}"], [f"fy{i}"], name=f"fc{i}",
                                              transB=1))
                outs.append(f"fy{i}")
    nodes.append(helper.make_node("Concat", outs, ["y"], axis=1))
    total = len(pairs) * (n * 36 + n)
    graph = helper.make_graph(nodes, "branches", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 12, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, total])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


#: every width pair the bit-serial kernels take: signed 1-4-bit weights and bipolar ("b") ones, 1-4-bit inputs
ALL_PAIRS = [(w, a) for w in (1, 2, 3, 4, "b") for a in (1, 2, 3, 4)]


def _outputs(build_dir, x):
    from bitfold.export.tvm.backend import run_vm
    return run_vm(build_dir / "model.so", x)


def _conv_ref(x, w, pad):
    """Integer NCHW convolution, stride 1, by explicit sums (the independent reference)."""
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    o, c, kh, kw = w.shape
    h, wd = xp.shape[2] - kh + 1, xp.shape[3] - kw + 1
    y = np.zeros((1, o, h, wd), np.int64)
    for i in range(kh):
        for j in range(kw):
            y += np.einsum("chw,oc->ohw", xp[0, :, i:i + h, j:j + wd], w[:, :, i, j].astype(np.int64))[None]
    return y


def _run_scheduled(name, x, packed, fn):
    """(scheduled module, output) of one kernel compiled as the build schedules it
    (``schedules.apply_default``), run on the host."""
    import tvm
    from tvm import te

    from bitfold.export.tvm import schedules
    xt = te.placeholder(x.shape, "uint8", name="x")
    wt = te.placeholder(packed.shape, str(packed.dtype), name="w")
    out = fn(xt, wt)
    mod = tvm.IRModule({name: te.create_prim_func([xt, wt, out]).with_attr("global_symbol", name)})
    mod, _ = schedules.apply_default(mod)
    y = tvm.runtime.tensor(np.zeros([int(d) for d in out.shape], np.int32), tvm.cpu())
    tvm.compile(mod, "llvm")[name](tvm.runtime.tensor(x, tvm.cpu()), tvm.runtime.tensor(packed, tvm.cpu()), y)
    return mod, y.numpy()


@pytest.mark.parametrize("op,w_bits,a_bits", [("gemm", 1, 1), ("gemm", 2, 2), ("gemm", 3, 4), ("gemm", 4, 3),
                                              ("conv", 1, 2), ("conv", 2, 1), ("conv", 4, 4)])
def test_bitserial_kernel_is_exact_in_integers(op, w_bits, a_bits):
    """The kernel alone (as the build schedules it) gives exactly the integer dot products, over the
    full code ranges, odd sizes included (K and C not multiples of the word)."""
    from bitfold.export.tvm import bitserial as bs
    rng = np.random.default_rng(w_bits * 10 + a_bits)
    lo, hi = -(1 << (w_bits - 1)), (1 << (w_bits - 1)) - 1
    if op == "gemm":
        x = rng.integers(0, 1 << a_bits, size=(1, 77)).astype(np.uint8)
        w = rng.integers(lo, hi + 1, size=(13, 77))
        packed, ref = bs.pack_weights(w, w_bits), x.astype(np.int64) @ w.T
        fn = bs.dense_te(a_bits, w_bits, 13)
    else:
        x = rng.integers(0, 1 << a_bits, size=(1, 12, 5, 7)).astype(np.uint8)
    # convolutions: every variant the per-layer choice may pick (packing word, loop nest), at a filter
    # count the default order vectorizes (16: filters innermost, 16 lanes) and one it cannot (6), at
    # strides 1 and 2 (the offset's correction is a window sum that follows the stride and the padding)
    variants = [("bitserial_dense", None, 13, 1)] if op == "gemm" else \
        [(name, word, n, st) for n in (6, 16) for st in (1, 2) for name, word in
         [("bitserial_conv2d", bs.conv_word(12)), ("bitserial_conv2d_xin", bs.conv_word(12)),
          ("bitserial_conv2d", 32), ("bitserial_conv2d_nat", 32)]]
    for name, word, n, st in variants:
        if word is not None:
            w = rng.integers(lo, hi + 1, size=(n, 12, 3, 3))
            w[0, 0, 0, :2] = lo, hi
            ref = _conv_ref(x, w, 1)[:, :, ::st, ::st]
            packed = bs.pack_conv_weights(w, w_bits, word)
            fn = bs.conv_te(a_bits, w_bits, n, word, (st, st), (1, 1, 1, 1))
        mod, y = _run_scheduled(name, x, packed, fn)
        assert ("T.vectorized" in mod.script()) == (name == "bitserial_conv2d" and n == 16), (name, word, n, st)
        assert np.array_equal(y, ref), (name, word, n, st)
    assert x.max() == (1 << a_bits) - 1 and w.min() == lo and w.max() == hi


def test_every_width_pair_is_exact_as_the_build_schedules_it():
    """Every (w, a) pair the bit-serial path accepts (1-4 bits each; signed and bipolar weights), as a
    3x3 convolution with a filter count the default order vectorizes and as a dense layer, over the full
    code ranges: exact sums."""
    from bitfold.export.tvm import bitserial as bs
    rng = np.random.default_rng(7)
    for wb, a_bits in ALL_PAIRS:
        w_bits, bip = (1, True) if wb == "b" else (wb, False)
        lo, hi = -(1 << (w_bits - 1)), (1 << (w_bits - 1)) - 1

        def codes(shape):
            w = rng.choice([-1, 1], size=shape) if bip else rng.integers(lo, hi + 1, size=shape)
            w.reshape(-1)[:2] = (-1, 1) if bip else (lo, hi)
            return w
        xc = rng.integers(0, 1 << a_bits, size=(1, 12, 5, 7)).astype(np.uint8)
        xc[0, 0, 0, 0] = (1 << a_bits) - 1
        wc, wd = codes((16, 12, 3, 3)), codes((13, 77))
        xd = xc.reshape(1, -1)[:, :77].copy()
        word = bs.conv_word(12)
        cases = [("bitserial_conv2d", xc, bs.pack_conv_weights(wc, w_bits, word, bip),
                  bs.conv_te(a_bits, w_bits, 16, word, (1, 1), (1, 1, 1, 1), bip), _conv_ref(xc, wc, 1)),
                 ("bitserial_dense", xd, bs.pack_weights(wd, w_bits, bip), bs.dense_te(a_bits, w_bits, 13, bip),
                  xd.astype(np.int64) @ wd.T)]
        for name, x, packed, fn, ref in cases:
            assert np.array_equal(_run_scheduled(name, x, packed, fn)[1], ref), (name, wb, a_bits)


@pytest.mark.parametrize("op,w_bits,a_bits", [("gemm", 2, 2), ("conv", 3, 4), ("conv", "b", 2)])
def test_bitserial_build_verifies_and_equals_the_int8_build(tmp_path, op, w_bits, a_bits):
    """Built end to end: the bit-serial layer passes the export gate against onnxruntime, and its outputs
    equal the int8 build's up to float rounding of the same integer accumulators (one ulp)."""
    m = _one_layer_qcdq(tmp_path / "m.onnx", op, w_bits, a_bits)
    build(m, "host-cpu", tmp_path / "bs", {"kernels": "bitserial"})
    build(m, "host-cpu", tmp_path / "i8", {"kernels": "int8"})
    bs = json.loads((tmp_path / "bs" / "build.json").read_text())
    i8 = json.loads((tmp_path / "i8" / "build.json").read_text())
    assert [la["kernel"] for la in bs["layers"]] == [f"bitserial W{1 if w_bits == 'b' else w_bits}A{a_bits}"]
    assert [la["kernel"] for la in i8["layers"]] == ["int8"]
    assert bs["verification"]["passed"] and i8["verification"]["passed"]
    shape = bs["input"]["shape"]
    x = np.random.default_rng(1).standard_normal((16, *shape[1:])).astype(np.float32)
    y_bs, y_i8 = _outputs(tmp_path / "bs", x), _outputs(tmp_path / "i8", x)
    np.testing.assert_allclose(y_bs, y_i8, rtol=1e-6, atol=1e-6)
    # the codes really span the clipped range (a wrong high bit would show)
    assert (np.clip(np.round(np.maximum(x, 0) / 0.1), 0, 255) >= (1 << a_bits) - 1).any()


def test_wrong_weight_packing_is_caught(tmp_path, monkeypatch):
    """The comparison above can fail: weights packed with one plane shifted make the build refuse."""
    from bitfold.export.tvm import bitserial as bs
    good = bs.pack_weights

    def bad(w, bits, bipolar=False):
        p = good(w, bits, bipolar)
        p[:-1, -1] = p[:-1, 0]        # the top plane replaced by the bottom one
        return p
    monkeypatch.setattr(bs, "pack_weights", bad)
    m = _one_layer_qcdq(tmp_path / "m.onnx", "gemm", 3, 3)
    with pytest.raises(BitfoldError, match="does not match onnxruntime"):
        build(m, "host-cpu", tmp_path / "b", {"kernels": "bitserial"})
    assert not (tmp_path / "b").exists()


def test_auto_choice_is_measured_per_layer_and_recorded(tmp_path):
    """--kernels auto (the default) times each qualifying layer both ways on this host and keeps the
    faster; build.json holds the timings, the choice and what each layer runs; wider layers say why not."""
    m = _one_layer_qcdq(tmp_path / "m.onnx", "gemm", 2, 2, k=256, n=64)
    build(m, "host-cpu", tmp_path / "b")
    meta = json.loads((tmp_path / "b" / "build.json").read_text())
    choice = meta["kernel_choice"]
    assert choice["mode"] == "auto" and choice["eligible"] == ["fc"]
    (row,) = choice["measured"]
    assert row["int8_s"] > 0 and row["bitserial_s"] > 0 and row["bits"] == "W2A2"
    faster = "bitserial" if row["bitserial_s"] < row["int8_s"] else "int8"
    assert row["chosen"] == faster
    assert meta["layers"][0]["kernel"] == ("bitserial W2A2" if faster == "bitserial" else "int8")
    # the build is timed next to onnxruntime's default session on the same file, and says so
    lat = meta["latency_vs_onnxruntime"]
    assert lat["tvm_s"] > 0 and lat["onnxruntime_s"] > 0 and lat["ratio"] == lat["tvm_s"] / lat["onnxruntime_s"]
    m5 = _one_layer_qcdq(tmp_path / "m5.onnx", "gemm", 5, 2)
    build(m5, "host-cpu", tmp_path / "b5")
    meta5 = json.loads((tmp_path / "b5" / "build.json").read_text())
    assert meta5["kernel_choice"]["eligible"] == [] and meta5["layers"][0]["kernel"] == "int8"
    assert meta5["layers"][0]["bitserial"] == "W5A2 is wider than 4 bits"
    # forcing the bit-serial kernels on a model none of whose layers qualifies is an error that says why
    with pytest.raises(BitfoldError, match="no layer of this model can run bit-serial .fc: W5A2 is wider than 4 bits"):
        build(m5, "host-cpu", tmp_path / "b5s", {"kernels": "bitserial"})
    assert not (tmp_path / "b5s").exists()
    with pytest.raises(BitfoldError, match="unknown kernel choice"):
        build(m, "host-cpu", tmp_path / "x", {"kernels": "fast"})


def test_signed_inputs_stay_int8(trained_run, tmp_path):
    """The digits CNN's first layer reads signed 8-bit codes: it never runs bit-serial, and says why; the
    whole mixed-width model built with bit-serial layers passes the gate against onnxruntime."""
    from bitfold.export.onnx_export import export_run
    run, _ = trained_run
    q = tmp_path / "m.qcdq.onnx"
    export_run(run, "qcdq", q)
    build(q, "host-cpu", tmp_path / "b", {"kernels": "bitserial"})
    layers = json.loads((tmp_path / "b" / "build.json").read_text())["layers"]
    assert layers[0]["kernel"] == "int8" and "not unsigned" in layers[0]["bitserial"]
    # the bit map's widths (a: the layer's input) decide the rest: W2A4 and W3A2 qualify, W5A6 does not
    assert [la["kernel"] for la in layers[1:]] == ["bitserial W2A4", "bitserial W3A2", "int8"]
    assert layers[3]["bitserial"] == "W5A6 is wider than 4 bits"


@pytest.mark.parametrize("kernels", ["int8", "bitserial"])
def test_default_schedule_changes_only_float_rounding(trained_run, tmp_path, kernels):
    """The default schedules (matmul loop order, inlined requantize chains) keep the integer kernels exact
    and the float chain's operations: the digits CNN (BatchNorm behind every conv) compiled with and
    without them agrees to float rounding (an inlined multiply-add may become one FMA) and in argmax."""
    import onnx
    import tvm
    from tvm import relax

    from bitfold.boards import load_board
    from bitfold.export.onnx_export import export_run
    from bitfold.export.tvm import backend, bitserial, int_lowering, schedules, tune
    q = tmp_path / "m.qcdq.onnx"
    export_run(trained_run[0], "qcdq", q)
    model = onnx.load(str(q))
    ops = bitserial.operands(model)
    sel = range(len(ops)) if kernels == "bitserial" else ()
    raw = backend.import_relax(model, "input", (1, 1, 8, 8))
    raw, _ = int_lowering.lower_to_integer(raw, int_lowering.onnx_compute_layers(model), ops, sel)
    raw = tune.prepare(raw)
    sched, n = schedules.apply_default(raw)
    assert n >= 4          # every conv / matmul kernel at least
    target = backend.target_for(load_board("host-cpu"), True)
    x = np.random.default_rng(0).standard_normal((32, 1, 1, 8, 8)).astype(np.float32)
    outs = []
    for m in (raw, sched):
        vm = relax.VirtualMachine(tvm.compile(m, target), tvm.cpu())
        outs.append(np.stack([vm["main"](tvm.runtime.tensor(xi, tvm.cpu())).numpy() for xi in x]))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    assert (outs[0].argmax(-1) == outs[1].argmax(-1)).all()


def test_bitserial_aarch64_build_is_exact_under_qemu(arm64_sysroot, tmp_path):
    """The bit-serial kernels compiled for aarch64 (NEON popcount) run under qemu-user and match
    onnxruntime under the strict gate - every width pair, convolution and dense, in one build."""
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.fail("aarch64-linux-gnu-g++ is not installed (Debian: g++-aarch64-linux-gnu)")
    m = _branches_qcdq(tmp_path / "m.onnx", ALL_PAIRS)
    r = build(m, "rpi4", tmp_path / "b", {"kernels": "bitserial", "qemu": True})
    meta = json.loads((tmp_path / "b" / "build.json").read_text())
    labels = [f"W{w if w != 'b' else 1}{'s' if w == 1 else ''}A{a}" for w, a in ALL_PAIRS]
    assert [la["kernel"] for la in meta["layers"]] == [f"bitserial {lb}" for lb in labels for _ in (0, 1)]
    assert r.verified and meta["verification_emulated"]["passed"]
