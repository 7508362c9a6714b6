"""Training-step time: float vs Brevitas fixed-bit QAT vs each adaptive method, measured side by side.

    python benchmarks/qat_overhead.py [--steps 20] [--threads 1 2] [--models mlp cnn resnet20]
        [--device cpu|cuda] [--compile] [--adam trainer|foreach]

Models as the benchmarks train them: the TFC-style MLP and the CNN at 28x28 (Fashion-MNIST's shape),
ResNet-20 at 32x32, batch 64 (ResNet-20: 32), on random batches. Per model and thread count, one
training step as the trainer runs it (forward, the method's extra loss term - AdaQAT's cost penalty -
backward, Adam, the method's own step work) of float, fixed W4A4, AdaQAT, MEBQAT
(all its tasks of a step; also per task), ADQ W4A4 and ASQ W4A4 - each with the trainer's fused
fixed-width quantizers, and "brevitas" (fixed W4A4 on Brevitas's own modules, the path before the
fusion), "adaqat brevitas" (AdaQAT on Brevitas's modules), "fixed ops" and "adaqat ops" (fused, each
quantizer as its tensor operations rather than its compiled passes, bitfold.toolchain.qkernels: the
fused path before those), "fixed pynode" (fused, compiled passes, each quantizer's autograd node a
Python Function rather than the C++ node of qautograd.cpp: the fused path before that) - is timed in interleaved rounds so that machine noise hits all alike;
medians and ratios (to float, and adaptive to fixed) are printed.
Run it on a quiet machine: with 2 threads and a busy second core OpenMP threads wait on each other.
``--device cuda``: the same table on a GPU (the thread count then only sets the host's torch threads;
each round is closed by ``torch.cuda.synchronize``). ``--compile`` adds two rows, float and fixed W4A4
under ``torch.compile`` (default mode), each marked "failed" with the exception when compilation does
not go through.
"""
from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")

#: (label, method, options); every quantized row runs as the trainer runs it (fused fixed-width
#: quantizers, bitfold.toolchain.fastquant) except "brevitas", the same fixed model on Brevitas's modules
METHODS = [("float", "float", {}), ("brevitas", "fixed", {}), ("fixed W4A4", "fixed", {}),
           ("adaqat", "adaqat", {"cost": "bitops"}), ("mebqat", "mebqat", {}), ("adq W4A4", "adq", {}),
           ("asq W4A4", "asq", {}), ("adaqat brevitas", "adaqat", {"cost": "bitops"}),
           ("fixed ops", "fixed", {}), ("adaqat ops", "adaqat", {"cost": "bitops"}), ("fixed pynode", "fixed", {})]
#: rows after the adaptive methods' columns (not compared with fixed as a method of their own)
EXTRA = {"adaqat brevitas", "fixed ops", "adaqat ops", "fixed pynode"}
#: rows whose fused quantizers run their tensor operations, not the compiled passes (the fused path
#: before bitfold.toolchain.qkernels), timed beside the others
OPS = {"fixed ops", "adaqat ops"}
#: rows whose fused quantizers are the Python autograd Functions around the compiled passes, not the
#: C++ autograd nodes (the fused path before qautograd.cpp)
PYNODE = {"fixed pynode"}


def step_fn(name, method, opts, shape, batch, fast=True, device="cpu", compile_=None, ops=False, pynode=False,
            adam="trainer"):
    """(one training step, tasks per step) of a freshly built model; ``ops``: the fused quantizers run
    their tensor operations instead of the compiled passes; ``pynode``: their autograd nodes are the
    Python Functions, not the C++ ones; ``adam``: "trainer" (the trainer's, train.make_optimizer) or
    "foreach" (torch's multi-tensor Adam, the trainer's before it took the fused one)."""
    from bitfold.toolchain import qkernels
    from bitfold.toolchain.fastquant import fast_quant
    from bitfold.toolchain.describe import describe_layers
    from bitfold.toolchain.models import build_model
    from bitfold.toolchain.train import init_activation_stats, make_optimizer
    torch.manual_seed(0)
    x, y = torch.rand(batch, *shape, device=device), torch.randint(0, 10, (batch,), device=device)
    if method == "float":
        m = build_model(name, shape, 10, method="float").to(device)
        qm = None
    else:
        m = build_model(name, shape, 10, bits="w8a8" if method == "mebqat" else "w4a4", method=method, **opts).to(device)
        init_activation_stats(m, x, batch)
        qm = m.quant_method
        qm.setup(m, describe_layers(m, shape))
        fused = fast_quant(m, enabled=fast)
        fused.__enter__()  # for as long as this step function lives (it holds `fused`)
    m.train()
    # the trainer's Adam over the method's parameter groups (AdaQAT's widths are stepped by the method)
    groups = qm.param_groups(m, 1e-3, 0.0) if qm is not None else [{"params": list(m.parameters()), "lr": 1e-3}]
    opt = make_optimizer(groups) if adam == "trainer" else torch.optim.Adam(groups, foreach=True)
    state = {"s": 0, "fused": fused if qm is not None else None}
    fwd = torch.compile(m, backend=compile_) if compile_ else m
    kernels = not ops

    def step():
        prev = qkernels.set_enabled(kernels)
        prev_nodes = qkernels.set_nodes_enabled(not pynode)
        opt.zero_grad()
        if qm is None or qm.backward_step(fwd, m, x, y, state["s"]) is None:
            loss = F.cross_entropy(fwd(x), y)      # and the method's own loss term, as the trainer adds it
            extra = qm.extra_loss(m, state["s"], (x, y), loss) if qm is not None else None
            (loss if extra is None else loss + extra).backward()
        opt.step()
        if qm is not None:
            qm.after_step(m, state["s"])
        state["s"] += 1
        qkernels.set_enabled(prev)
        qkernels.set_nodes_enabled(prev_nodes)
    return step, (getattr(qm, "tasks_per_step", 1) if qm is not None else 1)


