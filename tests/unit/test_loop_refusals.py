"""The closed loop's refusals: boards it cannot measure, budgets in the wrong metric."""
import pytest

from bitfold.app.loop import run_loop
from bitfold.core.errors import BitfoldError


def test_loop_refuses_boards_it_cannot_measure(tmp_path):
    from bitfold.app.loop import FinnTarget, loop_target
    from bitfold.boards import load_board
    # FINN boards are measured by FINN's estimate of the design it builds (recorded as estimated)
    assert all(isinstance(loop_target(load_board(b), None), FinnTarget) for b in ("pynq-z2", "zcu104", "ultra96-v2"))
    with pytest.raises(BitfoldError, match="needs its own measurement driver: a TVM RPC tracker"):
        run_loop(tmp_path / "x", "rpi4")
    with pytest.raises(BitfoldError, match="measures latency, not 'lut'"):
        run_loop(tmp_path / "x", "host-cpu", budget="lut<=100")
    with pytest.raises(BitfoldError, match="measures lut, not 'latency'"):
        run_loop(tmp_path / "x", "ulx3s-85f", budget="latency<=1ms")
    with pytest.raises(BitfoldError, match="--fps applies to FPGA boards"):
        run_loop(tmp_path / "x", "host-cpu", fps=1000)
    with pytest.raises(BitfoldError, match="--fps must be > 0"):
        run_loop(tmp_path / "x", "ulx3s-85f", fps=0)


def test_fpga_loop_at_a_rate_builds_the_folding_its_table_prices(tmp_path, monkeypatch):
    """--fps: the loop's build folds each layer to the rate, the table prices that folding (and a
    different one without a rate); the synthesis itself is the FPGA tests' business."""
    import json

    import torch

    import bitfold.export.backends as backends
    from bitfold.app.loop import OpenFpgaTarget, predicted_cost
    from bitfold.boards import load_board
    from bitfold.export.onnx_export import export_run
    from bitfold.hw_models.fpga_rules import StageShape, fold_at_rate
    from bitfold.hw_models.table import shipped_table_path
    from bitfold.toolchain.describe import describe_layers
    from bitfold.toolchain.runs import TrainConfig, load_run
    from bitfold.toolchain.train import train
    run = tmp_path / "run"
    m = train(TrainConfig(model="mlp", bits="w3a3:all", epochs=1, subset=(300, 64)), run, progress=False)
    onnx = export_run(run, "qonnx", tmp_path / "m.onnx").path
    seen = {}
    monkeypatch.setattr(backends, "build", lambda onnx, board, out, **kw: seen.update(kw) or _Done(out))
    board = load_board("ulx3s-85f")
    tgt = OpenFpgaTarget(board, None)
    tgt.target_fps = 5e4
    tgt.build(str(onnx), tmp_path / "b")
    fold = json.loads(seen["folding"].read_text())
    _, model, ck = load_run(run)
    layers = describe_layers(model, tuple(ck["input_shape"]))
    budget = board.design_mhz * 1e6 / 5e4          # planned at the PLL's design clock
    assert [tuple(fold[k].values()) for k in fold] == [fold_at_rate(StageShape.of_layer(d), budget) for d in layers]
    bits = {x["name"]: {"w": x["w"], "a": x["a"]} for x in m["layers"]}
    table = shipped_table_path("ulx3s-85f")
    assert predicted_cost(run, table, bits, 5e4) != predicted_cost(run, table, bits)
    assert predicted_cost(run, table, bits, 5e4) > predicted_cost(run, table, bits, 5e3)


class _Done:
    def __init__(self, out):
        self.out = out

    def as_dict(self):
        return {"out_dir": str(self.out)}
