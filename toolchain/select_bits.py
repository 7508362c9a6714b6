"""Evaluate a run over bit-widths, and pick per-layer widths for a budget - without retraining.

* :func:`eval_table` - accuracy of a switchable (MEBQAT) run at every candidate (w, a) pair
  (uniform on all but the first/last layer), BatchNorm re-estimated at each pair; CSV + heatmap.
* :func:`select` - greedy per-layer selection under a budget ``"metric<=value"`` measured by a
  cost model (``bitops``, ``weight_bits``; board metrics once hw_models provides the tables):
  start from the widest candidate everywhere, and while over budget take the single one-step
  narrowing (one layer's w, or one site's a) that loses the least selection-set accuracy per
  unit of cost saved. Selection accuracy is measured on a fixed slice of the *training* split;
  the reported accuracy is the test split's.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

from bitfold.core.atomic import atomic_path, write_json
from bitfold.toolchain.bitmap import LayerBits, bitmap_to_json
from bitfold.core.errors import BitfoldError

_BUDGET = re.compile(r"^\s*([a-z_]+)\s*<=\s*([0-9.eE+-]+)\s*([a-zA-Z]*)\s*$")
_UNITS = {"": 1.0, "ms": 1e-3, "us": 1e-6, "s": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "kib": 8192.0, "b": 8.0}


def parse_budget(text: str) -> tuple[str, float]:
    m = _BUDGET.match(text or "")
    if not m:
        raise BitfoldError(f"budget {text!r} is not understood", 'write it as "metric<=value", e.g. "bitops<=5e6"')
    metric, value, unit = m.group(1), float(m.group(2)), m.group(3).lower()
    if unit not in _UNITS:
        raise BitfoldError(f"budget unit {unit!r} is not understood", f"use one of: {', '.join(u for u in _UNITS if u)}")
    return metric, value * _UNITS[unit]


def budget_cost_model(metric: str, board: str | None):
    from bitfold.hw_models.cost import COST_MODELS, get_cost_model
    if metric in COST_MODELS:
        return COST_MODELS[metric]
    if board is None:
        raise BitfoldError(f"budget metric {metric!r} needs a board's cost table", "pass --board, or use bitops / weight_bits")
    cm = get_cost_model(board)  # raises "no cost table for board X yet" until one is measured
    if getattr(cm, "table", {}).get("metric") != metric:
        raise BitfoldError(f"the cost table of {board} measures {getattr(cm, 'table', {}).get('metric', cm.name)!r}, "
                           f"not {metric!r}", f"budget on {getattr(cm, 'table', {}).get('metric', 'bitops')} instead")
    return cm


def _load(run_dir):
    from bitfold.toolchain.runs import dataset_of
    from bitfold.toolchain.describe import describe_layers
    from bitfold.toolchain.runs import load_run
    cfg, model, ck = load_run(run_dir)
    method = model.quant_method
    if not hasattr(method, "uniform_map"):
        raise BitfoldError(f"run {run_dir} was trained with --method {cfg.method}, whose widths are fixed",
                           "eval over bit-widths and select need a --method mebqat run")
    ds = dataset_of(cfg)
    return cfg, model, method, ds, describe_layers(model, ds.input_shape)


def eval_table(run_dir, pairs="all", out_dir=None) -> list[dict]:
    from bitfold.toolchain.train import evaluate
    cfg, model, method, ds, _ = _load(run_dir)
    if pairs == "all":
        pairs = [(w, a) for w in method.candidates for a in method.candidates]
    rows = []
    for w, a in pairs:
        method.deploy(model, method.uniform_map(model, w, a), ds.x_train)
        rows.append({"w": w, "a": a, "accuracy": evaluate(model, ds.x_test, ds.y_test)})
    out_dir = Path(out_dir or run_dir)
    with atomic_path(out_dir / "bits_table.csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            wr = csv.DictWriter(fh, ["w", "a", "accuracy"])
            wr.writeheader()
            wr.writerows(rows)
    _heatmap(rows, out_dir / "bits_table.png", f"{cfg.model} {cfg.method}: test accuracy per (w, a)")
    return rows


def _heatmap(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ws = sorted({r["w"] for r in rows})
    as_ = sorted({r["a"] for r in rows})
    grid = [[next((r["accuracy"] for r in rows if r["w"] == w and r["a"] == a), float("nan")) for a in as_] for w in ws]
    fig, ax = plt.subplots(figsize=(1 + 0.8 * len(as_), 1 + 0.7 * len(ws)))
    im = ax.imshow(grid, cmap="viridis", origin="lower")
    ax.set_xticks(range(len(as_)), [str(a) for a in as_])
    ax.set_yticks(range(len(ws)), [str(w) for w in ws])
    ax.set_xlabel("activation bits a")
    ax.set_ylabel("weight bits w")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.1%}", ha="center", va="center", fontsize=7, color="w")
    ax.set_title(title, fontsize=8)
    fig.colorbar(im)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def select(run_dir, budget: str, board: str | None = None, out_path=None, selection_samples: int = 300) -> dict:
    """Pick per-layer widths that fit ``budget``; write the bit map; return the selection report."""
    from bitfold.toolchain.train import evaluate
    metric, limit = parse_budget(budget)
    cost_model = budget_cost_model(metric, board)
    cfg, model, method, ds, layers = _load(run_dir)
    xs, ys = ds.x_train[-selection_samples:], ds.y_train[-selection_samples:]
    edges = method.edge_layers(model)
    top = max(method.candidates)
    current = {n: (lb if n in edges else LayerBits(top, top)) for n, lb in model.bit_map.items()}
    site_of = {}  # layers that share an activation site move their 'a' together
    for d in layers:
        site_of.setdefault(d.site, []).append(d.name)

    def cost(m):
        return float(cost_model(layers, {n: (b.w, b.a) for n, b in m.items()}).total)

    def acc(m):
        method.deploy(model, m, ds.x_train)
        return evaluate(model, xs, ys)

    def lower(b):
        smaller = [c for c in method.candidates if c < b]
        return max(smaller) if smaller else None

    cur_cost, cur_acc = cost(current), acc(current)
    while cur_cost > limit:
        best = None
        moves = [(n, "w") for n in current if n not in edges]
        moves += [(tuple(g), "a") for g in site_of.values() if not set(g) & edges]
        for target, kind in moves:
            names = target if isinstance(target, tuple) else (target,)
            nb = lower(current[names[0]].w if kind == "w" else current[names[0]].a)
            if nb is None:
                continue
            cand = dict(current)
            for n in names:
                cand[n] = LayerBits(nb, cand[n].a) if kind == "w" else LayerBits(cand[n].w, nb)
            c = cost(cand)
            if c >= cur_cost:
                continue
            a = acc(cand)
            score = (cur_acc - a) / (cur_cost - c)
            if best is None or score < best[0]:
                best = (score, cand, c, a)
        if best is None:
            raise BitfoldError(f"no per-layer choice from the candidates {method.candidates} fits {budget} "
                               f"(narrowest reaches {cur_cost:.4g})", "raise the budget or add narrower candidates")
        _, current, cur_cost, cur_acc = best
    method.deploy(model, current, ds.x_train)
    test_acc = evaluate(model, ds.x_test, ds.y_test)
    tag = re.sub(r"[^a-z0-9]+", "_", f"{board or 'any'}_{metric}_{limit:g}".lower())
    out_path = Path(out_path or Path(run_dir) / f"selected_{tag}.json")
    write_json(out_path, bitmap_to_json(current))
    report = {"budget": budget, "metric": metric, "limit": limit, "board": board, "cost": cur_cost,
              "cost_unit": cost_model.unit, "selection_accuracy": cur_acc, "test_accuracy": test_acc,
              "bit_map": bitmap_to_json(current), "path": str(out_path)}
    write_json(out_path.with_name(out_path.stem + ".report.json"), report)
    return report


def deploy_run(run_dir, bit_map_spec):
    """Load a switchable run and set it to ``bit_map_spec`` (BN re-estimated): ready to export."""
    from bitfold.toolchain.bitmap import BitMap
    cfg, model, method, ds, layers = _load(run_dir)
    bm = BitMap.parse(bit_map_spec).resolve([d.name for d in layers])
    lo = min(method.candidates)
    bad = {n: b for n, b in bm.items() if b.w < 2 or b.a < 2 or b.w > 8 or b.a > 8}
    if bad:
        raise BitfoldError(f"bit map asks for widths outside 2..8 on {', '.join(bad)}", f"use {lo}..8")
    return cfg, method.deploy(model, bm, ds.x_train), ds

