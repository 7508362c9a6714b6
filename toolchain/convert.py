"""Bring your own model: convert a float ``nn.Module`` into a bitfold/Brevitas quantized model.

Built on Brevitas' torch.fx graph tooling: ``brevitas.graph.quantize.preprocess_for_quantize``
traces the model, turns functional calls (``F.relu``, ...) into modules, gives every call of a
shared stateless module (a ``self.relu`` used twice) its own module, maps ReLU6 to ReLU and
``x.mean((2, 3))`` to adaptive pooling. bitfold then places quantizers by *its* rules, so the
result is indistinguishable from a zoo model (same bit-map format, layer walk, exporters):

* every Conv2d / Linear becomes a Brevitas layer built by the method's :class:`LayerBuilder`
  (weights copied), named by its module path;
* every compute layer's input is quantized at the nearest producer upstream of grid-preserving
  ops (max-pool, flatten/view/reshape, dropout, identity). A ReLU producer becomes the quantized
  ReLU of that site; any other producer (the input, an add, a concat, an average pool, a BN) gets
  a quantized identity inserted after it. Layers reading the same producer share one site.
* BatchNorm stays a float op after its conv during QAT and in the exported graph; the FPGA
  backends absorb it into thresholds (streamlining), onnxruntime/TVM run it as is.

Anything else is listed in one :class:`BitfoldError`, or kept in float with ``keep_float=True``
(the model is then marked, and integer-only backends refuse it).
"""
from __future__ import annotations

import importlib.util
import inspect
import operator
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize

from bitfold.toolchain.bitmap import BitMap
from bitfold.core.errors import BitfoldError
from bitfold.toolchain.quant import LayerBuilder, QuantMethod, get_method

COMPUTE = (nn.Conv2d, nn.Linear)
TRANSPARENT_MODULES = (nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Identity)
FLOAT_OK_MODULES = (nn.ReLU, nn.BatchNorm1d, nn.BatchNorm2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, *TRANSPARENT_MODULES)
TRANSPARENT_FUNCTIONS = {torch.flatten, F.max_pool2d, F.dropout}
FLOAT_OK_FUNCTIONS = {operator.add, operator.iadd, torch.add, torch.cat, operator.getitem, *TRANSPARENT_FUNCTIONS}
TRANSPARENT_METHODS = {"view", "reshape", "flatten", "contiguous"}
FLOAT_OK_METHODS = {"add", "add_", "size", "dim", *TRANSPARENT_METHODS}


def _is_transparent(node, modules) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], TRANSPARENT_MODULES)
    if node.op == "call_function":
        return node.target in TRANSPARENT_FUNCTIONS
    if node.op == "call_method":
        return node.target in TRANSPARENT_METHODS
    return False


def _producer(node, modules):
    p = node.args[0]
    while _is_transparent(p, modules):
        p = p.args[0]
    return p


def _unsupported(gm, modules) -> list[str]:
    bad = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            m = modules[n.target]
            if not isinstance(m, COMPUTE + FLOAT_OK_MODULES):
                bad.append(f"{n.target} ({type(m).__name__})")
            elif isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
                bad.append(f"{n.target} (Conv2d padding={m.padding!r} mode={m.padding_mode})")
        elif n.op == "call_function" and n.target not in FLOAT_OK_FUNCTIONS:
            bad.append(f"{n.name} (function {getattr(n.target, '__name__', n.target)})")
        elif n.op == "call_method" and n.target not in FLOAT_OK_METHODS:
            bad.append(f"{n.name} (method .{n.target}())")
    return bad


def _relu_calls_to_modules(gm) -> None:
    """torch.relu(x) / x.relu() (which Brevitas' functional pass leaves alone) -> nn.ReLU modules."""
    fns = {torch.relu, torch.relu_, F.relu}
    for i, n in enumerate(list(gm.graph.nodes)):
        if (n.op == "call_function" and n.target in fns) or (n.op == "call_method" and n.target in ("relu", "relu_")):
            name = f"bitfold_relu_{i}"
            gm.add_submodule(name, nn.ReLU())
            n.op, n.target, n.args, n.kwargs = "call_module", name, (n.args[0],), {}
    gm.recompile()


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, module)


def _copy_weights(old: nn.Module, new: nn.Module) -> None:
    with torch.no_grad():
        if parametrize.is_parametrized(new, "weight"):
            new.parametrizations.weight.original.copy_(old.weight)
        else:
            new.weight.copy_(old.weight)
        if old.bias is not None:
            new.bias.copy_(old.bias)


