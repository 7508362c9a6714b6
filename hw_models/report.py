"""``bitfold costs``: a board's cost table in words and in a plot, with BitOPs beside it.

The plot has one panel per layer kind: the table's cost of a reference layer of that kind (the
median measured shape, or 64x64 / 16->16 ch 8x8) against uniform widths b = b_w = b_a, against b_w
at the table's middle b_a, and against b_a at its middle b_w; BitOPs of the same layer, scaled by
the least-squares factor that best matches the table on its own grid, is drawn dashed.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from bitfold.hw_models.layers import LayerDesc

from bitfold.hw_models.table import FEATURES, GRID_TERMS

REF = {"linear": LayerDesc("ref", "linear", (64,), (64,), 64, 64, (1, 1), (1, 1), 1, 64 * 64, 64 * 64, None),
       "conv": LayerDesc("ref", "conv", (16, 8, 8), (16, 8, 8), 16, 16, (3, 3), (1, 1), 1, 16 * 9 * 16 * 64,
                         16 * 9 * 16, None)}


def _grid(k):
    return (k["w"], k["a"]) if "w" in k else ([2, 3, 4, 5, 6, 8], [2, 3, 4, 5, 6, 8])


def _cost(cm, kind, bw, ba) -> float:
    """Cost of a chain of two reference layers at (b_w, b_a), per layer (so the first layer's
    output activation, e.g. FPGA thresholds, is part of it)."""
    layers = [REF[kind], replace(REF[kind], name="ref2")]
    return float(cm(layers, {"ref": (float(bw), float(ba)), "ref2": (float(bw), float(ba))}).total) / 2


def bitops_scale(cm, kind) -> tuple[float, float]:
    """(factor, rho): least-squares factor mapping BitOPs onto the table over its own grid, and the
    Spearman correlation between the two there."""
    from scipy.stats import spearmanr
    ws, as_ = _grid(cm.table["kinds"][kind])
    pts = [(w, a) for w in ws for a in as_]
    t = np.array([_cost(cm, kind, w, a) for w, a in pts])
    b = np.array([REF[kind].macs * w * a for w, a in pts], float)
    s = float((t * b).sum() / (b * b).sum())
    rho = float(spearmanr(t, b).statistic) if len(set(t)) > 1 else float("nan")
    return s, rho


def summary_lines(cm) -> list[str]:
    t = cm.table
    p = t["provenance"]
    lines = [f"board {t['board']}: {t['metric']} in {t['unit']}, model {t.get('model', '')}",
             f"provenance: {', '.join(p['sources'])}; tools {', '.join(p['tools'])}; devices {', '.join(p.get('devices', []))}; "
             f"{p['rows']} rows, {p['dates'][0]} .. {p['dates'][1]}"]
    if p.get("note"):
        lines.append(f"note: {p['note']}")
    if t.get("extrapolate"):
        lines.append("above the measured grid the table continues linearly (extrapolated, not measured)")
    for kind, k in t["kinds"].items():
        f = k.get("fit")
        q = (f"fit over {f['rows']} rows / {f['shapes']} shapes: MAPE {f['mape']:.1%}, max {f['max_rel_err']:.1%}"
             if f else "fit quality not recorded (table written before it was)")
        s, rho = bitops_scale(cm, kind)
        if k.get("form") == "features":
            lines.append(f"{kind}: structural model, {q}" + (f", leave-one-shape-out MAPE {f['loso_mape']:.1%}"
                                                           if f.get("loso_mape") is not None else "")
                         + f"; vs BitOPs of a 64x64 layer over W2-8 x A2-8: Spearman {rho:.3f}")
            for name, c in zip(k["features"], k["coef"]):
                lines.append(f"    {name:<6} {c:10.4g}  ({FEATURES[name]})")
            g = np.asarray(k["G"]["value"])
            lines.append(f"    G      {g.min():.4g} .. {g.max():.4g} over W{k['G']['w'][0]}-{k['G']['w'][-1]} x "
                         f"A{k['G']['a'][0]}-{k['G']['a'][-1]}  ({GRID_TERMS['G']})")
            if k["H"]["o"]:
                lines.append("    H      " + ", ".join(f"{o}b: {v:.3g}" for o, v in zip(k["H"]["o"], k["H"]["value"]))
                             + f"  ({GRID_TERMS['H']})")
            continue
        if k.get("form") == "lanes":
            lines.append(f"{kind}: FINN folding at a rate (default {t.get('default_fps', 0):,.0f} inferences/s), {q}; "
                         f"rates fitted (cycles/frame) {f.get('rates')}; FINN's folding rule agrees on "
                         f"{f.get('folding_rule_agrees')} builds; vs BitOPs of a 64x64 layer: Spearman {rho:.3f}")
            for g, what in (("overhead", "per layer"), ("per_lane", "per PE x SIMD lane"),
                            ("per_threshold", "per threshold of the input quantizer (channels x (2^b_a - 1))")):
                v = np.asarray(k[g])
                lines.append(f"    {g:<12} {v.min():.4g} .. {v.max():.4g} {t['unit']} {what} over W{k['w'][0]}-{k['w'][-1]} "
                             f"x A{k['a'][0]}-{k['a'][-1]}")
            continue
        lines.append(f"{kind}: overhead {k['overhead']:.4g} {t['unit']}/layer; {q}; "
                     f"{'flat in bits' if k['flat_in_bits'] else 'spread ' + format(k['spread'], '.2f') + 'x'}; "
                     f"vs BitOPs on the grid: Spearman {rho:.3f}")
    if t.get("calibration"):
        c = t["calibration"]
        lines.append(f"whole-model calibration: x{c['scale']:.3f} from {c['models']} measured models "
                     f"(MAPE {c['mape_before']:.1%} -> {c['mape_after']:.1%})")
    return lines


def plot_costs(cm, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kinds = list(cm.table["kinds"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        ws, as_ = _grid(cm.table["kinds"][kind])
        s, _ = bitops_scale(cm, kind)
        bs = np.linspace(min(ws[0], as_[0]), max(ws[-1], as_[-1]), 41)
        wm, am = ws[len(ws) // 2], as_[len(as_) // 2]
        for lab, f, g in ((r"$b_w=b_a=b$", lambda b: (b, b), lambda b: b * b),
                          (f"$b_w=b$, $b_a={am}$", lambda b: (b, am), lambda b: b * am),
                          (f"$b_a=b$, $b_w={wm}$", lambda b: (wm, b), lambda b: wm * b)):
            line, = ax.plot(bs, [_cost(cm, kind, *f(b)) for b in bs], label=f"table: {lab}")
            ax.plot(bs, [s * REF[kind].macs * g(b) for b in bs], "--", color=line.get_color(), alpha=0.6,
                    label=f"BitOPs x{s:.2g}: {lab}")
        ax.set_xlabel("bits")
        ax.set_ylabel(f"{cm.table['metric']} ({cm.table['unit']}) of a reference {kind} layer ({REF[kind].macs} MACs)")
        ax.set_title(f"{cm.table['board']}: {kind}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
    return path


def describe_cost_model(name: str) -> dict:
    """What ``bitfold costs`` shows of a cost model: ``{"kind": "table", "source", "lines", "table",
    "model"}`` for a measured table, ``{"kind": "energy", "lines"}`` for an energy model; an analytic
    model (bitops, weight_bits) is one clear error."""
    from bitfold.core.errors import BitfoldError
    from bitfold.hw_models.cost import get_cost_model
    from bitfold.hw_models.energy import EnergyModel
    from bitfold.hw_models.table import TableCostModel
    cm = get_cost_model(name)
    if isinstance(cm, TableCostModel) and "kinds" in cm.table:
        return {"kind": "table", "source": cm.source, "lines": summary_lines(cm), "table": cm.table, "model": cm}
    if isinstance(cm, EnergyModel):
        p = cm.table["provenance"]
        lines = [f"{cm.name}: {cm.table['model']}"]
        lines += [f"  {op}: " + ", ".join(f"{b:g} -> {e:g} pJ" for b, e in pts) for op, pts in cm.table["ops"].items()]
        lines.append(f"source: {p['source']}; {p.get('citation') or p.get('csv', '')}")
        return {"kind": "energy", "lines": lines}
    raise BitfoldError(f"{name!r} is an analytic cost model ({cm}), not a table", "give a board name")
