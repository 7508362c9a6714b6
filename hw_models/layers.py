"""The layer record the cost models price: one compute layer's kind, shapes, MACs and weight count
(produced by :func:`bitfold.toolchain.describe.describe_layers` from a model)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LayerDesc:
    name: str
    kind: str                 # "conv" | "linear"
    in_shape: tuple           # one sample, without batch
    out_shape: tuple
    in_features: int          # in channels (conv) / in features (linear)
    out_features: int
    kernel: tuple             # (kh, kw); (1, 1) for linear
    stride: tuple
    groups: int
    macs: int                 # multiply-accumulates per sample
    weight_count: int
    site: tuple | None        # the activation site feeding this layer (layers it feeds)

    def as_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LayerDesc":
        """The inverse of :meth:`as_dict` (JSON turns tuples into lists)."""
        d = dict(d)
        for k in ("in_shape", "out_shape", "kernel", "stride"):
            d[k] = tuple(d[k])
        if d.get("site") is not None:
            d["site"] = tuple(d["site"])
        return cls(**d)
