"""Quantizer registry: which Brevitas quantizers a layer gets is decided by the *method*.

Model code never names a quantizer. It asks a :class:`LayerBuilder` for ``conv``/``linear``
layers and ``act`` sites; the builder asks the selected :class:`QuantMethod` for the Brevitas
keyword arguments of each layer at its bit-width. New methods (AdaQAT's learnable fractional
widths, MEBQAT's switchable widths, ADQ codebooks, ASQ's adaptive step / POST levels) register a
subclass here and plug in without touching any model.

Activation *sites*: every quantized activation is created for the layer(s) it feeds, and takes
its width from their ``a`` entry of the bit map (several layers reading the same tensor, e.g. a
residual block's first conv and its projection shortcut, must agree).
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
import torch.nn as nn

from bitfold.toolchain.bitmap import LayerBits
from bitfold.core.errors import BitfoldError

METHODS: dict[str, type["QuantMethod"]] = {}

#: forward passes over which activation quantizers collect their initial scale statistics; the
#: trainer runs them (``calibrate``) before the first optimizer step, so every checkpoint holds
#: finished scales and a resumed run is bit-identical to an uninterrupted one.
ACT_INIT_STEPS = 16


def register_method(name: str) -> Callable[[type], type]:
    def deco(cls):
        cls.name = name
        METHODS[name] = cls
        return cls
    return deco


def _load_builtin_methods() -> None:
    from bitfold.toolchain import adaqat, adq, asq, mebqat  # noqa: F401  (register "adaqat", "adq", "asq", "mebqat")


def get_method(name: str, **options) -> "QuantMethod":
    _load_builtin_methods()
    if name not in METHODS:
        raise BitfoldError(f"unknown method {name!r}", f"choose one of: {', '.join(sorted(METHODS))}")
    import inspect
    cls = METHODS[name]
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in options if k not in params]
        if unknown:
            known = [k for k in params if k != "self"]
            raise BitfoldError(f"method {name!r} does not take option(s) {', '.join(unknown)}",
                               f"its options: {', '.join(known) or 'none'}")
    return cls(**options)


class QuantMethod:
    """Base class. A method supplies Brevitas kwargs per layer and optional training hooks."""

    name = "base"
    #: bit-widths this method can represent for weights / activations
    weight_bits_range = (1, 8)
    act_bits_range = (1, 8)

    def __init__(self, per_channel: bool = False, **options):
        if options:
            raise BitfoldError(f"method {self.name!r} does not take option(s) {', '.join(options)}")
        self.per_channel = per_channel

    def options(self) -> dict:
        """JSON-serialisable options, stored in run configs so a run can be rebuilt."""
        return {"per_channel": self.per_channel}

    # -- quantizer choice ------------------------------------------------------------------
    def weight_kwargs(self, layer: str, bits: int) -> dict:
        raise NotImplementedError

    def act_kwargs(self, site: str, bits: int, signed: bool) -> dict:
        raise NotImplementedError

    def act_module(self, site: str, bits: int, relu: bool) -> nn.Module:
        """The activation-site module: quantized ReLU (unsigned) or quantized identity (signed)."""
        import brevitas.nn as qnn
        cls = qnn.QuantReLU if relu else qnn.QuantIdentity
        return cls(return_quant_tensor=False, **self.act_kwargs(site, bits, signed=not relu))

    def prepare_layer(self, name: str, layer: nn.Module, bits: LayerBits) -> nn.Module:
        """Last touch on a freshly built compute layer (e.g. a weight re-parametrisation)."""
        return layer

    def cost_bits(self, model: nn.Module) -> dict:
        """Per layer (b_w, b_a) that compute-cost models should count (default: the bit map)."""
        return {n: (b.w, b.a) for n, b in model.bit_map.items()}

    # -- training hooks (defaults: nothing extra) -------------------------------------------
    def setup(self, model: nn.Module, layers: list) -> None:
        """Called once by the trainer with the model's layer descriptions."""

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        return [{"params": list(model.parameters()), "lr": lr, "weight_decay": weight_decay}]

    def extra_loss(self, model: nn.Module, step: int, batch=None, task_loss=None) -> torch.Tensor | None:
        return None

    def backward_step(self, net: nn.Module, model: nn.Module, x, y, step: int):
        """Run this step's forward/backward(s) and return the task loss, or None for the default."""
        return None

    def deploy(self, model: nn.Module, bit_map, x_calib) -> nn.Module:
        """Set a model trained once to a new integer bit map without retraining (switchable methods)."""
        raise BitfoldError(f"method {self.name!r} cannot change bit-widths after training",
                           "train a --method mebqat run to switch bit-widths at deploy time")

    def after_step(self, model: nn.Module, step: int) -> None:
        return None

    def on_epoch_end(self, model: nn.Module, epoch: int, epochs: int) -> None:
        return None

    def state(self) -> dict:
        """Method state that must survive a resume (plain Python / tensors only)."""
        return {}

    def load_state(self, state: dict) -> None:
        return None

    def finalize(self, model: nn.Module, out_dir) -> dict:
        """Write method artefacts into the run directory; return extra metrics."""
        return {}

    def bit_map(self, model: nn.Module) -> dict:
        """The model's current integer bit map ({layer: LayerBits})."""
        return dict(model.bit_map)

    def for_export(self, model: nn.Module) -> nn.Module:
        """A model whose graph the exporters can take (default: the model itself)."""
        return model

    def prepare_export(self, model: nn.Module, x_calib) -> None:
        """Calibrate whatever ``for_export`` needs from data (e.g. ASQ's folded step factors)."""

    def layer_extras(self, model: nn.Module) -> dict:
        """Extra per-layer cost facts for metrics (e.g. ASQ adapter MACs): {layer: {key: value}}."""
        return {}


