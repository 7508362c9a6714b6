"""MEBQAT, few-shot variant: tasks are (bit-width, class subset); a few inner SGD steps on support
examples adapt the shared weights to classes the model never saw.

Choices made here (first-order meta-learning, as MEBQAT's few-shot setting after MAML):

* Classes are split into *seen* (meta-training) and *unseen* (evaluation only); digits: 0-5 / 6-9.
* A meta-training episode samples a (w, a) task from the MEBQAT candidates (plus the high-precision
  task) and an N-way subset of the seen classes; K support and Q query images per class from the
  training split. Inner loop: ``inner_steps`` SGD steps (``inner_lr``) on the support at (w, a);
  outer: the query loss at the adapted weights, its gradient applied to the weights before
  adaptation (first-order MAML), several episodes averaged per outer step. BatchNorm runs on its
  running statistics (eval mode) throughout, so tiny support sets do not disturb it.
* ``meta=False`` trains the same model on the same episodes without the inner loop (plain
  multi-bit-width training on the seen classes): the baseline the meta-learning must beat.
* Evaluation on unseen classes, per (w, a): N-way episodes with K support images from the training
  split and the query from the *test* split; accuracy of the N-way prediction (logits restricted to
  the episode's classes) before and after ``inner_steps`` adaptation steps, averaged over episodes.
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


def _nway_loss(model, x, y, classes):
    logits = model(x)[:, classes]
    target = torch.tensor([classes.index(int(c)) for c in y])
    return F.cross_entropy(logits, target), (logits.argmax(1) == target).float().mean()


def _adapt(model, sx, sy, classes, steps, lr):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        _nway_loss(model, sx, sy, classes)[0].backward()
        opt.step()


def _set_task(model, w, a):
    from bitfold.toolchain.bitmap import LayerBits
    qm = model.quant_method
    base = model.bit_map
    qm._set_raw(model, {n: (base[n] if n in qm._edges(model) else LayerBits(w, a)) for n in base})


def run_fewshot(out, cfg: FewShotConfig = FewShotConfig(), events=None) -> dict:
    from bitfold.toolchain.data import load_dataset
    from bitfold.toolchain.models import build_model
    from bitfold.toolchain.train import init_activation_stats
    if cfg.ways < 2 or cfg.shots < 1 or cfg.inner_steps < 0:
        raise BitfoldError("few-shot needs ways >= 2, shots >= 1, inner_steps >= 0")
    torch.manual_seed(cfg.seed)
    ds = load_dataset("digits", None, cfg.seed)
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
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
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
                _adapt(model, sx, sy, classes, cfg.inner_steps, cfg.inner_lr)
                model.zero_grad()
                _nway_loss(model, qx, qy, classes)[0].backward()
                model.load_state_dict(saved)
            else:
                model.zero_grad()
                _nway_loss(model, torch.cat([sx, qx]), torch.cat([sy, qy]), classes)[0].backward()
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
                before.append(float(_nway_loss(m, qx, qy, classes)[1]))
            _adapt(m, sx, sy, classes, cfg.inner_steps, cfg.inner_lr)
            with torch.no_grad():
                after.append(float(_nway_loss(m, qx, qy, classes)[1]))
        results.append({"w": w, "a": a, "before": sum(before) / len(before), "after": sum(after) / len(after),
                        "episodes": cfg.eval_episodes})
    rep = {"config": {**asdict(cfg), "unseen": unseen}, "chance": 1 / cfg.ways, "results": results}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "fewshot.json", rep)
    with atomic_path(out / "fewshot.pt") as tmp:
        torch.save({"model": model.state_dict(), "config": json.loads(json.dumps(asdict(cfg)))}, tmp)
    return rep
