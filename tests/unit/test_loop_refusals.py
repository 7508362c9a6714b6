"""The closed loop's refusals: boards it cannot measure, budgets in the wrong metric."""
import pytest

from bitfold.app.loop import run_loop
from bitfold.core.errors import BitfoldError


def test_loop_refuses_boards_it_cannot_measure(tmp_path):
    with pytest.raises(BitfoldError, match="needs its own measurement driver"):
        run_loop(tmp_path / "x", "pynq-z2")
    with pytest.raises(BitfoldError, match="needs its own measurement driver: a TVM RPC tracker"):
        run_loop(tmp_path / "x", "rpi4")
    with pytest.raises(BitfoldError, match="measures latency, not 'lut'"):
        run_loop(tmp_path / "x", "host-cpu", budget="lut<=100")
    with pytest.raises(BitfoldError, match="measures lut, not 'latency'"):
        run_loop(tmp_path / "x", "ulx3s-85f", budget="latency<=1ms")
