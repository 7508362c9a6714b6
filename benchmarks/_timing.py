"""Side-by-side timing for the benchmarks: callables run in interleaved rounds, medians compared."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved(fns: dict[str, Callable[[], None]], rounds: int = 7, steps: int = 20, warmup: int = 3) -> dict:
    """Median seconds per call of each callable; the rounds alternate so machine noise hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            for _ in range(steps):
                fn()
            times[k].append((time.perf_counter() - t) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def train_step_times(configs: dict, bits="w3a4", model="cnn", shape=(1, 8, 8), rounds=7, steps=15) -> dict:
    """Median seconds of one training step (forward, backward, Adam, the method's after_step) per
    ``{label: (method, method_options)}``, on the same batch, interleaved."""
    import torch
    import torch.nn.functional as F

    from bitfold.toolchain.describe import describe_layers
    from bitfold.toolchain.models import build_model
    from bitfold.toolchain.train import init_activation_stats
    x, y = torch.rand(64, *shape), torch.randint(0, 10, (64,))
    fns = {}
    for label, (method, opts) in configs.items():
        torch.manual_seed(0)
        m = build_model(model, shape, 10, bits=bits, method=method, **opts)
        init_activation_stats(m, x, 64)
        qm = m.quant_method
        qm.setup(m, describe_layers(m, shape))
        opt = torch.optim.Adam(m.parameters(), 1e-3)

        def fn(m=m, qm=qm, opt=opt):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
            qm.after_step(m, 0)
        fns[label] = fn
    return interleaved(fns, rounds, steps)