def quantize(model: nn.Module, method: str | QuantMethod = "fixed", bits="w8a8", example_input=None,
             keep_float: bool = False, **method_options) -> nn.Module:
    """Convert a float model into a quantized one whose quantizers come from bitfold's registry.

    ``bits`` takes every bit-map spelling (keys are the model's Conv/Linear module paths).
    ``example_input`` (a tensor) is used to check the converted model runs and to record the
    input shape (``model.input_shape``).
    """
    from brevitas.graph.quantize import preprocess_for_quantize
    qm = method if isinstance(method, QuantMethod) else get_method(method, **method_options)
    was_training = model.training
    try:
        gm = preprocess_for_quantize(model, trace_model=True, relu6_to_relu=True, equalize_iters=0,
                                     merge_bn=False)
    except Exception as e:  # noqa: BLE001 - fx tracing fails in many ways; all are the same user error
        raise BitfoldError(f"cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:160]})",
                           "data-dependent control flow is not traceable; move it out of forward()") from e
    _relu_calls_to_modules(gm)
    modules = dict(gm.named_modules())
    bad = _unsupported(gm, modules)
    if bad and not keep_float:
        raise BitfoldError("unsupported layer(s) for quantization: " + ", ".join(bad),
                           "supported: Conv2d, Linear, ReLU/ReLU6, BatchNorm, max/avg pooling, add, concat, flatten;"
                           " pass keep_float=True to keep the others in float (integer backends will refuse it)")
    compute = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], COMPUTE)]
    if not compute:
        raise BitfoldError(f"{type(model).__name__} has no Conv2d or Linear layer to quantize")
    names = [n.target for n in compute]
    builder = LayerBuilder(qm, BitMap.parse(bits).resolve(names))

    # activation sites: group compute layers by the producer of their input
    groups: dict = {}
    for n in compute:
        groups.setdefault(_producer(n, modules), []).append(n.target)
    for i, (prod, feeds) in enumerate(groups.items()):
        is_relu = prod.op == "call_module" and isinstance(modules[prod.target], nn.ReLU)
        site = builder.act(tuple(feeds), relu=is_relu)
        if is_relu:
            set_module(gm, prod.target, site)
        else:
            name = f"bitfold_quant_{i}"
            gm.add_submodule(name, site)
            with gm.graph.inserting_after(prod):
                q = gm.graph.call_module(name, (prod,))
            prod.replace_all_uses_with(q, delete_user_cb=lambda user, q=q: user is not q)

    # compute layers: Brevitas layers from the builder, float weights copied
    for n in compute:
        old = modules[n.target]
        if isinstance(old, nn.Conv2d):
            new = builder.conv(n.target, old.in_channels, old.out_channels, old.kernel_size, old.stride,
                               old.padding, bias=old.bias is not None, groups=old.groups, dilation=old.dilation)
        else:
            new = builder.linear(n.target, old.in_features, old.out_features, bias=old.bias is not None)
        _copy_weights(old, new)
        set_module(gm, n.target, new)
    gm.graph.lint()
    gm.recompile()
    gm.bit_map = builder.bits
    gm.quant_method = qm
    gm.model_name = f"user:{type(model).__name__}"
    gm.has_float_layers = bool(bad)
    gm.train(was_training)
    if example_input is not None:
        gm.input_shape = tuple(example_input.shape[1:])
        gm.eval()
        with torch.no_grad():
            gm(example_input)
        gm.train(was_training)
    return gm


# ---------------------------------------------------------------------------------------------
# user model files: "path/to/file.py:factory"
# ---------------------------------------------------------------------------------------------
def is_user_model(spec: str) -> bool:
    return ".py:" in spec


def load_user_factory(spec: str):
    """Import ``factory`` from ``file.py``. This runs the user's file: it is code they chose to run."""
    path_s, _, attr = spec.rpartition(":")
    path = Path(path_s)
    if not path.is_file():
        raise BitfoldError(f"model file {path} does not exist", "use --model path/to/file.py:factory")
    mod_spec = importlib.util.spec_from_file_location(f"bitfold_user_model_{path.stem}", path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001
        raise BitfoldError(f"importing {path} failed: {type(e).__name__}: {e}") from e
    if not callable(getattr(module, attr, None)):
        raise BitfoldError(f"{path} has no callable {attr!r}", "use --model path/to/file.py:factory")
    return getattr(module, attr)


def build_user_float(spec: str, input_shape, num_classes: int, weights: str | None = None) -> nn.Module:
    factory = load_user_factory(spec)
    params = inspect.signature(factory).parameters
    kwargs = {k: v for k, v in (("input_shape", tuple(input_shape)), ("num_classes", num_classes)) if k in params}
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise BitfoldError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    if weights:
        from bitfold.toolchain.runs import load_state_dict_file
        state = load_state_dict_file(weights)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise BitfoldError(f"float weights {weights} do not fit {spec} ({str(e).splitlines()[0][:200]})",
                               "pass the state_dict saved from this model") from e
    return model
