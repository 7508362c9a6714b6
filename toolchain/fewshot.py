"""MEBQAT, few-shot variant: tasks are (bit-width, class subset); a few inner SGD steps on support
examples adapt the shared weights to classes the model never saw.

Choices made here (first-order meta-learning, as MEBQAT's few-shot setting after MAML):

* Classes are split into *seen* (meta-training) and *unseen* (evaluation only), default 0-5 / 6-9,
  on digits or Fashion-MNIST (``data``).
* Head (``head``): ``"slots"`` (MAML's N-way head) - the first N logits are the episode's N
  slots and each episode assigns its classes to slots in random order, so every slot is
  meta-trained and an unseen class uses trained rows; ``"proto"`` (a ProtoNet variant) -
  prototypes are the support embeddings' class means (the input of the model's last layer) and a
  query's logits are minus its squared distances to them; with ``proto`` the inner loop adapts the
  embedding on the support's prototype loss.
* A meta-training episode samples a (w, a) task from the MEBQAT candidates (plus the high-precision
  task) and an N-way subset of the seen classes; K support and Q query images per class from the
  training split. Inner loop: ``inner_steps`` SGD steps (``inner_lr``) on the support at (w, a);
  outer: the query loss at the adapted weights, its gradient applied to the weights before
  adaptation (first-order MAML), several episodes averaged per outer step. BatchNorm runs on its
  running statistics (eval mode) throughout, so tiny support sets do not disturb it.
* ``meta=False`` trains the same model on the same episodes without the inner loop: with the
  ``slots`` head on the seen classes' own logits (plain multi-bit-width training on the seen
  classes, then fine-tuning on the support at evaluation), with ``proto`` on the prototype loss.
  The baseline the meta-learning must beat.
* Evaluation on unseen classes, per (w, a): N-way episodes with K support images from the training
  split and the query from the *test* split; accuracy of the N-way prediction (logits restricted to
  the episode's slots or prototypes) before and after ``inner_steps`` adaptation steps, averaged
  over episodes.
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from bitfold.core.atomic import atomic_path, write_json
from bitfold.core.events import events_of
from bitfold.core.errors import BitfoldError


@dataclass
class FewShotConfig:
    model: str = "mlp"
    data: str = "digits"
    head: str = "slots"            # "slots" (MAML N-way head) | "proto" (prototypes in embedding space)
    seen: tuple = (0, 1, 2, 3, 4, 5)
    ways: int = 3
    shots: int = 5
    queries: int = 10
    inner_steps: int = 5
    inner_lr: float = 0.05
    episodes: int = 300            # outer steps
    episodes_per_step: int = 2
    lr: float = 2e-3
    meta: bool = True
    eval_bits: tuple = ((2, 2), (4, 4), (8, 8))
    eval_episodes: int = 40
    seed: int = 0
    method_options: dict = field(default_factory=dict)


def _by_class(x, y):
    return {int(c): x[y == c] for c in torch.unique(y)}


def _episode(pool: dict, classes: list, ways: int, shots: int, queries: int, g, query_pool: dict | None = None):
    pick = [classes[i] for i in torch.randperm(len(classes), generator=g)[:ways].tolist()]
    sx, sy, qx, qy = [], [], [], []
    for c in pick:
        xs = pool[c]
        idx = torch.randperm(len(xs), generator=g)
        sx.append(xs[idx[:shots]])
        sy += [c] * shots
        qsrc = query_pool[c] if query_pool is not None else xs[idx[shots:]]
        qidx = torch.randperm(len(qsrc), generator=g)[:queries]
        qx.append(qsrc[qidx])
        qy += [c] * len(qidx)
    return pick, torch.cat(sx), torch.tensor(sy), torch.cat(qx), torch.tensor(qy)


def _embed(model, x):
    """The input of the model's last compute layer (the embedding a ProtoNet compares)."""
    from bitfold.toolchain.quant import compute_layers
    last = list(compute_layers(model).values())[-1]
    got = {}
    h = last.register_forward_pre_hook(lambda mod, inp: got.__setitem__("z", inp[0]))
    try:
        model(x)
    finally:
        h.remove()
    z = got["z"]
    return (z.value if hasattr(z, "value") else z).flatten(1)


def _nway_loss(model, x, y, classes, head: str = "slots", support=None):
    """N-way loss and accuracy; targets are the classes' slots in this episode (``classes`` order)."""
    target = torch.tensor([classes.index(int(c)) for c in y])
    if head == "proto":
        sx, sy = support
        zs, zq = _embed(model, sx), _embed(model, x)
        protos = torch.stack([zs[sy == c].mean(0) for c in classes])
        logits = -torch.cdist(zq, protos) ** 2
    elif head == "global":                  # the classes' own logits (the no-meta baseline's training)
        logits = model(x)[:, classes]
    else:
        logits = model(x)[:, :len(classes)]
    return F.cross_entropy(logits, target), (logits.argmax(1) == target).float().mean()


