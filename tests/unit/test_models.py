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


@pytest.mark.parametrize("name,shape,layers", [
    ("tfc", (1, 28, 28), [(784, 64), (64, 64), (64, 64), (64, 10)]),
    ("sfc", (1, 28, 28), [(784, 256), (256, 256), (256, 256), (256, 10)]),
    ("lfc", (1, 28, 28), [(784, 1024)] + [(1024, 1024)] * 3 + [(1024, 10)]),
    ("cnv", (3, 32, 32), [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512), (512, 512),
                          (512, 10)]),
])
def test_finn_classics_have_finns_layer_sizes(name, shape, layers):
    """FINN's TFC/SFC/LFC (784 inputs, 3x64 / 3x256 / 4x1024) and CNV (six unpadded 3x3 convolutions
    64-64-128-128-256-256 on 32x32, two 512 FC layers)."""
    m = build_model(name, shape, 10, bits="w1a1:all")
    descs = describe_layers(m, shape)
    assert [(d.in_features, d.out_features) for d in descs] == layers
    if name == "cnv":
        assert [d.kernel for d in descs[:6]] == [(3, 3)] * 6 and all(d.kind == "conv" for d in descs[:6])
        assert descs[5].out_shape == (256, 1, 1)     # 32 -> 30 -> 28 -> 14 -> 12 -> 10 -> 5 -> 3 -> 1
    widths = quant_bit_widths(m)
    assert set(widths.values()) == {1}


def test_one_bit_activations_are_bipolar_at_scale_one_and_the_classics_center_their_input():
    """FINN converts 1-bit activations only as BipolarQuant with scale 1; a sign of inputs in [0, 1]
    would be constant, so the classics map them to [-1, 1] first (as FINN's do)."""
    m = build_model("tfc", (1, 8, 8), 10, bits="w1a1:all").eval()
    x = torch.rand(4, 1, 8, 8)
    seen = []
    for mod in (m.inp, m.acts[0]):
        mod.register_forward_hook(lambda _m, _i, out: seen.append(out))
    m(x)
    assert all(set(torch.unique(o).tolist()) == {-1.0, 1.0} for o in seen)
    with pytest.raises(BitfoldError, match="at least 32x32"):
        build_model("cnv", (1, 28, 28), 10, bits="w1a1:all")
