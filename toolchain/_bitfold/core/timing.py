"""Side-by-side timing: callables run in alternating rounds, medians compared (the benchmarks and the
TVM backend's latency-vs-onnxruntime line use the same rule)."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved(fns: dict[str, Callable[[], None]], rounds: int = 7, steps: int = 20, warmup: int = 3,
                sync: Callable[[], None] | None = None) -> dict:
    """Median seconds per call of each callable; the rounds alternate so machine noise hits all alike.
    ``sync`` (e.g. ``torch.cuda.synchronize``) is called before each clock read, so that work queued
    on an accelerator is counted in the round that queued it."""
    sync = sync or (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            sync()
            t = time.perf_counter()
            for _ in range(steps):
                fn()
            sync()
            times[k].append((time.perf_counter() - t) / steps)
    return {k: statistics.median(v) for k, v in times.items()}
