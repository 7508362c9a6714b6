"""Fitted per-board cost tables and their differentiable interpolation (a ``CostModel``).

Two forms:

* grid (CPU latency, FINN estimates, icebreaker): per layer kind, a grid over (b_w, b_a) of the
  cost per MAC, ``cost(layer) = overhead + macs^p * f(b_w, b_a)``; ``p`` = 1 unless a power law fits
  the measured layer sizes better (CPU latency grows faster than MACs once weights leave the caches);
* features (open FPGA flow, ulx3s-85f): a structural model of the backend's layer block, see
  :func:`fit_features`.

Widths are interpolated bilinearly between grid points (clamped outside), so the fractional widths
of AdaQAT get a gradient; where the measurements say cost does not change with bits (int8 kernels
on a CPU), the gradient is honestly (near) zero. Where CPU rows name the kernel that ran (``bitfold
calibrate`` on a TVM board: ``extra["kernel"]``), the cells above the widest width any sub-8-bit
kernel ran at are one kernel (the int8 fallback): they are fitted as one cell (``fallback``). Its cost
is what the table predicts from the next integer width on; its *gradient*, between that width and the
top of the grid, is relaxed along ``max(b_w, b_a)`` - a layer gets cheaper only when its wider operand
narrows, which is what the backend's rule (both widths small enough) means, so a width optimiser
starting at W8A8 sees the way down instead of a flat plateau. A table may carry a whole-model factor fitted to
built models (``calibration``).

Tables are JSON with provenance, looked up in ``$BITFOLD_HOME/tables/<board>.json`` (written by
``bitfold calibrate`` / ``bitfold hw fit``) and then in the package's own ``hw_models/tables/``.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from bitfold.core.errors import BitfoldError

from bitfold.hw_models.cost import CostResult
from bitfold.hw_models.finn_rules import DEFAULT_FPS, model_fold, target_cycles
from bitfold.hw_models.layers import LayerDesc
from bitfold.core.paths import bitfold_home
from bitfold.hw_models.store import Measurement


#: per-MAC costs of one layer kind that differ by less than this fraction across widths are treated
#: as equal: timing noise would otherwise hand an optimiser (Adam normalises gradient magnitudes) a
#: consistent but meaningless slope.
NOISE_FLOOR = 0.05


def fit_table(rows: list[Measurement], board: str, metric: str, noise_floor: float = NOISE_FLOOR) -> dict:
    rows = [r for r in rows if r.metric == metric and r.kind in ("conv", "linear")]
    if not rows:
        raise BitfoldError(f"no {metric!r} measurements for board {board!r}",
                           f"run `bitfold hw measure --board {board}` first")
    table = {"board": board, "metric": metric, "unit": rows[0].unit, "model": "overhead + macs^exponent * f(b_w, b_a)",
             "kinds": {}, "provenance": {
                 "sources": sorted({r.source for r in rows}), "tools": sorted({f"{r.tool} {r.tool_version}".strip() for r in rows}),
                 "devices": sorted({r.device_id for r in rows}), "rows": len(rows),
                 "dates": [min(r.date for r in rows), max(r.date for r in rows)]}}
    for kind in sorted({r.kind for r in rows}):
        kr = [r for r in rows if r.kind == kind]
        if any("target_cycles" in r.extra for r in kr):   # FINN boards: rows at several rates
            table["model"] = "sum over layers of overhead + lanes(layer, rate) * per_lane (+ input thresholds * per_threshold)"
            table["default_fps"] = DEFAULT_FPS
            table["kinds"][kind] = fit_lanes([r for r in kr if "target_cycles" in r.extra])
            continue
        if any(r.extra.get("block") for r in kr):   # open-flow building blocks: the structural model
            table["model"] = "sum over layers of coef . features(layer, b_w, b_a, next layer's b_a)"
            table["kinds"][kind] = fit_features([r for r in kr if r.extra.get("block")])
            continue
        ws, as_ = sorted({r.b_w for r in kr}), sorted({r.b_a for r in kr})
        fallback = fallback_kernel(kr)
        cell = _cell_key(fallback)
        slope = np.full((len(ws), len(as_)), np.nan)
        overheads = []
        for i, w in enumerate(ws):
            for j, a in enumerate(as_):
                pts = [(r.macs, r.value) for r in kr if cell(r.b_w, r.b_a) == cell(w, a)]
                if not pts:
                    continue
                macs = np.array([p[0] for p in pts], float)
                val = np.array([p[1] for p in pts], float)
                if len(set(macs)) >= 2:
                    c1, c0 = np.polyfit(macs, val, 1, w=1 / val)   # relative error: small layers count
                    c1 = max(c1, 0.0)
                    overheads.append(max(c0, 0.0))
                else:
                    c1 = float(val.mean() / macs.mean())
                slope[i, j] = c1
        if np.isnan(slope).any():  # fill holes from the nearest measured point along b_a, then b_w
            for i in range(len(ws)):
                row = slope[i]
                if np.isnan(row).all():
                    continue
                idx = np.flatnonzero(~np.isnan(row))
                slope[i] = np.interp(range(len(as_)), idx, row[idx])
            for j in range(len(as_)):
                col = slope[:, j]
                idx = np.flatnonzero(~np.isnan(col))
                slope[:, j] = np.interp(range(len(ws)), idx, col[idx])
        spread = (slope.max() - slope.min()) / max(abs(slope.mean()), 1e-30)
        flat = bool(spread < noise_floor)
        if flat:
            slope[:] = slope.mean()
        ov = statistics.median(overheads) if overheads else 0.0
        meas = np.array([r.value for r in kr])
        pred = np.array([ov + r.macs * slope[ws.index(r.b_w), as_.index(r.b_a)] for r in kr])
        rel = np.abs(pred - meas) / np.maximum(np.abs(meas), 1e-30)
        exponent = 1.0
        power = _fit_power(kr, ws, as_, noise_floor, cell)
        if power is not None and power[2].mean() < rel.mean():   # cost ~ MACs^p fits better (CPU caches)
            exponent, slope, rel = power
            ov, spread, flat = 0.0, float((slope.max() - slope.min()) / slope.mean()), bool((slope == slope.flat[0]).all())
        table["kinds"][kind] = {"w": ws, "a": as_, "per_mac": slope.tolist(), "flat_in_bits": flat,
                                "spread": float(spread), "overhead": ov, "exponent": exponent,
                                "fit": {"rows": len(kr), "shapes": len({(r.in_features, r.out_features, r.kernel, r.spatial) for r in kr}),
                                        "mape": float(rel.mean()), "max_rel_err": float(rel.max())}}
        if fallback is not None:
            table["kinds"][kind]["fallback"] = fallback
    return table


def fallback_kernel(rows: list[Measurement]) -> dict | None:
    """The int8 fallback of a CPU table's rows, when the rows name their kernels: every cell whose
    wider width is above the widest width any other kernel ran at. None when the rows carry no kernel
    names or every row ran int8."""
    others = [max(r.b_w, r.b_a) for r in rows if r.extra.get("kernel") not in (None, "int8")]
    if not others:
        return None
    above = max(others)
    pooled = [r for r in rows if max(r.b_w, r.b_a) > above]
    if not pooled or any(r.extra.get("kernel") != "int8" for r in pooled):
        return None
    return {"kernel": "int8", "above": above}


def _cell_key(fallback: dict | None):
    """Grid cell of a width pair; the fallback kernel's cells are one cell."""
    def key(w, a):
        return ("fallback",) if fallback and max(w, a) > fallback["above"] else (w, a)
    return key


