import pytest

from bitfold.boards import known_boards, load_board
from bitfold.core.errors import BitfoldError

REQUIRED = {"pynq-z2", "zcu104", "ultra96-v2", "ulx3s-85f", "icebreaker", "rpi4", "host-cpu"}


def test_all_required_boards_ship_and_validate():
    assert REQUIRED <= set(known_boards())
    for name in known_boards():
        b = load_board(name)
        assert b.name == name
        if b.kind == "fpga":
            assert b.part and b.resources["lut"] > 0 and b.clock_mhz > 0
        else:
            assert b.triple and b.cores > 0


def test_figures():
    assert load_board("pynq-z2").part == "xc7z020clg400-1"
    assert load_board("pynq-z2").resources["lut"] == 53200
    assert load_board("icebreaker").resources["lut"] == 5280
    assert load_board("rpi4").triple == "aarch64-linux-gnu"
    assert load_board("host-cpu").triple != "detect"


@pytest.mark.parametrize("text, words", [
    ('name = "x"\ndescription = "d"\nkind = "fpga"\nbackend = "finn"\nvendor = "v"\nfamily = "f"\n'
     'clock_mhz = 100\n[resources]\nlut = 10\n', "missing required field 'part'"),
    ('name = "x"\ndescription = "d"\nkind = "cpu"\nbackend = "tvm"\ntriple = "t"\ncpu = "c"\ncores = "four"\n',
     "field 'cores' must be int"),
    ('name = "x"\ndescription = "d"\nkind = "gpu"\nbackend = "tvm"\n', "field 'kind' must be one of"),
    ('name = "x"\ndescription = "d"\nkind = "cpu"\nbackend = "tvm"\ntriple = "t"\ncpu = "c"\ncores = 4\ncolor = 1\n',
     "unknown field(s) color"),
    ('name = "x\n', "not valid TOML"),
    ('name = "../../etc/x"\ndescription = "d"\nkind = "cpu"\nbackend = "tvm"\ntriple = "t"\ncpu = "c"\ncores = 4\n',
     "field 'name' must be a plain identifier"),
    ('name = "x"\ndescription = "d"\nkind = "cpu"\nbackend = "tvm"\ntriple = "t; rm -rf ~"\ncpu = "c"\ncores = 4\n',
     "field 'triple' must be a plain identifier"),
])
def test_malformed_board_files(tmp_path, text, words):
    p = tmp_path / "b.toml"
    p.write_text(text)
    with pytest.raises(BitfoldError) as e:
        load_board(str(p))
    assert words in str(e.value)


def test_unknown_board_names_the_known_ones():
    with pytest.raises(BitfoldError, match="known boards: .*pynq-z2"):
        load_board("pynq-z3")
