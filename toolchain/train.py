"""Quantization-aware training loop: seeded, resumable bit-for-bit, optionally distributed.

* Determinism: the initial weights come from ``seed``; the sample order of epoch ``e`` is a
  permutation drawn from ``seed`` and ``e`` alone, so a resumed run sees exactly the batches an
  uninterrupted run sees.
* Checkpoints: atomic, every epoch (weights, optimizer, scheduler, history, bit map).
* Activation scales are calibrated (``ACT_INIT_STEPS`` forward passes) before the first step.
* Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DDP (gloo on CPU,
  nccl on CUDA); each rank takes a disjoint shard of every epoch's permutation; rank 0 writes.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitfold.core.atomic import ensure_writable_dir, write_json
from bitfold.toolchain import fastquant
from bitfold.toolchain.bitmap import bitmap_to_json
from bitfold.toolchain.data import Dataset
from bitfold.toolchain.describe import describe_layers
from bitfold.core.errors import BitfoldError
from bitfold.toolchain.models import build_model
from bitfold.toolchain.quant import ACT_INIT_STEPS
from bitfold.toolchain.runs import (BITMAP, CHECKPOINT, CONFIG, TrainConfig, dataset_of, load_checkpoint, read_config,
                   save_checkpoint, write_metrics)


def _dist_info():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return world, rank


def make_optimizer(params) -> torch.optim.Adam:
    """The trainer's Adam: torch's fused implementation (``fused=True``: one compiled kernel per
    parameter) for floating-point parameters on CPU or CUDA, else the multi-tensor ("foreach") one.
    A small model's step carries ~20 us per parameter of the multi-tensor path's separate operations
    (~8 per parameter, each a dispatch) and ~8 us of the fused kernel's (measured, 34 parameters of
    an MLP with ASQ's adapters, 1 thread: 755 -> 296 us a step); methods with many small parameters
    (ASQ's adapters, scales) gain the most. Its arithmetic is the single-tensor loop's within float
    rounding (a few 1-ulp differences: tested), and every path of a method - fused quantizers or
    Brevitas's modules, a run or its resume - steps with this same optimizer."""
    def as_list(ps):
        return [ps] if isinstance(ps, torch.Tensor) else list(ps)

    params = list(params)
    params = [{**g, "params": as_list(g["params"])} if isinstance(g, dict) else g for g in params]
    tensors = [t for g in params for t in (g["params"] if isinstance(g, dict) else [g])]
    # (torch checks the fused kernel's devices and dtypes only at the first step: decided here)
    if all(t.is_floating_point() and t.device.type in ("cpu", "cuda") for t in tensors):
        return torch.optim.Adam(params, fused=True)
    return torch.optim.Adam(params, foreach=True)


def choose_threads(world: int = 1) -> tuple[int, str]:
    """Torch CPU threads for one training process that do not oversubscribe the machine: the
    user's ``OMP_NUM_THREADS`` when set, else the cores this process may use, shared by the
    ``world`` processes of a DDP run and lowered by the machine's load (cores busy with other work
    make OpenMP threads wait on each other: measured 10x slower steps with 2 threads on a 2-core
    machine whose other core was busy). Returns (threads, why)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), f"OMP_NUM_THREADS={env}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    free = max(1, int(cores - load + 0.5))
    n = max(1, min(cores // max(1, world), free))
    return n, f"{cores} cores, 1-min load {load:.1f}, {world} process(es)"


def _resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BitfoldError("--device cuda was asked for but torch sees no CUDA device",
                           "use --device cpu, or install bitfold where a GPU and a CUDA torch exist")
    return torch.device(name)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    correct = 0
    for i in range(0, len(x), batch_size):
        out = model(x[i:i + batch_size].to(dev))
        correct += int((out.argmax(1).cpu() == y[i:i + batch_size]).sum())
    model.train(was)
    return correct / max(1, len(x))


@torch.no_grad()
def init_activation_stats(model: nn.Module, x: torch.Tensor, batch_size: int, steps: int = ACT_INIT_STEPS + 1) -> None:
    """Run ``steps`` forward passes in training mode so activation quantizers finish their statistics."""
    model.train()
    dev = next(model.parameters()).device
    for i in range(steps):
        lo = (i * batch_size) % max(1, len(x) - batch_size + 1)
        model(x[lo:lo + batch_size].to(dev))


def _canonical(key: str) -> str:
    """A state-dict key without torch's parametrization wrapper: methods that parametrize weights
    (adaqat, adq, asq, mebqat) store ``layer.parametrizations.weight.original`` where a fixed or
    float run stores ``layer.weight``."""
    return key.replace(".parametrizations.weight.original", ".weight")


def init_from_run(model: nn.Module, run_dir) -> dict:
    """Start from another run's weights (any method: keys are matched through parametrizations);
    tensors whose shape changed (e.g. codebooks) start fresh. Every Conv/Linear weight must load -
    a start that silently leaves a layer random is refused (a method's own
    extra modules, e.g. ASQ's adapters, start fresh). Returns ``{loaded, fresh}`` key lists."""
    src = {_canonical(k): v for k, v in load_checkpoint(Path(run_dir) / CHECKPOINT)["model"].items()}
    own = model.state_dict()
    keep, fresh = {}, set()
    for k, v in own.items():
        c = _canonical(k)
        if c in src:
            if src[c].shape == v.shape:
                keep[k] = src[c]
            else:
                fresh.add(k.rsplit(".", 1)[0])
    keep = {k: v for k, v in keep.items() if k.rsplit(".", 1)[0] not in fresh}  # e.g. a resized codebook's flag
    from bitfold.toolchain.quant import compute_layers
    layer_ids = {id(m) for m in compute_layers(model).values()}
    weights = [f"{n}.weight" for n, m in model.named_modules() if id(m) in layer_ids]
    missing = [w for w in weights if not any(_canonical(k) == w for k in keep)]
    if not keep or missing:
        raise BitfoldError(f"--init-from {run_dir}: the weights of {', '.join(missing) or 'every layer'} do not fit "
                           f"this model (names or shapes differ)", "use a run of the same model and data set")
    model.load_state_dict(keep, strict=False)
    # quantizer state initialised from the data at build time (POST / codebook scales from the random
    # init's weights, ASQ steps) and not loaded from the source starts again from the loaded weights:
    # kept, e.g. ASQ's POST scale started at the random init's max|w| (7x below the trained weights'
    # on the first layer of the Fashion-MNIST MLP) and could be driven through zero
    reset = []
    for name, mod in model.named_modules():
        flag = getattr(mod, "initialized", None)
        if isinstance(flag, torch.Tensor) and f"{name}.initialized" not in keep:
            flag.fill_(False)
            reset.append(name)
    return {"loaded": sorted(keep), "fresh": sorted(fresh), "reinitialized": reset}


def compile_steps(net: nn.Module, backend: str | None) -> tuple[nn.Module, dict | None]:
    """``net`` under ``torch.compile(backend=...)`` for the training steps, or ``net`` itself (None).

    Not bit-identical: with inductor the forward outputs equal the eager ones, but the generated backward
    kernels round differently, so gradients, and from the first optimizer step every weight, differ from
    an eager run (eager with the fused quantizers is the reference path). Where a graph cannot be
    compiled, dynamo runs that code eagerly (``suppress_errors``) - the report counts the graphs compiled.
    The backend name is checked by :func:`check_compile_backend` (``train`` calls it before any work)."""
    if not backend:
        return net, None
    import torch._dynamo
    torch._dynamo.config.suppress_errors = True   # a backend failure runs the frame eagerly, not a crash
    info = {"backend": backend, "counts_before": _dynamo_counts()}
    return torch.compile(net, backend=backend), info


def check_compile_backend(backend: str | None) -> None:
    """One clear error for a ``--compile`` backend torch does not know (checked before any work)."""
    if not backend:
        return
    import torch._dynamo
    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise BitfoldError(f"--compile {backend!r}: torch.compile has no such backend",
                           f"use one of {', '.join(known)} (inductor generates fused kernels), or leave --compile out")


def _dynamo_counts() -> tuple[int, int]:
    """(graphs compiled, graph breaks) so far in this process (a graph whose backend failed is not counted)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"].get("unique_graphs", 0)), int(sum(counters["graph_break"].values()))


def compile_report(info: dict | None) -> dict | None:
    """What the compiled run ran: graphs compiled and graph breaks during the run (0 graphs: eager)."""
    if info is None:
        return None
    now, before = _dynamo_counts(), info["counts_before"]
    graphs, breaks = (a - b for a, b in zip(now, before))
    out = {k: v for k, v in info.items() if k != "counts_before"}
    return {**out, "graphs": graphs, "graph_breaks": breaks, "eager": graphs == 0}


def cosine_lr(base: float, epoch: int, epochs: int) -> float:
    return base * 0.5 * (1.0 + math.cos(math.pi * epoch / max(1, epochs)))


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.randperm(n, generator=g)


def train(cfg: TrainConfig, out_dir: str | Path, resume: bool = False, progress: bool = True,
          dataset: Dataset | None = None, on_epoch: Callable[[int, dict], None] | None = None,
          fast_quant: bool = True) -> dict:
    """Train ``cfg`` into ``out_dir`` and return the final metrics (also written to metrics.json).

    ``fast_quant``: run the training steps of fixed-width Brevitas quantizers fused
    (:mod:`bitfold.toolchain.fastquant`; bit-identical, so it is not part of the run's options).
    ``cfg.compile``: the steps under ``torch.compile`` (:func:`compile_steps`; not bit-identical)."""
    world, rank = _dist_info()
    out = Path(out_dir)
    check_compile_backend(cfg.compile)
    device = _resolve_device(cfg.device if world == 1 or not cfg.device.startswith("cuda")
                             else f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    ck = None
    if (out / CHECKPOINT).exists() or (out / CONFIG).exists():
        if not resume:
            raise BitfoldError(f"{out} already holds a run",
                               "pass --resume to continue it, or choose a new --out directory")
        saved = read_config(out)
        if {**saved.to_json(), "epochs": 0, "device": ""} != {**cfg.to_json(), "epochs": 0, "device": ""}:
            raise BitfoldError(f"--resume: the options differ from the run saved in {out}",
                               "resume with the same options (only --epochs and --device may change)")
        if (out / CHECKPOINT).exists():
            ck = load_checkpoint(out / CHECKPOINT)
    elif resume:
        raise BitfoldError(f"--resume: {out} holds no run to resume", "drop --resume to start a new run")

    torch.manual_seed(cfg.seed)
    ds = dataset or dataset_of(cfg)
    model = build_model(cfg.model, ds.input_shape, ds.num_classes, bits=cfg.bits, method=cfg.method,
                        weights=cfg.weights if ck is None else None, **cfg.method_options).to(device)
    method = getattr(model, "quant_method", None)
    history: list[dict] = []
    start_epoch = 0
    if ck is not None:
        model.load_state_dict(ck["model"])
        history = list(ck["history"])
        start_epoch = int(ck["epoch"])
    elif cfg.init_from:
        init_from_run(model, cfg.init_from)
    if ck is None and method is not None:
        # each rank calibrates on its own shard; DDP then broadcasts rank 0's parameters
        init_activation_stats(model, ds.x_train[rank::world], cfg.batch_size)
    # The optimizer is made only now: Brevitas replaces some quantizer parameters (activation
    # scales) when a state dict is loaded, and an optimizer made earlier would hold stale ones.
    layers = describe_layers(model, ds.input_shape)
    if method is not None:
        method.setup(model, layers)
        if ck is not None:
            method.load_state(ck.get("method_state") or {})
    groups = (method.param_groups(model, cfg.lr, cfg.weight_decay) if method is not None
              else [{"params": list(model.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay}])
    for g in groups:
        g["base_lr"] = g["lr"]
    opt = make_optimizer(groups)
    if ck is not None:
        opt.load_state_dict(ck["optimizer"])

    if rank == 0:
        ensure_writable_dir(out)
        if ck is None:
            write_json(out / CONFIG, cfg.to_json())
    net: nn.Module = model
    if world > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # adaptive methods hold parameters that a step may not touch (AdaQAT's widths once frozen for
        # fine-tuning, MEBQAT's per-task quantizer state): DDP must not wait for their gradients
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  find_unused_parameters=cfg.method not in ("fixed", "float"))

    net, compiled = compile_steps(net, cfg.compile)
    if progress and rank == 0 and compiled is not None:
        from rich.console import Console
        Console(stderr=True).print(f"[dim]training steps under torch.compile(backend={cfg.compile!r}) - not "
                                   "bit-identical to an eager run[/]")
    n = len(ds.x_train)
    steps_per_epoch = math.ceil(n / world / cfg.batch_size)
    threads, why = choose_threads(world)
    threads_before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads)
        if progress and rank == 0:
            from rich.console import Console
            Console(stderr=True).print(f"[dim]training with {threads} torch thread(s) ({why})[/]")
    t0 = time.perf_counter()
    with fastquant.fast_quant(model, enabled=fast_quant and method is not None, learned=not cfg.compile) as fused, \
            _progress(progress and rank == 0) as bar:
        if progress and rank == 0 and method is not None and fast_quant:
            from rich.console import Console
            Console(stderr=True).print(f"[dim]{fused.summary()}[/]")
        task = bar.add_task("train", total=(cfg.epochs - start_epoch) * steps_per_epoch) if bar else None
        for epoch in range(start_epoch, cfg.epochs):
            for group in opt.param_groups:  # closed-form cosine schedule: a function of the epoch only
                group["lr"] = cosine_lr(group["base_lr"], epoch, cfg.epochs)
            net.train()
            order = _epoch_order(n, cfg.seed, epoch)[rank::world]
            tot_loss, seen = 0.0, 0
            for step in range(steps_per_epoch):
                idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
                if len(idx) == 0:
                    continue
                xb, yb = ds.x_train[idx].to(device), ds.y_train[idx].to(device)
                gstep = epoch * steps_per_epoch + step
                opt.zero_grad(set_to_none=True)
                # a method may run its own forward/backward (e.g. MEBQAT's several bit-width tasks)
                loss = method.backward_step(net, model, xb, yb, gstep) if method else None
                if loss is None:
                    loss = F.cross_entropy(net(xb), yb)
                    extra = method.extra_loss(model, gstep, (xb, yb), loss) if method else None
                    (loss if extra is None else loss + extra).backward()
                opt.step()
                if method:
                    method.after_step(model, gstep)
                tot_loss += float(loss.detach()) * len(idx)
                seen += len(idx)
                if bar:
                    bar.update(task, advance=1, description=f"epoch {epoch + 1}/{cfg.epochs} loss {tot_loss / seen:.3f}")
            if method:
                method.on_epoch_end(model, epoch + 1, cfg.epochs)
            acc = evaluate(model, ds.x_test, ds.y_test)
            history.append({"epoch": epoch + 1, "loss": tot_loss / max(1, seen), "test_acc": acc})
            if rank == 0:
                save_checkpoint(out, {
                    "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "epoch": epoch + 1, "history": history, "input_shape": list(ds.input_shape),
                    "num_classes": ds.num_classes,
                    "bit_map": bitmap_to_json(method.bit_map(model)) if method else None,
                    "method_state": method.state() if method else {}})
            if on_epoch:
                on_epoch(epoch + 1, history[-1])
    if method:
        model.bit_map = method.bit_map(model)
    metrics = run_metrics(model, layers, history)
    metrics["train_seconds"] = time.perf_counter() - t0
    metrics["world_size"] = world
    metrics["fast_quant"] = {"fused": list(fused.fused), "brevitas": dict(fused.brevitas), "kernels": fused.kernels,
                             "direct": list(fused.direct)}
    if compiled is not None:
        metrics["compile"] = compile_report(compiled)
    if device.type == "cpu":
        metrics["threads"] = {"n": threads, "why": why}
        torch.set_num_threads(threads_before)
    if rank == 0:
        if method:
            metrics.update(method.finalize(model, out))
            write_json(out / BITMAP, bitmap_to_json(model.bit_map))
        write_metrics(out, metrics)
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
    return metrics


def run_metrics(model: nn.Module, layers, history) -> dict:
    from bitfold.hw_models.cost import bitops, weight_bits
    bm = model.bit_map
    method = getattr(model, "quant_method", None)
    if bm:
        bits = {k: (v.w, v.a) for k, v in bm.items()}          # storage: the bit map's widths
        arith = method.cost_bits(model) if method else bits  # arithmetic (e.g. ADQ's snapped grid)
    else:  # float model: 32-bit everywhere
        bits = arith = {d.name: (32, 32) for d in layers}
    bo, wb = bitops(layers, arith), weight_bits(layers, bits)
    extras = method.layer_extras(model) if method else {}
    return {
        "model": getattr(model, "model_name", type(model).__name__),
        "method": getattr(getattr(model, "quant_method", None), "name", "float"),
        "accuracy": history[-1]["test_acc"] if history else None,
        "bitops": float(bo.total),
        "weight_bits": float(wb.total),
        "layers": [{"name": d.name, "kind": d.kind, "macs": d.macs, "weights": d.weight_count,
                    "w": bits[d.name][0], "a": bits[d.name][1], "arith_w": arith[d.name][0],
                    "bitops": float(bo.per_layer[d.name]), "weight_bits": float(wb.per_layer[d.name]),
                    **extras.get(d.name, {})}
                   for d in layers],
        "history": history,
    }


class _progress:
    """A rich progress bar, or nothing (``bar`` is None) when disabled."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), transient=False)
        self.bar.__enter__()
        return self.bar

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False
