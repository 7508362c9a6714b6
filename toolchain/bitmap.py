"""Per-layer bit-width maps: the one format every method, exporter and backend reads.

A bit map assigns each compute layer (Conv / Linear, by its module name) a weight width ``w``
and an input-activation width ``a`` (the width of the activation *entering* the layer, which is
what BitOPs = MACs * w * a and the hardware multiplies use).

Accepted spellings:

* shorthand ``"w4a4"`` - every layer W4/A4, except the first and last layer at W7/A8
  (the input and the logits layer are the most sensitive, so they get 8-bit inputs; their
  weights get 7 bits so that their QCDQ export cannot saturate the int16 pair sums of the
  u8 x s8 int8 kernels CPUs without VNNI run - the same choice as onnxruntime's
  ``reduce_range``; spell them out in a JSON map to get W8);
* ``"w4a4:all"`` - every layer, first and last included, at W4/A4;
* a JSON object (file or dict) ``{"conv1": {"w": 8, "a": 8}, "conv2": {"w": 3, "a": 4}, ...}``;
  the key ``"*"`` gives a default for layers not named.

Widths are integers in [1, 8]. Fractional widths are refused: they export silently wrong.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from bitfold.core.errors import BitfoldError

MIN_BITS, MAX_BITS = 1, 8
#: the shorthand's first/last layer widths (w, a): see the module docstring for the 7
EDGE_BITS = (7, 8)
_SHORT = re.compile(r"^w(\d+)a(\d+)(:all)?$", re.IGNORECASE)


@dataclass(frozen=True)
class LayerBits:
    w: int
    a: int

    def as_dict(self) -> dict:
        return {"w": self.w, "a": self.a}


def _check_width(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BitfoldError(f"bit map: {where} must be an integer bit-width, got {value!r}",
                           f"use an integer between {MIN_BITS} and {MAX_BITS}")
    if float(value) != int(value):
        raise BitfoldError(f"bit map: {where} = {value} is not an integer bit-width",
                           "fractional widths cannot be exported; round them (AdaQAT runs do this "
                           "when they freeze their learned map)")
    v = int(value)
    if not MIN_BITS <= v <= MAX_BITS:
        raise BitfoldError(f"bit map: {where} = {v} is outside [{MIN_BITS}, {MAX_BITS}]",
                           f"use an integer between {MIN_BITS} and {MAX_BITS}")
    return v


class BitMap:
    """A parsed, validated bit-map *specification*; :meth:`resolve` applies it to a model."""

    def __init__(self, layers: Mapping[str, LayerBits] | None = None,
                 default: LayerBits | None = None, edge_bits: tuple[int, int] | None = None,
                 text: str | None = None):
        self.layers = dict(layers or {})
        self.default = default
        self.edge_bits = edge_bits
        self.text = text

    # -- construction -------------------------------------------------------------------
    @classmethod
    def parse(cls, spec) -> "BitMap":
        """Parse a shorthand string, a path to a JSON file, a JSON string, or a dict."""
        if isinstance(spec, BitMap):
            return spec
        if isinstance(spec, Mapping):
            return cls._from_dict(spec)
        if isinstance(spec, Path) or (isinstance(spec, str) and spec.endswith(".json")):
            path = Path(spec)
            if not path.is_file():
                raise BitfoldError(f"bit map file {path} does not exist",
                                   "pass an existing JSON file to --bits-map")
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise BitfoldError(f"bit map file {path} is not valid JSON ({e.msg}, line {e.lineno})",
                                   'expected {"layer": {"w": 4, "a": 4}, ...}') from e
            return cls._from_dict(data)
        if isinstance(spec, str):
            s = spec.strip()
            if s.startswith("{"):
                try:
                    return cls._from_dict(json.loads(s))
                except json.JSONDecodeError as e:
                    raise BitfoldError(f"bit map is not valid JSON ({e.msg})") from e
            m = _SHORT.match(s)
            if not m:
                raise BitfoldError(f"bit map {spec!r} is not understood",
                                   "use a shorthand like 'w4a4' or 'w4a4:all', or a JSON file "
                                   '{"layer": {"w": 4, "a": 4}}')
            w = _check_width(int(m.group(1)), "w")
            a = _check_width(int(m.group(2)), "a")
            return cls(default=LayerBits(w, a), edge_bits=None if m.group(3) else EDGE_BITS, text=s.lower())
        raise BitfoldError(f"bit map of type {type(spec).__name__} is not understood")

    @classmethod
    def _from_dict(cls, data) -> "BitMap":
        if not isinstance(data, Mapping) or not data:
            raise BitfoldError("bit map must be a non-empty JSON object",
                               'expected {"layer": {"w": 4, "a": 4}, ...}')
        layers, default = {}, None
        for name, entry in data.items():
            if not isinstance(entry, Mapping) or set(entry) != {"w", "a"}:
                raise BitfoldError(f"bit map entry {name!r} must be an object with exactly the keys "
                                   f"'w' and 'a', got {entry!r}", 'e.g. {"w": 4, "a": 4}')
            lb = LayerBits(_check_width(entry["w"], f"{name}.w"), _check_width(entry["a"], f"{name}.a"))
            if name == "*":
                default = lb
            else:
                layers[name] = lb
        return cls(layers, default)

    # -- application --------------------------------------------------------------------
    def resolve(self, layer_names: list[str]) -> dict[str, LayerBits]:
        """Return ``{layer: LayerBits}`` for every layer of a model, in model order."""
        unknown = sorted(set(self.layers) - set(layer_names))
        if unknown:
            raise BitfoldError(f"bit map names unknown layer(s) {', '.join(unknown)}",
                               f"the model's layers are: {', '.join(layer_names)}")
        out = {}
        for i, name in enumerate(layer_names):
            if name in self.layers:
                out[name] = self.layers[name]
            elif self.edge_bits is not None and i in (0, len(layer_names) - 1):
                out[name] = LayerBits(*self.edge_bits)
            elif self.default is not None:
                out[name] = self.default
            else:
                raise BitfoldError(f"bit map gives no width for layer {name!r}",
                                   'add it, or a default entry "*": {"w": .., "a": ..}')
        return out

    def __repr__(self):
        return f"BitMap({self.text or self.to_json()})"

    def to_json(self) -> dict:
        d = {k: v.as_dict() for k, v in self.layers.items()}
        if self.default is not None:
            d["*"] = self.default.as_dict()
        return d


def bitmap_to_json(resolved: Mapping[str, LayerBits]) -> dict:
    return {k: v.as_dict() for k, v in resolved.items()}
