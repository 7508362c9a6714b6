"""Adding a backend is one folder (tests/toy_backend/) and one registration."""
import pytest

from bitfold.cli import main
from bitfold.core.errors import BitfoldError
from bitfold.core.registry import backend_names, register_backend, unregister_backend


@pytest.fixture
def toy():
    from toy_backend import ToyBackend
    register_backend("toy", ToyBackend)
    yield
    unregister_backend("toy")


def test_a_toy_backend_builds_through_the_cli_and_shows_in_doctor(toy, trained_run, tmp_path, capsys):
    from bitfold.app.doctor import diagnose
    from bitfold.export.onnx_export import export_run
    assert "toy" in backend_names()
    board = tmp_path / "toyboard.toml"
    board.write_text('name = "toyboard"\ndescription = "a toy"\nkind = "cpu"\nbackend = "toy"\n'
                     'triple = "x86_64-linux-gnu"\ncpu = "generic"\ncores = 1\n')
    onnx = export_run(trained_run[0], "qcdq", tmp_path / "m.onnx").path
    main(["build", str(onnx), "--board", str(board), "-o", str(tmp_path / "b")])
    out = capsys.readouterr().out
    assert "toy build for toyboard" in out and "toy build of m.onnx" in out
    assert (tmp_path / "b" / "build.json").is_file()
    assert any(r["name"] == "toy tool" and r["found"] for r in diagnose())
    # a flag the toy backend does not have is one clear error naming it
    with pytest.raises(SystemExit) as e:
        main(["build", str(onnx), "--board", str(board), "-o", str(tmp_path / "c"), "--tune-trials", "3"])
    assert e.value.code == 2 and "--tune-trials does not apply" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_a_board_naming_an_unregistered_backend_is_refused(tmp_path):
    from bitfold.boards import load_board
    board = tmp_path / "b.toml"
    board.write_text('name = "b"\ndescription = "x"\nkind = "cpu"\nbackend = "toy"\n'
                     'triple = "x86_64-linux-gnu"\ncpu = "generic"\ncores = 1\n')
    with pytest.raises(BitfoldError, match="must name a registered backend"):
        load_board(board)
