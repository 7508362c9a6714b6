"""The sweep's grid file: points, their identity, and one clear error per mistake."""
import pytest

from bitfold.app.sweep import Point, check_points, grid_points, load_grid, pareto, point_key, varying_keys
from bitfold.core.errors import BitfoldError

pytestmark = pytest.mark.unit


def test_blocks_are_products_and_add_up_once():
    pts = grid_points({"sweep": {"board": "host-cpu", "epochs": 1, "options": {"learn_edges": True}},
                       "grid": [{"method": ["fixed"], "bits": ["w2a2", "w4a4"], "seed": [0, 1]},
                                {"method": ["adaqat"], "lam": [0.5, 1], "options": {"max_bits": [5, 6]}},
                                {"method": ["fixed"], "bits": ["w2a2"], "seed": [0]}]})   # a duplicate
    assert len(pts) == 4 + 4
    assert all(dict(p.options)["learn_edges"] is True for p in pts)
    assert {dict(p.options).get("max_bits") for p in pts} == {None, 5, 6}
    assert len({point_key(p) for p in pts}) == 8
    assert point_key(Point("host-cpu", seed=1)) != point_key(Point("host-cpu", seed=2))
    assert set(varying_keys(pts)) == {"method", "bits", "seed", "lam", "options.max_bits"}
    p = next(p for p in pts if p.method == "adaqat")
    assert p.label(varying_keys(pts)) == f"method=adaqat lam={p.lam} max_bits={dict(p.options)['max_bits']}"


def test_pareto_front():
    pts = [(1.0, 0.5, "a"), (2.0, 0.5, "b"), (2.0, 0.7, "c"), (3.0, 0.6, "d"), (4.0, 0.9, "e")]
    assert [t for _, _, t in pareto(pts)] == ["a", "c", "e"]


@pytest.mark.parametrize("doc,says", [
    ({"grid": {"seed": [0]}}, "no board"),
    ({"sweep": {"board": "host-cpu", "colour": "red"}}, "unknown key 'colour' in [sweep]"),
    ({"sweep": {"board": "host-cpu"}, "grid": {"seed": 3}}, "[grid] seed must be a non-empty list"),
    ({"sweep": {"board": "host-cpu"}, "grid": {"seed": []}}, "[grid] seed must be a non-empty list"),
    ({"sweep": {"board": "host-cpu"}, "grid": {"epochs": ["two"]}}, "epochs = 'two' has the wrong type"),
    ({"sweep": {"board": "host-cpu", "subset": [10]}}, "subset = [10] has the wrong type"),
    ({"sweep": {"board": "host-cpu"}, "grid": {"lam": [1.0]}}, "lam steer AdaQAT's width learning"),
    ({"sweep": {"board": "host-cpu"}, "grids": {}}, "unknown section(s) grids"),
    ({"sweep": {"board": "host-cpu"}, "grid": [{"options": {"max_bits": 5}}]}, "options.max_bits must be a non-empty list"),
])
def test_grid_mistakes_are_one_clear_error(doc, says):
    with pytest.raises(BitfoldError) as e:
        grid_points(doc)
    assert says in e.value.message


@pytest.mark.parametrize("point,says", [
    (Point("no-such-board"), "no-such-board"),
    (Point("host-cpu", method="adaqat", budget="lut<=100"), "measures latency, not 'lut'"),
    (Point("host-cpu", method="adaqat", options=(("colour", 1),)), "colour"),
    (Point("host-cpu", fps=100.0), "fps is an FPGA board's rate"),
])
def test_points_are_checked_before_any_work(point, says):
    with pytest.raises(BitfoldError) as e:
        check_points([point])
    assert says in str(e.value)


def test_grid_file_errors(tmp_path):
    with pytest.raises(BitfoldError, match="does not exist"):
        load_grid(tmp_path / "none.toml")
    (tmp_path / "bad.toml").write_text("[sweep\nboard=1")
    with pytest.raises(BitfoldError, match="is not valid TOML"):
        load_grid(tmp_path / "bad.toml")