@register_method("fixed")
class FixedMethod(QuantMethod):
    """Brevitas uniform integer quantizers at fixed per-layer widths.

    Weights: signed, narrow-range, scale from the max-abs statistic (per tensor or per output
    channel); 1-bit weights are bipolar {-s, +s}, s learned, initialised to the mean absolute weight.
    Activations: unsigned after ReLU, signed otherwise; learned scale initialised from runtime
    statistics (collected during the calibration pass at the start of training). 1-bit activations
    are FINN's bipolar form: sign(x) in {-1, +1}, constant scale 1 (what FINN converts; the
    BatchNorm in front of every activation site absorbs any other scale).

    ``scales="pot"``: every scale a power of two (Brevitas's fixed-point quantizers: the weight scale
    rounds the max-abs statistic's log2 up, activation scales learn their log2) - the form a
    fixed-point datapath such as hls4ml's computes exactly (``bitfold export --for hls4ml``).
    """

    SCALES = ("float", "pot")

    def __init__(self, per_channel: bool = False, scales: str = "float"):
        super().__init__(per_channel=per_channel)
        if scales not in self.SCALES:
            raise BitfoldError(f"scales={scales!r} is not a scale form", f"choose one of: {', '.join(self.SCALES)}")
        self.scales = scales

    def options(self) -> dict:
        return {**super().options(), **({"scales": self.scales} if self.scales != "float" else {})}

    def weight_kwargs(self, layer, bits):
        if bits == 1:
            if self.scales == "pot":
                raise BitfoldError(f"layer {layer}: 1-bit weights have a learned (not power-of-two) scale",
                                   "use >= 2-bit weights with scales=pot")
            return {"weight_quant": _binary_weight_quant()}
        if self.scales == "pot":
            from brevitas.quant.fixed_point import Int8WeightPerChannelFixedPoint, Int8WeightPerTensorFixedPoint
            quant = Int8WeightPerChannelFixedPoint if self.per_channel else Int8WeightPerTensorFixedPoint
        else:
            from brevitas.quant.scaled_int import Int8WeightPerChannelFloat, Int8WeightPerTensorFloat
            quant = Int8WeightPerChannelFloat if self.per_channel else Int8WeightPerTensorFloat
        return {"weight_quant": quant, "weight_bit_width": bits}

    def act_module(self, site, bits, relu):
        if bits == 1:
            # 1-bit activations are bipolar sign activations {-1, +1} as in BNNs and FINN's classic
            # networks (FINN converts BipolarQuant activations only at scale 1); a ReLU in front would
            # make them constant. (Brevitas also exports unsigned 1-bit activations as BipolarQuant,
            # i.e. wrongly - caught by our verification.) Scale 1 is also a power of two.
            import brevitas.nn as qnn
            from brevitas.quant.binary import SignedBinaryActPerTensorConst
            return qnn.QuantIdentity(act_quant=SignedBinaryActPerTensorConst, return_quant_tensor=False)
        return super().act_module(site, bits, relu)

    def act_kwargs(self, site, bits, signed):
        if self.scales == "pot":
            from brevitas.quant.fixed_point import Int8ActPerTensorFixedPoint, Uint8ActPerTensorFixedPoint
            s_q, u_q = Int8ActPerTensorFixedPoint, Uint8ActPerTensorFixedPoint
        else:
            from brevitas.quant.scaled_int import Int8ActPerTensorFloat, Uint8ActPerTensorFloat
            s_q, u_q = Int8ActPerTensorFloat, Uint8ActPerTensorFloat
        return {"act_quant": s_q if signed else u_q, "bit_width": bits, "collect_stats_steps": ACT_INIT_STEPS}