def main():
    from _timing import interleaved
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--models", nargs="+", default=["mlp", "cnn", "resnet20"])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--compile", action="store_true", help="add float and fixed W4A4 under torch.compile")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend of those rows")
    ap.add_argument("--adam", choices=["trainer", "foreach"], default="trainer",
                    help="every row's optimizer: the trainer's (fused Adam) or torch's multi-tensor Adam")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device; run with --device cpu")
    rows = METHODS + ([("float compiled", "float", {}), ("fixed compiled", "fixed", {})] if args.compile else [])
    dev = f" on {torch.cuda.get_device_name()}" if cuda else ""
    adam = "the trainer's (fused)" if args.adam == "trainer" else "multi-tensor (foreach)"
    print(f"torch {torch.__version__}{dev}; median step time over {args.rounds} interleaved rounds of {args.steps} steps; "
          f"Adam: {adam}")
    widths = [max(12, len(n) + 2) for n, _, _ in rows]
    print(f"{'model':<22}{'thr':>4}  " + "".join(f"{n:>{w}}" for (n, _, _), w in zip(rows, widths)) + "   ratios")
    for name in args.models:
        shape, batch = ((3, 32, 32), 32) if name == "resnet20" else ((1, 28, 28), 64)
        for th in args.threads:
            torch.set_num_threads(th)
            fns, tasks, failed = {}, {}, {}
            for label, method, opts in rows:
                comp = label.endswith("compiled")
                try:
                    fns[label], tasks[label] = step_fn(name, method, opts, shape, batch, fast=not label.endswith("brevitas"),
                                                       device=args.device, compile_=args.compile_backend if comp else None,
                                                       ops=label in OPS, pynode=label in PYNODE, adam=args.adam)
                    if comp:   # compilation happens on the first call: a failure is reported, not fatal
                        fns[label]()
                except Exception as e:  # noqa: BLE001 - only the compiled rows may fail; others re-raise
                    if not comp:
                        raise
                    failed[label] = f"{type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}"
                    fns.pop(label, None)
            steps = args.steps if name != "resnet20" or cuda else max(3, args.steps // 4)
            med = interleaved(fns, args.rounds, steps, sync=torch.cuda.synchronize if cuda else None)
            fp, fx = med["float"], med["fixed W4A4"]
            ratios = [f"brevitas/float {med['brevitas'] / fp:.2f}x", f"fixed/float {fx / fp:.2f}x"] + [
                f"{k}/fixed {med[k] / fx / tasks[k]:.2f}x" + (f" per task ({tasks[k]} tasks)" if tasks[k] > 1 else "")
                for k, _, _ in METHODS[3:] if k not in EXTRA] + [f"adaqat/adaqat brevitas {med['adaqat'] / med['adaqat brevitas']:.2f}x",
                                                                  f"fixed ops/float {med['fixed ops'] / fp:.2f}x",
                                                                  f"adaqat ops/fixed ops {med['adaqat ops'] / med['fixed ops']:.2f}x",
                                                                  f"fixed pynode/float {med['fixed pynode'] / fp:.2f}x"]
            eager_of = {lab.split()[0]: lab for lab, _, _ in METHODS
                if not lab.endswith("brevitas") and lab not in OPS and lab not in PYNODE}
            ratios += [f"{k}/{eager_of[k.split()[0]]} {med[k] / med[eager_of[k.split()[0]]]:.2f}x"
                       for k in med if k.endswith("compiled")]
            print(f"{name + ' ' + 'x'.join(map(str, shape)) + f' b{batch}':<22}{th:>4}  "
                  + "".join(f"{med[n] * 1e3:>{w - 2}.2f}ms" if n in med else f"{'failed':>{w}}" for (n, _, _), w in zip(rows, widths))
                  + "   " + ", ".join(ratios), flush=True)
            for k, why in failed.items():
                print(f"    {k}: torch.compile failed - {why}", flush=True)


if __name__ == "__main__":
    main()
