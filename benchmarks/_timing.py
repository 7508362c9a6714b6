"""Side-by-side timing for the benchmarks: callables run in interleaved rounds, medians compared."""
from __future__ import annotations

from bitfold.core.timing import interleaved  # noqa: F401 - the benchmarks import it from here


def train_step_times(configs: dict, bits="w3a4", model="cnn", shape=(1, 8, 8), rounds=7, steps=15) -> dict:
    """Median seconds of one training step (forward, backward, Adam, the method's after_step) per
    ``{label: (method, method_options)}``, on the same batch, interleaved."""
    import torch
    import torch.nn.functional as F

    from bitfold.toolchain.describe import describe_layers
    from bitfold.toolchain.models import build_model
    from bitfold.toolchain.train import init_activation_stats, make_optimizer
    x, y = torch.rand(64, *shape), torch.randint(0, 10, (64,))
    fns = {}
    for label, (method, opts) in configs.items():
        torch.manual_seed(0)
        m = build_model(model, shape, 10, bits=bits, method=method, **opts)
        init_activation_stats(m, x, 64)
        qm = m.quant_method
        qm.setup(m, describe_layers(m, shape))
        opt = make_optimizer([{"params": list(m.parameters()), "lr": 1e-3}])   # the trainer's Adam

        def fn(m=m, qm=qm, opt=opt):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
            qm.after_step(m, 0)
        fns[label] = fn
    return interleaved(fns, rounds, steps)