def _fit_power(kr, ws, as_, noise_floor, cell=lambda w, a: (w, a)):
    """cost = c(b_w, b_a) * MACs^p with one exponent p per layer kind: least squares in log space
    (relative error) with one intercept per measured width cell (``cell`` maps a width pair to its
    cell); None without two layer sizes. Returns (p, c grid, relative errors)."""
    macs = np.array([r.macs for r in kr], float)
    if len(set(macs)) < 2:
        return None
    cells = sorted({cell(r.b_w, r.b_a) for r in kr}, key=str)
    X = np.zeros((len(kr), 1 + len(cells)))
    X[:, 0] = np.log(macs)
    for i, r in enumerate(kr):
        X[i, 1 + cells.index(cell(r.b_w, r.b_a))] = 1.0
    y = np.log([r.value for r in kr])
    sol = np.linalg.lstsq(X, y, rcond=None)[0]
    p = float(sol[0])
    c = np.full((len(ws), len(as_)), np.nan)
    fit = dict(zip(cells, np.exp(sol[1:])))
    for (w, a) in {(r.b_w, r.b_a) for r in kr}:
        c[ws.index(w), as_.index(a)] = fit[cell(w, a)]
    c = _fill(c)
    if (c.max() - c.min()) / c.mean() < noise_floor:
        c[:] = c.mean()
    pred = np.array([c[ws.index(r.b_w), as_.index(r.b_a)] * r.macs ** p for r in kr])
    return p, c, np.abs(pred - np.exp(y)) / np.exp(y)


