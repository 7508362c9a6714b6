import pytest
import torch

from bitfold.export.onnx_export import quant_bit_widths
from bitfold.toolchain.describe import describe_layers
from bitfold.core.errors import BitfoldError
from bitfold.toolchain.models import build_model, layer_names

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet20"])
@pytest.mark.parametrize("shape", SHAPES)
def test_models_build_for_every_input_size(name, shape):
    m = build_model(name, shape, 10, bits="w4a4")
    assert m(torch.randn(2, *shape)).shape == (2, 10)


def test_mixed_bits_reach_every_quantizer():
    names = layer_names("cnn", (1, 8, 8), 10)
    bits = {n: {"w": 2 + i, "a": 3 + i} for i, n in enumerate(names)}
    m = build_model("cnn", (1, 8, 8), 10, bits=bits)
    widths = quant_bit_widths(m)
    for i, n in enumerate(names):
        assert widths[f"{n}.w"] == 2 + i
        assert widths[f"{n}.a"] == 3 + i  # the site feeding layer n carries n's 'a'


def test_per_channel_weights_have_one_scale_per_output_channel():
    m = build_model("cnn", (1, 8, 8), 10, bits="w4a4", per_channel=True)
    scale = m.convs[1].quant_weight().scale
    assert scale.numel() == m.convs[1].out_channels


def test_layer_descriptions_count_macs():
    m = build_model("cnn", (1, 8, 8), 10, bits="w4a4")
    d = {x.name: x for x in describe_layers(m, (1, 8, 8))}
    assert d["convs.0"].macs == 1 * 9 * 16 * 8 * 8
    assert d["convs.1"].macs == 16 * 9 * 32 * 8 * 8
    assert d["head"].macs == 64 * 2 * 2 * 10 and d["head"].kind == "linear"
    assert d["convs.1"].site == ("convs.1",)


def test_resnet_has_residual_projection_and_22_layers():
    names = layer_names("resnet20", (3, 32, 32), 10)
    assert len(names) == 22 and names[0] == "conv0" and names[-1] == "head"


def test_unknown_model():
    with pytest.raises(BitfoldError, match="unknown model"):
        build_model("vgg", (1, 8, 8), 10)
