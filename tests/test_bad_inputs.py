"""More bad input: unwritable outputs and a full disk - one clear error, existing artefacts intact."""
import errno

import pytest
import torch

from bitfold.cli import main
from bitfold.export.onnx_export import export_run
from bitfold.toolchain.errors import BitfoldError
from bitfold.toolchain.runs import TrainConfig
from bitfold.toolchain.train import train
from conftest import digest


def _cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
        raise SystemExit(0)
    return e.value.code, capsys.readouterr().err


def test_output_under_a_regular_file_is_a_clear_error(tmp_path, trained_run, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = _cli(["train", "--model", "mlp", "--epochs", "1", "--quiet", "-o", str(blocker / "run")], capsys)
    assert code == 2 and "cannot create output directory" in err
    code, err = _cli(["export", str(trained_run[0]), "-o", str(blocker / "m.onnx")], capsys)
    assert code == 2 and "error:" in err and "Traceback" not in err


def test_full_disk_during_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    cfg = TrainConfig(model="mlp", bits="w4a4", epochs=2)
    train(TrainConfig(**{**cfg.__dict__, "epochs": 1}), tmp_path / "r", progress=False)
    before = digest(tmp_path / "r" / "checkpoint.pt")
    real_save = torch.save

    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(BitfoldError, match="No space left on device"):
        train(TrainConfig(**{**cfg.__dict__, "epochs": 2}), tmp_path / "r", resume=True, progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    assert digest(tmp_path / "r" / "checkpoint.pt") == before
    assert not [p for p in (tmp_path / "r").iterdir() if p.name.endswith(".tmp")]


def test_full_disk_during_export_keeps_the_previous_file(trained_run, tmp_path, monkeypatch):
    import onnx
    out = tmp_path / "m.onnx"
    export_run(trained_run[0], "qcdq", out)
    before = digest(out)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx, "save", full)
    with pytest.raises(BitfoldError):
        export_run(trained_run[0], "qcdq", out)
    assert digest(out) == before