def _adapt(model, sx, sy, classes, steps, lr, head: str = "slots"):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        _nway_loss(model, sx, sy, classes, head, (sx, sy))[0].backward()
        opt.step()


def _set_task(model, w, a):
    from bitfold.toolchain.bitmap import LayerBits
    qm = model.quant_method
    base = model.bit_map
    qm.set_map(model, {n: (base[n] if n in qm.edge_layers(model) else LayerBits(w, a)) for n in base})


def run_fewshot(out, cfg: FewShotConfig = FewShotConfig(), events=None) -> dict:
    from bitfold.toolchain.data import load_dataset
    from bitfold.toolchain.models import build_model
    from bitfold.toolchain.train import init_activation_stats, make_optimizer
    if cfg.ways < 2 or cfg.shots < 1 or cfg.inner_steps < 0:
        raise BitfoldError("few-shot needs ways >= 2, shots >= 1, inner_steps >= 0")
    if cfg.head not in ("slots", "proto"):
        raise BitfoldError(f"unknown few-shot head {cfg.head!r}", "choose slots or proto")
    torch.manual_seed(cfg.seed)
    ds = load_dataset(cfg.data, None, cfg.seed)
    seen = sorted(int(c) for c in cfg.seen)
    unseen = sorted(set(range(ds.num_classes)) - set(seen))
    if len(seen) < cfg.ways or len(unseen) < cfg.ways:
        raise BitfoldError(f"{cfg.ways}-way episodes need >= {cfg.ways} seen and unseen classes "
                           f"(seen {seen}, unseen {unseen})")
    train_pool, test_pool = _by_class(ds.x_train, ds.y_train), _by_class(ds.x_test, ds.y_test)
    model = build_model(cfg.model, ds.input_shape, ds.num_classes, bits="w8a8", method="mebqat", **cfg.method_options)
    seen_x = torch.cat([train_pool[c] for c in seen])
    init_activation_stats(model, seen_x, 256)
    model.eval()
    qm = model.quant_method
    opt = make_optimizer([{"params": list(model.parameters()), "lr": cfg.lr}])
    g = torch.Generator().manual_seed(cfg.seed)
    for step in range(cfg.episodes):
        opt.zero_grad()
        tasks = qm.tasks(step)
        meta_grads = [torch.zeros_like(p) for p in model.parameters()]
        for e in range(cfg.episodes_per_step):
            w, a = tasks[e % len(tasks)]
            _set_task(model, w, a)
            classes, sx, sy, qx, qy = _episode(train_pool, seen, cfg.ways, cfg.shots, cfg.queries, g)
            if cfg.meta:
                saved = copy.deepcopy(model.state_dict())
                _adapt(model, sx, sy, classes, cfg.inner_steps, cfg.inner_lr, cfg.head)
                model.zero_grad()
                _nway_loss(model, qx, qy, classes, cfg.head, (sx, sy))[0].backward()
                model.load_state_dict(saved)
            else:
                model.zero_grad()
                plain = "global" if cfg.head == "slots" else cfg.head
                _nway_loss(model, torch.cat([sx, qx]), torch.cat([sy, qy]), classes, plain, (sx, sy))[0].backward()
            for mg, p in zip(meta_grads, model.parameters()):
                if p.grad is not None:
                    mg += p.grad / cfg.episodes_per_step
        for mg, p in zip(meta_grads, model.parameters()):
            p.grad = mg
        opt.step()
        events_of(events).progress(step + 1, cfg.episodes)
    qm.set_map(model, model.bit_map)
    results = []
    for w, a in cfg.eval_bits:
        ge = torch.Generator().manual_seed(cfg.seed + 7)
        before, after = [], []
        for _ in range(cfg.eval_episodes):
            m = copy.deepcopy(model)
            _set_task(m, w, a)
            classes, sx, sy, qx, qy = _episode(train_pool, unseen, cfg.ways, cfg.shots, cfg.queries, ge, test_pool)
            with torch.no_grad():
                before.append(float(_nway_loss(m, qx, qy, classes, cfg.head, (sx, sy))[1]))
            _adapt(m, sx, sy, classes, cfg.inner_steps, cfg.inner_lr, cfg.head)
            with torch.no_grad():
                after.append(float(_nway_loss(m, qx, qy, classes, cfg.head, (sx, sy))[1]))
        results.append({"w": w, "a": a, "before": sum(before) / len(before), "after": sum(after) / len(after),
                        "episodes": cfg.eval_episodes})
    rep = {"config": {**asdict(cfg), "unseen": unseen}, "chance": 1 / cfg.ways, "results": results}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "fewshot.json", rep)
    with atomic_path(out / "fewshot.pt") as tmp:
        torch.save({"model": model.state_dict(), "config": json.loads(json.dumps(asdict(cfg)))}, tmp)
    return rep