def _interp1(grid: torch.Tensor, x: torch.Tensor, extrapolate: bool = False):
    """Bracket index and weight for linear interpolation of x on a sorted grid (clamped; with
    ``extrapolate``, continued along the last segment above the grid)."""
    xc = x.clamp(min=float(grid[0])) if extrapolate else x.clamp(float(grid[0]), float(grid[-1]))
    if len(grid) == 1:
        return torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long), xc * 0
    i = torch.searchsorted(grid, xc.detach().reshape(1), right=True).clamp(1, len(grid) - 1)[0]
    lo, hi = grid[i - 1], grid[i]
    return i - 1, i, (xc - lo) / (hi - lo)


@dataclass
class TableCostModel:
    table: dict
    source: str = ""
    target_fps: float | None = None   # FPGA tables: price the folding that reaches this rate
    clock_mhz: float | None = None    # the board's clock, read once by at_rate

    @property
    def prices_rate(self) -> bool:
        """Whether the table prices a layer at a target rate (the open-flow structural tables);
        the others (e.g. FINN boards') price the one folding their rows were measured at."""
        return any(k.get("form") in RATE_FORMS for k in self.table["kinds"].values())

    def at_rate(self, target_fps: float | None) -> "TableCostModel":
        """The same table pricing each layer folded to reach ``target_fps`` inferences/s at the
        board's clock (features-form FPGA tables; others are returned unchanged)."""
        if target_fps is not None and target_fps <= 0:
            raise BitfoldError(f"--target-fps must be > 0, got {target_fps}")
        if not self.prices_rate:
            if target_fps:
                raise BitfoldError(f"the {self.name} table is not an FPGA structural table: it has no rate",
                                   "--target-fps applies to FPGA boards (ulx3s-85f, icebreaker, pynq-z2, ...)")
            return self
        clock = None
        if target_fps:
            from bitfold.boards import load_board
            clock = load_board(self.table["board"]).design_mhz
        return TableCostModel(self.table, self.source, target_fps, clock)

    def cycles_budget(self) -> float | None:
        return self.clock_mhz * 1e6 / self.target_fps if self.target_fps and self.clock_mhz else None

    def lanes_cycles(self) -> int:
        """Lanes-form tables: FINN's cycles per frame at the asked rate, else at the rate ``bitfold
        build`` asks FINN for by default (the table's ``default_fps``)."""
        if self.clock_mhz is None:   # read once: the cost is evaluated at every training step
            from bitfold.boards import load_board
            self.clock_mhz = load_board(self.table["board"]).design_mhz
        return target_cycles(self.clock_mhz, self.target_fps or self.table.get("default_fps", DEFAULT_FPS))

    @property
    def measured_out_bits(self) -> int | None:
        """FPGA structural tables: the widest thresholded layer output the table was fitted on
        (wider outputs would be extrapolated); None for tables without a threshold term."""
        for k in self.table["kinds"].values():
            if k.get("form") == "features" and k["H"]["o"]:
                return int(max(k["H"]["o"]))
        return None

    @property
    def name(self) -> str:
        return self.table["board"]

    @property
    def unit(self) -> str:
        return self.table["unit"]

    @property
    def scale(self) -> float:
        """Whole-model correction fitted from measured models (:func:`fit_model_factor`); 1 if none."""
        return float(self.table.get("calibration", {}).get("scale", 1.0))

    def per_mac(self, kind: str, bw, ba) -> torch.Tensor:
        k = self.table["kinds"].get(kind) or next(iter(self.table["kinds"].values()))
        fb = k.get("fallback")
        if fb is None:
            return self.bilinear(k, "per_mac", bw, ba)
        # Up to the fallback's width: the grid. Above it the value is the fallback kernel's from the next
        # integer width on (linear between the two integer widths, like the grid between its points), so
        # a predicted cost equals the measured one; the gradient is that of a ramp from the grid's value
        # at the capped widths to the fallback's cost along the wider width, up to the top of the grid
        # (see the module docstring): a width optimiser sees the way down from W8A8.
        bw = bw if isinstance(bw, torch.Tensor) else torch.tensor(float(bw))
        ba = ba if isinstance(ba, torch.Tensor) else torch.tensor(float(ba))
        above, top = float(fb["above"]), float(max(max(k["w"]), max(k["a"])))
        low = self.bilinear(k, "per_mac", bw.clamp(max=above), ba.clamp(max=above))
        high = float(k["per_mac"][-1][-1])
        wider = torch.maximum(bw, ba)
        step = low + (wider - above).clamp(0.0, 1.0) * (high - low)
        ramp = low + ((wider - above) / max(top - above, 1e-9)).clamp(0.0, 1.0) * (high - low)
        return step.detach() + (ramp - ramp.detach())

    def bilinear(self, k: dict, key: str, bw, ba) -> torch.Tensor:
        """Grid ``k[key]`` over (k["w"], k["a"]) interpolated at (bw, ba), differentiable in both."""
        gw = torch.tensor(k["w"], dtype=torch.float32)
        ga = torch.tensor(k["a"], dtype=torch.float32)
        v = torch.tensor(k[key], dtype=torch.float32)
        bw = bw if isinstance(bw, torch.Tensor) else torch.tensor(float(bw))
        ba = ba if isinstance(ba, torch.Tensor) else torch.tensor(float(ba))
        ext = bool(self.table.get("extrapolate", False))
        i0, i1, tw = _interp1(gw, bw, ext)
        j0, j1, ta = _interp1(ga, ba, ext)
        top = v[i0, j0] * (1 - ta) + v[i0, j1] * ta
        bot = v[i1, j0] * (1 - ta) + v[i1, j1] * ta
        return top * (1 - tw) + bot * tw

    def __call__(self, layers, bits) -> CostResult:
        kinds = self.table["kinds"]
        if any(k.get("form") == "features" for k in kinds.values()):
            entry = next(k for k in kinds.values() if k.get("form") == "features")
            per = features_cost(entry, layers, bits, self.scale, self.cycles_budget())
            total = torch.stack(list(per.values())).sum() if per else torch.tensor(0.0)
            return CostResult(total, per, self.unit)
        per = {}
        if any(k.get("form") == "lanes" for k in kinds.values()):
            folds = model_fold(layers, [int(round(float(bits[d.name][0]))) for d in layers], self.lanes_cycles())
            for i, (d, (pe, simd)) in enumerate(zip(layers, folds)):
                bw, ba = bits[d.name]
                k = kinds.get(d.kind) or next(iter(kinds.values()))
                lanes = pe * simd
                c = self.bilinear(k, "overhead", bw, ba) + lanes * self.bilinear(k, "per_lane", bw, ba)
                if i == 0:   # the input quantizer: FINN's one stand-alone thresholding layer (in LUTs)
                    c = c + thresholds(d.in_features, ba) * self.bilinear(k, "per_threshold", bw, ba)
                per[d.name] = self.scale * c
            total = torch.stack(list(per.values())).sum() if per else torch.tensor(0.0)
            return CostResult(total, per, self.unit)
        for d in layers:
            bw, ba = bits[d.name]
            k = self.table["kinds"].get(d.kind) or next(iter(self.table["kinds"].values()))
            per[d.name] = self.scale * (k["overhead"] + d.macs ** k.get("exponent", 1.0) * self.per_mac(d.kind, bw, ba))
        total = torch.stack(list(per.values())).sum() if per else torch.tensor(0.0)
        return CostResult(total, per, self.unit)