def _binary_weight_quant():
    from brevitas.core.scaling import ScalingImplType
    from brevitas.core.stats import StatsOp
    from brevitas.quant.binary import SignedBinaryWeightPerTensorConst

    class BinaryWeightPerTensorMeanAbs(SignedBinaryWeightPerTensorConst):
        scaling_impl_type = ScalingImplType.PARAMETER_FROM_STATS  # (STATS breaks autograd in-place)
        scaling_stats_op = StatsOp.AVE

    return BinaryWeightPerTensorMeanAbs


# ---------------------------------------------------------------------------------------------
# Layer builders
# ---------------------------------------------------------------------------------------------
def _as_tuple(feeds) -> tuple[str, ...]:
    return (feeds,) if isinstance(feeds, str) else tuple(feeds)


class FloatBuilder:
    """Builds the plain-torch twin of a model and records its compute-layer names in order."""

    quantized = False

    def __init__(self):
        self.layer_names: list[str] = []

    def _record(self, name: str, module: nn.Module) -> nn.Module:
        if name in self.layer_names:
            raise ValueError(f"duplicate layer name {name}")
        self.layer_names.append(name)
        module._bitfold_layer = name
        return module

    def conv(self, name, in_ch, out_ch, kernel, stride=1, padding=0, bias=False, groups=1, dilation=1):
        return self._record(name, nn.Conv2d(in_ch, out_ch, kernel, stride, padding, bias=bias, groups=groups,
                                            dilation=dilation))

    def linear(self, name, in_f, out_f, bias=True):
        return self._record(name, nn.Linear(in_f, out_f, bias=bias))

    def act(self, feeds, relu=True):
        m = nn.ReLU() if relu else nn.Identity()
        m._bitfold_feeds = _as_tuple(feeds)
        return m


class LayerBuilder(FloatBuilder):
    """Builds Brevitas layers whose quantizers come from ``method`` at the widths of ``bits``."""

    quantized = True

    def __init__(self, method: QuantMethod, bits: Mapping[str, LayerBits]):
        super().__init__()
        self.method = method
        self.bits = dict(bits)

    def _w(self, name):
        return self.method.weight_kwargs(name, self.bits[name].w)

    def conv(self, name, in_ch, out_ch, kernel, stride=1, padding=0, bias=False, groups=1, dilation=1):
        import brevitas.nn as qnn
        layer = qnn.QuantConv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, bias=bias, groups=groups,
                                dilation=dilation, return_quant_tensor=False, **self._w(name))
        return self._record(name, self.method.prepare_layer(name, layer, self.bits[name]))

    def linear(self, name, in_f, out_f, bias=True):
        import brevitas.nn as qnn
        layer = qnn.QuantLinear(in_f, out_f, bias=bias, return_quant_tensor=False, **self._w(name))
        return self._record(name, self.method.prepare_layer(name, layer, self.bits[name]))

    def site_bits(self, feeds: Iterable[str]) -> int:
        feeds = _as_tuple(feeds)
        widths = {f: self.bits[f].a for f in feeds}
        if len(set(widths.values())) > 1:
            raise BitfoldError(
                "layers " + ", ".join(f"{k} (a={v})" for k, v in widths.items())
                + " read the same activation tensor but ask for different widths",
                "give them the same 'a' in the bit map")
        return widths[feeds[0]]

    def act(self, feeds, relu=True):
        feeds = _as_tuple(feeds)
        m = self.method.act_module(feeds[0], self.site_bits(feeds), relu)
        m._bitfold_feeds = feeds
        return m


def bake_parametrizations(model: nn.Module) -> nn.Module:
    """Replace every parametrized weight by a plain Parameter holding its current value, in place.

    ``torch.nn.utils.parametrize.remove_parametrizations`` deletes the property from the module's
    (dynamically created) class - which a ``copy.deepcopy`` of the model *shares* with the original,
    so it would break the original. This swaps the copy's class back to the plain layer class instead.
    """
    import torch.nn.utils.parametrize as parametrize
    for mod in list(model.modules()):
        if parametrize.is_parametrized(mod):
            values = {name: getattr(mod, name).detach().clone() for name in mod.parametrizations}
            mod.__class__ = mod.__class__.__bases__[0]
            del mod._modules["parametrizations"]
            for name, v in values.items():
                mod.register_parameter(name, nn.Parameter(v))
    return model


def compute_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's compute layers (Conv/Linear) by bit-map name, in model order."""
    return {m._bitfold_layer: m for m in model.modules() if hasattr(m, "_bitfold_layer")}


def act_sites(model: nn.Module) -> dict[tuple[str, ...], nn.Module]:
    """The model's activation sites, keyed by the layers they feed."""
    return {m._bitfold_feeds: m for m in model.modules() if hasattr(m, "_bitfold_feeds")}
