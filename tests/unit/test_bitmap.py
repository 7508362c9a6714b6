import json

import pytest

from bitfold.toolchain.bitmap import BitMap, LayerBits
from bitfold.core.errors import BitfoldError
from bitfold.toolchain.models import build_model, layer_names

NAMES = ["a", "b", "c"]


def test_shorthand_keeps_first_and_last_at_8_bit():
    r = BitMap.parse("w3a4").resolve(NAMES)
    assert r == {"a": LayerBits(7, 8), "b": LayerBits(3, 4), "c": LayerBits(7, 8)}
    assert set(BitMap.parse("w3a4:all").resolve(NAMES).values()) == {LayerBits(3, 4)}


def test_json_file_with_default(tmp_path):
    p = tmp_path / "m.json"
    p.write_text(json.dumps({"*": {"w": 2, "a": 3}, "b": {"w": 5, "a": 6}}))
    r = BitMap.parse(str(p)).resolve(NAMES)
    assert r["a"] == LayerBits(2, 3) and r["b"] == LayerBits(5, 6)


@pytest.mark.parametrize("spec, words", [
    ("w9a4", "outside"), ("w0a4", "outside"), ("4bit", "not understood"),
    ({"a": {"w": 2.5, "a": 4}}, "not an integer"), ({"a": {"w": 2}}, "exactly the keys"),
    ({"a": {"w": "4", "a": 4}}, "must be an integer"), ({}, "non-empty"),
])
def test_bad_specs_are_refused(spec, words):
    with pytest.raises(BitfoldError, match=words):
        BitMap.parse(spec).resolve(NAMES)


def test_unknown_and_missing_layers():
    with pytest.raises(BitfoldError, match="unknown layer.*zz"):
        BitMap.parse({"zz": {"w": 2, "a": 2}}).resolve(NAMES)
    with pytest.raises(BitfoldError, match="no width for layer"):
        BitMap.parse({"a": {"w": 2, "a": 2}}).resolve(NAMES)


def test_malformed_json_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(BitfoldError, match="not valid JSON"):
        BitMap.parse(str(p))


def test_layers_sharing_an_activation_must_agree():
    names = layer_names("resnet20", (3, 32, 32), 10)
    assert "layer2.0.shortcut" in names
    bits = {"*": {"w": 4, "a": 4}, "layer2.0.shortcut": {"w": 4, "a": 6}}
    with pytest.raises(BitfoldError, match="same activation"):
        build_model("resnet20", (3, 32, 32), 10, bits=bits)
