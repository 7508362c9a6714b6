import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from bitfold.core.errors import BitfoldError
from bitfold.toolchain.runs import TrainConfig, load_checkpoint
from bitfold.toolchain.train import train


def test_short_run_beats_chance_by_a_wide_margin(trained_run):
    out, metrics = trained_run
    assert metrics["accuracy"] > 0.8          # chance is 0.10
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["layers"][1]["w"] == 2 and saved["bitops"] > 0 and saved["weight_bits"] > 0
    assert json.loads((out / "bitmap.json").read_text())["convs.2"] == {"w": 3, "a": 2}


#: every method with its compiled nodes (AdaQAT: learned range, tanh normalisation, widths still learning in
#: epoch 2 of 3; ADQ: codebook passes; ASQ: POST node; MEBQAT) - a resumed run equals the uninterrupted one bit for
#: bit
RESUME_CASES = [("fixed", {}, 2, None), ("adaqat", {"finetune_epochs": 1}, 3, (512, 128)),
                ("adq", {}, 2, (512, 128)), ("asq", {}, 2, (512, 128)), ("mebqat", {}, 2, (512, 128))]


@pytest.mark.parametrize("method,opts,epochs,subset", RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_resume_equals_uninterrupted(tmp_path, method, opts, epochs, subset):
    cfg = TrainConfig(model="mlp", bits="w3a3", epochs=epochs, batch_size=128, method=method, method_options=opts,
                      subset=subset)
    train(cfg, tmp_path / "full", progress=False)

    class Interrupted(Exception):
        pass

    def stop_after_first_epoch(epoch, _):
        raise Interrupted  # as if the process died right after writing epoch 1's checkpoint

    with pytest.raises(Interrupted):
        train(cfg, tmp_path / "split", progress=False, on_epoch=stop_after_first_epoch)
    assert load_checkpoint(tmp_path / "split" / "checkpoint.pt")["epoch"] == 1
    train(cfg, tmp_path / "split", resume=True, progress=False)
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == epochs
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["history"] == b["history"]


def test_existing_run_is_not_overwritten(trained_run):
    out, _ = trained_run
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(BitfoldError, match="already holds a run"):
        train(TrainConfig(model="cnn", epochs=1), out, progress=False)
    with pytest.raises(BitfoldError, match="options differ"):
        train(TrainConfig(model="mlp", epochs=5), out, resume=True, progress=False)
    assert (out / "checkpoint.pt").read_bytes() == before


def test_float_twin_trains(tmp_path):
    m = train(TrainConfig(model="mlp", method="float", epochs=2), tmp_path / "fp", progress=False)
    assert m["accuracy"] > 0.85 and m["method"] == "float"


def test_missing_cuda_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(BitfoldError, match="no CUDA device"):
        train(TrainConfig(model="mlp", epochs=1, device="cuda"), tmp_path / "c", progress=False)


def test_torchrun_ddp_two_processes(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={port}", "-m", "bitfold.cli", "train", "--model", "mlp", "--epochs", "2",
                        "--quiet", "-o", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2
    assert m["accuracy"] > 0.6


@pytest.mark.parametrize("method", ["adaqat", "adq", "asq", "mebqat"])
def test_init_from_a_fixed_run_loads_every_layer_weight(trained_run, method):
    """--init-from used to leave every layer weight random for methods that parametrize weights
    (their keys are layer.parametrizations.weight.original, a fixed run's layer.weight)."""
    from bitfold.toolchain.models import build_model
    from bitfold.toolchain.runs import load_run
    from bitfold.toolchain.train import _canonical, init_from_run
    from bitfold.core.errors import BitfoldError
    _, src, ck = load_run(trained_run[0])
    model = build_model("cnn", tuple(ck["input_shape"]), 10, bits="w4a4", method=method)
    rep = init_from_run(model, trained_run[0])
    s = {_canonical(k): v for k, v in src.state_dict().items()}
    own = {_canonical(k): v for k, v in model.state_dict().items()}
    for name in ("convs.0.weight", "convs.1.weight", "convs.2.weight", "head.weight"):
        assert torch.equal(own[name], s[name]), name
    assert rep["loaded"]
    other = build_model("mlp", (1, 8, 8), 10, bits="w4a4", method=method)
    with pytest.raises(BitfoldError, match="do not fit this model"):
        init_from_run(other, trained_run[0])


@pytest.mark.parametrize("method", ["asq", "adq"])
def test_init_from_restarts_quantizer_scales_on_the_loaded_weights(trained_run, method):
    """POST / codebook scales are initialised from the weights when the model is built (random
    init); after --init-from they used to keep the random init's range (ASQ's POST scale 7x too
    small on the Fashion-MNIST MLP's first layer, and driven through zero on some seeds)."""
    from bitfold.toolchain.models import build_model
    from bitfold.toolchain.runs import load_run
    from bitfold.toolchain.train import _canonical, init_activation_stats, init_from_run
    _, src, ck = load_run(trained_run[0])
    model = build_model("cnn", tuple(ck["input_shape"]), 10, bits="w4a4", method=method)
    param = model.convs[1].parametrizations.weight[0]
    before = (param.alpha if method == "asq" else param.codebook.abs().max()).item()
    rep = init_from_run(model, trained_run[0])
    assert "convs.1.parametrizations.weight.0" in rep["reinitialized"]
    init_activation_stats(model, torch.randn(64, *ck["input_shape"]), 32)
    w = {_canonical(k): v for k, v in src.state_dict().items()}["convs.1.weight"]
    after = (param.alpha if method == "asq" else param.codebook.abs().max()).item()
    if method == "asq":     # POST: alpha = max|w| of the weights it quantizes
        assert after == pytest.approx(float(w.abs().max())) and after != pytest.approx(before)
    else:                   # codebook initialised inside the loaded weights' range
        assert after <= float(w.abs().max()) + 1e-6 and after != pytest.approx(before)


def test_thread_choice_respects_omp_and_load(monkeypatch):
    from bitfold.toolchain import train as tr
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert tr.choose_threads() == (3, "OMP_NUM_THREADS=3")
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(tr.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(tr.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert tr.choose_threads()[0] == 2
    monkeypatch.setattr(tr.os, "getloadavg", lambda: (1.2, 1.0, 1.0))   # the other core is busy
    n, why = tr.choose_threads()
    assert n == 1 and "load 1.2" in why
    monkeypatch.setattr(tr.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert tr.choose_threads(world=2)[0] == 1                            # two DDP processes share 2 cores


def test_trainers_adam_is_fused_and_follows_the_single_tensor_loop():
    """The trainer's Adam (train.make_optimizer) is torch's fused one, deterministic (two runs bit
    for bit), and its parameters and state follow the single-tensor loop's within float rounding:
    parameter groups with their own lr and weight decay, 0-dim scale parameters, steps where some
    gradients are missing, a decaying lr; another eps is told apart (the comparison can fail)."""
    from bitfold.toolchain.train import make_optimizer
    shapes = [(64, 78), (64,), (), (), (10, 64), (8, 2), (1,), ()]

    def run(make):
        torch.manual_seed(1)
        ps = [torch.randn(s).requires_grad_() for s in shapes]
        opt = make([{"params": ps[:3], "lr": 1e-3, "weight_decay": 1e-4},
                    {"params": ps[3:6], "lr": 3e-2, "weight_decay": 0.0},
                    {"params": ps[6:], "lr": 1e-2, "weight_decay": 5e-4}])
        g = torch.Generator().manual_seed(2)
        for step in range(25):
            for i, p in enumerate(ps):
                p.grad = None if (step + i) % 7 == 0 else torch.randn(p.shape, generator=g)
            for gr in opt.param_groups:
                gr["lr"] *= 0.97
            opt.step()
        return ps, opt.state_dict()["state"], opt

    a, sa, opt = run(make_optimizer)
    assert opt.defaults["fused"] is True
    a2, sa2, _ = run(make_optimizer)
    assert all(torch.equal(x, y) for x, y in zip(a, a2))
    assert all(torch.equal(sa[k][n], sa2[k][n]) for k in sa for n in sa[k])
    b, sb, _ = run(lambda groups: torch.optim.Adam(groups, foreach=False))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    assert sa.keys() == sb.keys()
    for k in sa:
        for n in sa[k]:
            torch.testing.assert_close(sa[k][n], sb[k][n], rtol=1e-5, atol=1e-9)
    other = run(lambda groups: torch.optim.Adam(groups, foreach=False, eps=1e-6))[0][0]
    assert not torch.allclose(a[0], other, rtol=1e-6, atol=1e-7)
    meta = torch.nn.Parameter(torch.zeros(3, device="meta"))   # a device the fused kernel does not take
    opt = make_optimizer([{"params": [meta], "lr": 1e-3}])
    assert not opt.defaults["fused"] and opt.defaults["foreach"]
