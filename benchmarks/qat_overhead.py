"""Training-step time: float vs Brevitas fixed-bit QAT vs each adaptive method, measured side by side.

    python benchmarks/qat_overhead.py [--steps 20] [--threads 1 2] [--models mlp cnn resnet20]

Models as the benchmarks train them: the TFC-style MLP and the CNN at 28x28 (Fashion-MNIST's shape),
ResNet-20 at 32x32, batch 64 (ResNet-20: 32), on random batches. Per model and thread count, one
training step (forward, backward, Adam, the method's own step work) of float, fixed W4A4, AdaQAT, MEBQAT
(all its tasks of a step; also per task), ADQ W4A4 and ASQ W4A4 - each with the trainer's fused
fixed-width quantizers, and "brevitas" (fixed W4A4 on Brevitas's own modules, the path before the
fusion) - is timed in interleaved rounds so that
machine noise hits all alike; medians and ratios (to float, and adaptive to fixed) are printed.
Run it on a quiet machine: with 2 threads and a busy second core OpenMP threads wait on each other.
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
           ("asq W4A4", "asq", {})]


def step_fn(name, method, opts, shape, batch, fast=True):
    """(one training step, tasks per step) of a freshly built model."""
    from bitfold.toolchain.fastquant import fast_quant
    from bitfold.toolchain.describe import describe_layers
    from bitfold.toolchain.models import build_model
    from bitfold.toolchain.train import init_activation_stats
    torch.manual_seed(0)
    x, y = torch.rand(batch, *shape), torch.randint(0, 10, (batch,))
    if method == "float":
        m = build_model(name, shape, 10, method="float")
        qm = None
    else:
        m = build_model(name, shape, 10, bits="w8a8" if method == "mebqat" else "w4a4", method=method, **opts)
        init_activation_stats(m, x, batch)
        qm = m.quant_method
        qm.setup(m, describe_layers(m, shape))
        fused = fast_quant(m, enabled=fast)
        fused.__enter__()  # for as long as this step function lives (it holds `fused`)
    m.train()
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    state = {"s": 0, "fused": fused if qm is not None else None}

    def step():
        opt.zero_grad()
        if qm is None or qm.backward_step(m, m, x, y, state["s"]) is None:
            F.cross_entropy(m(x), y).backward()
        opt.step()
        if qm is not None:
            qm.after_step(m, state["s"])
        state["s"] += 1
    return step, (getattr(qm, "tasks_per_step", 1) if qm is not None else 1)


def main():
    from _timing import interleaved
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--models", nargs="+", default=["mlp", "cnn", "resnet20"])
    args = ap.parse_args()
    print(f"torch {torch.__version__}; median step time over {args.rounds} interleaved rounds of {args.steps} steps")
    print(f"{'model':<22}{'thr':>4}  " + "".join(f"{n:>12}" for n, _, _ in METHODS) + "   ratios")
    for name in args.models:
        shape, batch = ((3, 32, 32), 32) if name == "resnet20" else ((1, 28, 28), 64)
        for th in args.threads:
            torch.set_num_threads(th)
            fns, tasks = {}, {}
            for label, method, opts in METHODS:
                fns[label], tasks[label] = step_fn(name, method, opts, shape, batch, fast=label != "brevitas")
            steps = args.steps if name != "resnet20" else max(3, args.steps // 4)
            med = interleaved(fns, args.rounds, steps)
            fp, fx = med["float"], med["fixed W4A4"]
            ratios = [f"brevitas/float {med['brevitas'] / fp:.2f}x", f"fixed/float {fx / fp:.2f}x"] + [
                f"{k}/fixed {med[k] / fx / tasks[k]:.2f}x" + (f" per task ({tasks[k]} tasks)" if tasks[k] > 1 else "")
                for k, _, _ in METHODS[3:]]
            print(f"{name + ' ' + 'x'.join(map(str, shape)) + f' b{batch}':<22}{th:>4}  "
                  + "".join(f"{med[n] * 1e3:>10.2f}ms" for n, _, _ in METHODS) + "   " + ", ".join(ratios), flush=True)


if __name__ == "__main__":
    main()