def table_path(board: str) -> Path:
    return bitfold_home() / "tables" / f"{board}.json"


def shipped_table_path(board: str) -> Path:
    return Path(str(resources.files("bitfold.hw_models"))) / "tables" / f"{board}.json"


def load_table_file(path, board: str | None = None) -> TableCostModel:
    """Read and check a table file; a corrupt or foreign file is one clear error."""
    p = Path(path)
    fix = f"re-run `bitfold calibrate --board {board}`" if board else "point at a table written by `bitfold calibrate`"
    if not p.is_file():
        raise BitfoldError(f"cost table {p} does not exist", fix)
    try:
        t = json.loads(p.read_text())
        kinds = t["kinds"]
        for k in kinds.values():
            if k.get("form") == "features":
                check_features_entry(k)
                continue
            if k.get("form") == "lanes":
                check_lanes_entry(k)
                continue
            v = np.asarray(k["per_mac"], dtype=float)
            if v.shape != (len(k["w"]), len(k["a"])) or not np.isfinite(v).all() or list(k["w"]) != sorted(k["w"]) \
                    or list(k["a"]) != sorted(k["a"]):
                raise ValueError("grid and per_mac do not match")
            float(k["overhead"])
            if "fallback" in k and not float(k["fallback"]["above"]) < max(max(k["w"]), max(k["a"])):
                raise ValueError("the fallback kernel's width is not inside the grid")
        t["board"], t["metric"], t["unit"], t["provenance"]["sources"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise BitfoldError(f"cost table {p} is corrupt or not a bitfold cost table ({type(e).__name__}: {e})", fix) from e
    if board is not None and t["board"] != board:
        raise BitfoldError(f"cost table {p} belongs to board {t['board']!r}, not {board!r}", fix)
    return TableCostModel(t, str(p))


def find_table(board: str) -> TableCostModel | None:
    for p in (table_path(board), shipped_table_path(board)):
        if p.is_file():
            return load_table_file(p, board)
    return None


def fit_model_factor(table: dict, pairs: list[tuple[float, float]]) -> dict:
    """A copy of ``table`` with a whole-model correction factor fitted to (predicted, measured)
    pairs of built models: least squares of the *relative* errors (s * p - m) / m, on the table's
    uncorrected predictions - through the origin on absolute LUTs the largest model decided the
    factor alone (2026-12-05: 1.21 from the W5A5 / W6A6 digits MLPs, which doubled the error on the
    other five). ``calibration`` records the in-sample error before and after, and the
    leave-one-out error (each model predicted with the factor fitted on the others; ``None``
    with fewer than two models) - the error to expect on a model the factor has not seen."""
    pairs = [(float(p), float(m)) for p, m in pairs if p > 0 and m > 0]
    if not pairs:
        return table
    p = np.array([x[0] for x in pairs])
    m = np.array([x[1] for x in pairs])
    r = p / m
    s = float(r.sum() / (r * r).sum())
    loo = None
    if len(pairs) >= 2:
        errs = []
        for i in range(len(p)):
            keep = np.arange(len(p)) != i
            si = float(r[keep].sum() / (r[keep] * r[keep]).sum())
            errs.append(abs(si * p[i] - m[i]) / m[i])
        loo = float(np.mean(errs))
    out = json.loads(json.dumps(table))
    out["calibration"] = {"scale": s, "models": len(pairs),
                          "mape_before": float(np.mean(np.abs(p - m) / m)),
                          "mape_after": float(np.mean(np.abs(s * p - m) / m)),
                          "mape_loo": loo}
    return out


def refit_model_factor(table: dict, evidence: list[dict], note: str | None = None) -> dict:
    """Refit the whole-model factor of ``table`` from measured models: each evidence entry holds
    the model's layers (``LayerDesc.as_dict()`` records), its integer widths ``{layer: [w, a]}`` and
    the ``measured`` whole-model cost. The table's own (uncorrected) prediction of each model is
    recomputed, so the factor stays right when the table underneath was refitted."""
    from bitfold.hw_models.layers import LayerDesc
    base = json.loads(json.dumps(table))
    base.pop("calibration", None)
    cm = TableCostModel(base)
    ev = []
    for e in evidence:
        layers = [LayerDesc.from_dict(d) for d in e["layers"]]
        pred = float(cm(layers, {k: tuple(v) for k, v in e["bits"].items()}).total)
        ev.append({**e, "predicted": pred})
    out = fit_model_factor(base, [(e["predicted"], e["measured"]) for e in ev])
    if "calibration" in out:
        out["calibration"]["note"] = note
        out["calibration"]["models_measured"] = ev
    return out


# --- the "features" form: a fitted structural model of one dataflow layer (open FPGA flow) --------
#
# cost(layer) = coef . linear features  +  lanes * (G(b_w, b_a) + H(b_out))
#
# G is the measured LUTs per lane (one b_w x (b_a+1) multiplier and its adder-tree slot) over a
# grid of integer widths: yosys maps each width pair its own way (a 4x4 block came out smaller than
# 4x3), so no smooth formula in the bits fits it. H is the per-lane change when the accumulator
# feeds b_out-bit thresholds instead of leaving raw (either sign). The weight and threshold ROMs
# cost LUTs per bit only while yosys keeps them in logic: it moves a ROM to block RAM where that is
# cheaper by its own cost model, which :func:`bitfold.hw_models.fpga_rules.rom_brams` replicates, so the
# model knows which ROMs leave the LUT count (a 64x64 W6 layer's weights do, a 64x32 one's do not).
# Both grids are interpolated bilinearly / linearly between grid points, so fractional AdaQAT bits
# get a gradient; the ROM placement is decided at the rounded widths.

#: linear features (names -> what they count)
FEATURES = {"one": "per layer (control, counters, stream handshake)",
            "out": "output element width (the stream to the next stage or host)",
            "wlog": "weight ROM bits kept in logic (0 when yosys puts the ROM in block RAM)",
            "tlog": "threshold ROM bits kept in logic (out ch * (2^b_out - 1) * acc bits)"}
GRID_TERMS = {"G": "LUTs per lane (PE*SIMD) over (b_w, b_a): multiplier + adder-tree slot",
              "H": "LUTs per lane over b_out: thresholded vs raw accumulator (either sign)"}


def _t(x):
    return x if isinstance(x, torch.Tensor) else torch.tensor(float(x))


def acc_bits_estimate(mw, bw, ba) -> torch.Tensor:
    """Accumulator width (signed bits, continuous) of a layer with mw inputs, uniformly spread
    b_w-bit weights and b_a-bit inputs: the lowering sizes it to the positive weights' sum times
    the largest input code; its ceiling is what the RTL uses."""
    bw, ba = _t(bw), _t(ba)
    lim = torch.clamp(2 ** (bw - 1) - 1, min=1.0)
    return torch.log2(mw * (lim + 1) / 4 * (2 ** ba - 1) + 1) + 1


def mvau_terms(mw, oc, ic, bw, ba, bout, family: str = "ecp5", fold: tuple | None = None):
    """(linear features, lanes, block RAMs) of one folded layer; torch, differentiable in the
    widths; ``bout=None``: raw accumulator output; ``fold`` (PE, SIMD): default the fixed rule
    the one-layer blocks were built with (:func:`bitfold.hw_models.fpga_rules.folding_for`)."""
    import math

    from bitfold.hw_models.fpga_rules import PARALLEL_THRESHOLDS, folding_for, rom_brams
    pe, simd = fold if fold is not None else folding_for(int(mw), int(oc), int(ic))
    lanes = pe * simd
    bw, ba = _t(bw), _t(ba)
    acc = acc_bits_estimate(mw, bw, ba)
    acc_i = math.ceil(float(acc))
    depth = (oc // pe) * (mw // simd)
    nw = rom_brams(lanes * max(2, round(float(bw))), depth, family)
    wlog = depth * lanes * torch.clamp(bw, min=2.0) * (nw == 0)
    if bout is None:
        tlog, obits, nt = acc * 0, acc, 0
    else:
        bout = _t(bout)
        bo = round(float(bout))
        if 2 ** bo - 1 > PARALLEL_THRESHOLDS:
            # the RTL's binary search: per lane, level l is a memory of (oc/pe) 2^l thresholds; the
            # shallow levels stay in logic, the deep ones go to block RAM (as yosys places them)
            in_bram = [rom_brams(acc_i, (oc // pe) << level, family) for level in range(bo)]
            nt = pe * sum(in_bram)
            kept = float(sum(1 for n in in_bram if n == 0))
            tlog = oc * (2 ** torch.clamp(bout, max=kept) - 1) * acc
        else:
            nt = rom_brams(pe * (2 ** bo - 1) * acc_i, oc // pe, family)
            tlog = oc * (2 ** bout - 1) * acc * (nt == 0)
        obits = bout
    return torch.stack([acc * 0 + 1, obits, wlog, tlog]), lanes, nw + nt


def _grid2(g: dict, bw, ba):
    gw, ga = torch.tensor(g["w"], dtype=torch.float32), torch.tensor(g["a"], dtype=torch.float32)
    v = torch.tensor(g["value"], dtype=torch.float32)
    i0, i1, tw = _interp1(gw, _t(bw))
    j0, j1, ta = _interp1(ga, _t(ba))
    return (v[i0, j0] * (1 - ta) + v[i0, j1] * ta) * (1 - tw) + (v[i1, j0] * (1 - ta) + v[i1, j1] * ta) * tw


def _grid1(h: dict, bout):
    go, v = torch.tensor(h["o"], dtype=torch.float32), torch.tensor(h["value"], dtype=torch.float32)
    i0, i1, t = _interp1(go, _t(bout))
    return v[i0] * (1 - t) + v[i1] * t


def mvau_cost(entry: dict, mw, oc, ic, bw, ba, bout, fold: tuple | None = None):
    """Predicted cost of one layer block under a fitted features entry (a torch scalar)."""
    f, lanes, _ = mvau_terms(mw, oc, ic, bw, ba, bout, entry.get("family", "ecp5"), fold)
    c = (f.to(torch.float32) * torch.tensor(entry["coef"], dtype=torch.float32)).sum()
    c = c + lanes * _grid2(entry["G"], bw, ba)
    if bout is not None and entry["H"]["o"]:
        c = c + lanes * _grid1(entry["H"], bout)
    return c


def _fill(v: np.ndarray) -> np.ndarray:
    """Fill unmeasured grid cells (nan) by linear interpolation along the last axis, then the first."""
    v = v.copy()
    if v.ndim == 1:
        idx = np.flatnonzero(~np.isnan(v))
        return np.interp(np.arange(len(v)), idx, v[idx]) if len(idx) else np.zeros_like(v)
    for i in range(v.shape[0]):
        if not np.isnan(v[i]).all():
            v[i] = _fill(v[i])
    for j in range(v.shape[1]):
        v[:, j] = _fill(v[:, j])
    return v


def fit_features(rows: list[Measurement]) -> dict:
    """Bounded least squares (relative error weighted) of the measured one-layer blocks on the
    structural model: linear coefficients and G non-negative, H signed, all jointly.
    Residuals in-sample and leave-one-shape-out (the shape's rows are predicted by a fit without them)."""
    from scipy.optimize import lsq_linear

    from bitfold.boards import load_board
    family = load_board(rows[0].board).family
    ws = sorted({r.b_w for r in rows})
    as_ = sorted({r.b_a for r in rows})
    os_ = sorted({r.extra["b_out"] for r in rows if r.extra.get("b_out") is not None})
    nl = len(FEATURES)

    def design(r):
        mw = r.in_features * r.kernel ** 2
        bout = r.extra.get("b_out")
        f, lanes, _ = mvau_terms(mw, r.out_features, r.in_features, r.b_w, r.b_a, bout, family)
        x = np.zeros(nl + len(ws) * len(as_) + len(os_))
        x[:nl] = f.numpy()
        x[nl + ws.index(r.b_w) * len(as_) + as_.index(r.b_a)] = lanes
        if bout is not None:
            x[nl + len(ws) * len(as_) + os_.index(bout)] = lanes
        return x
    X = np.array([design(r) for r in rows])
    y = np.array([r.value for r in rows], float)

    def solve(m):
        Xs, ys = X[m], y[m]
        norm = np.maximum(Xs.max(0), 1e-12)
        lb = np.zeros(X.shape[1])
        lb[nl + len(ws) * len(as_):] = -np.inf
        c = lsq_linear(Xs / norm / ys[:, None], np.ones(len(ys)), bounds=(lb, np.inf)).x / norm
        c[Xs.max(0) == 0] = np.nan          # no row measured this cell
        return c

    def entry(c):
        g = c[nl:nl + len(ws) * len(as_)].reshape(len(ws), len(as_))
        h = c[nl + len(ws) * len(as_):]
        return {"form": "features", "family": family, "features": list(FEATURES), "coef": np.nan_to_num(c[:nl]).tolist(),
                "G": {"w": ws, "a": as_, "value": _fill(g).tolist()},
                "H": {"o": os_, "value": _fill(h).tolist() if len(os_) else []}}

    def predict(e, r):
        return float(mvau_cost(e, r.in_features * r.kernel ** 2, r.out_features, r.in_features, r.b_w, r.b_a,
                               r.extra.get("b_out")))
    out = entry(solve(np.ones(len(rows), bool)))
    rel = np.array([abs(predict(out, r) - r.value) / r.value for r in rows])
    shape_of = [(r.in_features, r.out_features, r.kernel) for r in rows]
    shapes = sorted(set(shape_of))
    loso = []
    if len(shapes) > 1:
        for s in shapes:
            m = np.array([k == s for k in shape_of])
            e = entry(solve(~m))
            loso += [abs(predict(e, r) - r.value) / r.value for r, k in zip(rows, m) if k]
    out["fit"] = {"rows": len(rows), "shapes": len(shapes), "mape": float(rel.mean()), "max_rel_err": float(rel.max()),
                  "loso_mape": float(np.mean(loso)) if loso else None,
                  "loso_max_rel_err": float(np.max(loso)) if loso else None}
    return out


def check_features_entry(k: dict) -> None:
    """Raise ValueError unless ``k`` is a well-formed features entry."""
    c = np.asarray(k["coef"], dtype=float)
    if c.shape != (len(FEATURES),) or not np.isfinite(c).all() or (c < 0).any():
        raise ValueError(f"features form needs {len(FEATURES)} finite non-negative coefficients "
                         f"({', '.join(FEATURES)}); this file has {c.size} (an older bitfold's table?)")
    g = k["G"]["value"]
    if len(g) != len(k["G"]["w"]) or any(len(row) != len(k["G"]["a"]) for row in g) or not g \
            or not np.isfinite(np.asarray(g, dtype=float)).all():
        raise ValueError("per-lane grid G does not match its widths")
    if len(k["H"]["value"]) != len(k["H"]["o"]) or not np.isfinite(np.asarray(k["H"]["value"], float)).all():
        raise ValueError("threshold grid H does not match its widths")
    for ax in (k["G"]["w"], k["G"]["a"], k["H"]["o"]):
        if list(ax) != sorted(ax):
            raise ValueError("grid widths are not sorted")


def features_cost(kind_entry: dict, layers, bits, scale: float = 1.0, cycles_budget: float | None = None) -> dict:
    """Per-layer cost of a chain of layers under the features form: layer i's thresholds produce
    layer i+1's input width; the last layer streams its raw accumulator out. ``cycles_budget``
    (clock / target rate): each layer folded just enough to meet it
    (:func:`bitfold.hw_models.fpga_rules.fold_at_rate`) instead of the fixed rule."""
    from bitfold.hw_models.fpga_rules import StageShape, fold_at_rate
    per = {}
    for i, d in enumerate(layers):
        bw, ba = bits[d.name]
        bout = None if i == len(layers) - 1 else bits[layers[i + 1].name][1]
        mw = d.kernel[0] * d.kernel[1] * d.in_features // max(1, d.groups)
        fold = fold_at_rate(StageShape.of_layer(d), cycles_budget) if cycles_budget else None
        per[d.name] = scale * mvau_cost(kind_entry, mw, d.out_features, d.in_features // max(1, d.groups), bw, ba,
                                        bout, fold)
    return per


# --- the "lanes" form: FINN boards priced at a rate ---------------------------------------------------
# FINN folds every MVAU to reach the asked rate (hw_models.finn_rules): its LUTs grow with the lanes
# (PE x SIMD) it was given. The model's input quantizer becomes a stand-alone thresholding layer whose
# LUTs grow with the input channels and 2^b_a (priced on the first layer only); the thresholds of the
# hidden activations are absorbed into the MVAU before them, whose threshold memory FINN puts in block
# RAM (measured: a 64-channel MVAU with 8-bit output thresholds costs as many LUTs as with 2-bit ones).
# Per measured (b_w, b_a) cell a non-negative least-squares fit (relative error) of
#     cost = overhead + lanes * per_lane + in_channels * (2^b_a - 1) * per_threshold
# over one-layer builds of several shapes at several rates. The threshold count carries the 2^b_a
# growth, so per_threshold is nearly flat in the widths (pynq-z2: 0.48-0.50 LUT) and interpolates
# between measured widths (linear interpolation of a per-channel cost between A4 and A8 priced an A5
# input 2.4x too high).

#: the table forms that price a layer at a target rate
RATE_FORMS = ("features", "lanes")
LANE_GRIDS = ("overhead", "per_lane", "per_threshold")


def thresholds(channels: int, b_a):
    """Thresholds of a b_a-bit activation over ``channels`` channels (differentiable in b_a)."""
    b = b_a if isinstance(b_a, torch.Tensor) else torch.tensor(float(b_a))
    return channels * (2.0 ** b - 1.0)


def fit_lanes(rows: list[Measurement]) -> dict:
    from scipy.optimize import nnls
    ws, as_ = sorted({r.b_w for r in rows}), sorted({r.b_a for r in rows})
    grids = {g: np.full((len(ws), len(as_)), np.nan) for g in LANE_GRIDS}
    rel, agree = [], 0
    for r in rows:     # FINN's folding rule, as the cost model applies it, against what FINN chose
        d = _row_layer(r)
        pe, simd = model_fold([d], [r.b_w], int(r.extra["target_cycles"]))[0]
        agree += pe * simd == r.parallelism
    for i, w in enumerate(ws):
        for j, a in enumerate(as_):
            cell = [r for r in rows if r.b_w == w and r.b_a == a]
            if not cell:
                continue
            X = np.array([[1.0, r.parallelism, r.in_features * (2.0 ** r.b_a - 1)] for r in cell])
            y = np.array([r.value for r in cell])
            wgt = 1.0 / np.maximum(y, 1.0)
            coef = nnls(X * wgt[:, None], y * wgt)[0]
            for g, c in zip(LANE_GRIDS, coef):
                grids[g][i, j] = c
            rel += list(np.abs(X @ coef - y) / np.maximum(y, 1.0))
    rel = np.array(rel)
    return {"form": "lanes", "w": ws, "a": as_, **{g: _fill(v).tolist() for g, v in grids.items()},
            "exponent": 1.0,
            "fit": {"rows": len(rows), "shapes": len({(r.in_features, r.out_features) for r in rows}),
                    "rates": sorted({int(r.extra["target_cycles"]) for r in rows}),
                    "mape": float(rel.mean()), "max_rel_err": float(rel.max()),
                    "folding_rule_agrees": f"{agree}/{len(rows)}"}}


def _row_layer(r: Measurement):
    return LayerDesc("probe", "linear", (r.in_features,), (r.out_features,), r.in_features, r.out_features,
                     (1, 1), (1, 1), 1, r.macs, r.weights, None)


def check_lanes_entry(k: dict) -> None:
    """Raise ValueError unless ``k`` is a well-formed lanes entry."""
    if list(k["w"]) != sorted(k["w"]) or list(k["a"]) != sorted(k["a"]):
        raise ValueError("lanes form: the width grids are not sorted")
    for g in LANE_GRIDS:
        v = np.asarray(k[g], dtype=float)
        if v.shape != (len(k["w"]), len(k["a"])) or not np.isfinite(v).all() or (v < 0).any():
            raise ValueError(f"lanes form: {g} does not match its grid or is negative / not finite")
