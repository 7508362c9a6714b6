"""Energy per inference from a per-operation energy table, scaled by bit-width (a ``CostModel``).

The shipped table (``tables/energy-45nm.json``) holds the 45 nm, 0.9 V figures of
M. Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014, pp. 10-14,
doi:10.1109/ISSCC.2014.6757323: integer add 8 bit 0.03 pJ, 32 bit 0.1 pJ; integer multiply 8 bit
0.2 pJ, 32 bit 3.1 pJ; SRAM read of 64 bit from an 8 KB array 10 pJ. They are *literature* values,
not measurements of any board.

Scaling by bit-width (the standard first-order model): a b_w x b_a array multiplier switches
~b_w*b_a full-adder cells, so multiply energy is interpolated piecewise-linearly in the product
b_w*b_a through the table's points (8x8 = 64 -> 0.2 pJ, 32x32 = 1024 -> 3.1 pJ, and 0 at 0);
an adder's energy is linear in its width (the accumulator: b_w + b_a + log2(fan-in)); memory
energy is per bit moved. Per layer and inference:

    E = MACs * (E_mul(b_w * b_a) + E_add(acc_bits)) + weights * b_w * E_sram_bit + inputs * b_a * E_sram_bit

A user's own per-operation measurements replace the literature points op by op
(``bitfold calibrate --energy-csv FILE``, columns ``op,bits,energy_pj`` with op one of
``mul`` (bits = b_w*b_a, or "4x4"), ``add`` (bits = adder width), ``sram_bit`` (bits ignored)).
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import math
from importlib import resources
from pathlib import Path

import torch

from bitfold.core.errors import BitfoldError

from bitfold.hw_models.cost import CostResult
from bitfold.core.paths import bitfold_home

OPS = ("mul", "add", "sram_bit")


def _pwl(points, x: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear through (0, 0) and ``points`` [(x, y)], continued along the last segment."""
    pts = [(0.0, 0.0)] + sorted((float(a), float(b)) for a, b in points)
    xs = [p[0] for p in pts]
    i = max(1, min(len(pts) - 1, sum(1 for v in xs if v <= float(x))))
    (x0, y0), (x1, y1) = pts[i - 1], pts[i]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


class EnergyModel:
    """``CostModel`` for energy (pJ per inference) from an energy table."""

    def __init__(self, table: dict, source: str = ""):
        self.table, self.source = table, source
        self.name, self.unit = table["name"], "pJ"

    def per_layer(self, d, bw: torch.Tensor, ba: torch.Tensor) -> dict:
        ops = self.table["ops"]
        fan_in = max(1, d.macs // max(1, math.prod(d.out_shape)))
        acc = bw + ba + math.log2(fan_in)
        sram = float(ops["sram_bit"][0][1])
        inputs = math.prod(d.in_shape)
        return {"mul": d.macs * _pwl(ops["mul"], bw * ba), "add": d.macs * _pwl(ops["add"], acc),
                "weights": d.weight_count * bw * sram, "activations": inputs * ba * sram}

    def __call__(self, layers, bits) -> CostResult:
        per = {}
        for d in layers:
            bw, ba = (b if isinstance(b, torch.Tensor) else torch.tensor(float(b)) for b in bits[d.name])
            per[d.name] = sum(self.per_layer(d, bw, ba).values())
        total = torch.stack(list(per.values())).sum() if per else torch.tensor(0.0)
        return CostResult(total, per, self.unit)

    def __repr__(self):
        return f"EnergyModel({self.name}, {self.source})"


def check_energy_table(t: dict, where: str) -> dict:
    try:
        for op in OPS:
            pts = t["ops"][op]
            if not pts or any(len(p) != 2 or float(p[0]) < 0 or not float(p[1]) >= 0 for p in pts):
                raise ValueError(f"op {op!r} needs [bits, pJ] points with bits >= 0 and pJ >= 0")
        t["name"], t["provenance"]["source"]
    except (KeyError, TypeError, ValueError) as e:
        raise BitfoldError(f"energy table {where} is corrupt or not a bitfold energy table ({e})",
                           "re-create it with `bitfold calibrate --energy-csv FILE`") from e
    return t


def literature_table() -> dict:
    p = Path(str(resources.files("bitfold.hw_models"))) / "tables" / "energy-45nm.json"
    return check_energy_table(json.loads(p.read_text()), str(p))


def load_energy(name: str = "energy") -> EnergyModel:
    """``energy`` (the literature table) or a calibrated table ``$BITFOLD_HOME/tables/<name>.json``."""
    if name == "energy":
        return EnergyModel(literature_table(), "literature (Horowitz, ISSCC 2014)")
    p = bitfold_home() / "tables" / f"{name}.json"
    try:
        t = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BitfoldError(f"energy table {p} cannot be read ({e})", "create it with `bitfold calibrate --energy-csv`") from e
    return EnergyModel(check_energy_table(t, str(p)), str(p))


def energy_from_csv(csv_path, name: str = "energy-user") -> dict:
    """A new energy table: the literature table with every op listed in the CSV replaced by the
    CSV's points (provenance: measured, the file and date). Returns the table; the caller saves it."""
    p = Path(csv_path)
    try:
        with open(p, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise BitfoldError(f"energy CSV {p} cannot be read ({e})", "give a CSV file with columns op,bits,energy_pj") from e
    if not rows or not {"op", "bits", "energy_pj"} <= set(rows[0]):
        raise BitfoldError(f"energy CSV {p} needs the columns op,bits,energy_pj",
                           "e.g. a line `mul,4x4,0.05` or `add,16,0.06` or `sram_bit,1,0.15`")
    new: dict[str, list] = {}
    for i, r in enumerate(rows, start=2):
        op = (r["op"] or "").strip()
        if op not in OPS:
            raise BitfoldError(f"energy CSV {p} line {i}: unknown op {op!r}", f"use one of: {', '.join(OPS)}")
        try:
            b = str(r["bits"]).strip().lower()
            bits = math.prod(int(v) for v in b.split("x")) if "x" in b else float(b)
            e = float(r["energy_pj"])
        except (TypeError, ValueError):
            raise BitfoldError(f"energy CSV {p} line {i}: bits {r['bits']!r} / energy_pj {r['energy_pj']!r} are not numbers",
                               "write bits as 8, or 4x4 for a multiplier, and energy in pJ") from None
        if bits <= 0 or not e >= 0 or math.isinf(e):
            raise BitfoldError(f"energy CSV {p} line {i}: bits must be > 0 and energy >= 0")
        new.setdefault(op, []).append([bits, e])
    t = literature_table()
    t["name"] = name
    t["ops"].update({op: sorted(pts) for op, pts in new.items()})
    t["provenance"] = {"source": "measured", "replaced_ops": sorted(new), "csv": str(p.resolve()),
                       "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                       "kept_from_literature": [op for op in OPS if op not in new],
                       "literature": t["provenance"]}
    return check_energy_table(t, str(p))
