"""hw_models: measurement store (WAL, concurrent writers), fitted tables, differentiable interpolation,
and a real measured table driving AdaQAT."""
import multiprocessing as mp

import pytest
import torch

from bitfold.hw_models.cost import get_cost_model
from bitfold.hw_models.store import Measurement, MeasurementStore
from bitfold.hw_models.table import TableCostModel, fit_table
from bitfold.hw_models.layers import LayerDesc
from bitfold.core.errors import BitfoldError


def _row(macs, w, a, value, kind="conv", board="toy"):
    return Measurement(board=board, kind=kind, macs=macs, weights=macs // 10, b_w=w, b_a=a, metric="lut",
                       value=value, unit="LUT", source="estimated", tool="formula")


def _writer(path, k):
    store = MeasurementStore(path)
    for i in range(20):
        store.add([_row(100 + i, 2, 2, float(k * 1000 + i))])


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "m.sqlite"
    MeasurementStore(path)
    procs = [mp.get_context("spawn").Process(target=_writer, args=(path, k)) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    rows = MeasurementStore(path).query("toy")
    assert len(rows) == 60 and len({r.value for r in rows}) == 60
    assert rows[0].date and rows[0].source == "estimated"


def test_fit_recovers_a_known_cost_and_interpolates_with_gradients(tmp_path):
    rows = [_row(m, w, a, 50 + m * 0.01 * w * a) for m in (1000, 5000) for w in (2, 4, 8) for a in (2, 8)]
    table = fit_table(rows, "toy", "lut")
    cm = TableCostModel(table)
    d = LayerDesc("l", "conv", (), (), 1, 1, (3, 3), (1, 1), 1, 2000, 200, None)
    assert float(cm([d], {"l": (4, 2)}).total) == pytest.approx(50 + 2000 * 0.08, rel=1e-3)
    bw = torch.tensor(3.0, requires_grad=True)
    c = cm([d], {"l": (bw, torch.tensor(8.0))}).total
    assert float(c) == pytest.approx(50 + 2000 * 0.01 * 3 * 8, rel=1e-3)  # linear between 2 and 4
    c.backward()
    assert float(bw.grad) == pytest.approx(2000 * 0.01 * 8, rel=1e-3)
    assert float(cm([d], {"l": (12, 8)}).total) == pytest.approx(float(cm([d], {"l": (8, 8)}).total))  # clamped
    with pytest.raises(BitfoldError, match="no 'latency' measurements"):
        fit_table(rows, "toy", "latency")


def test_measured_host_table_drives_adaqat(tmp_path):
    pytest.importorskip("tvm", reason="apache-tvm is not installed")
    from bitfold.boards import load_board
    from bitfold.hw_models.table import table_path
    from bitfold.export.tvm.probe import measure
    from bitfold.core.atomic import write_json
    from bitfold.toolchain.runs import TrainConfig
    from bitfold.toolchain.train import train
    rows = measure(load_board("host-cpu"), {"conv": [(8, 8, 8)], "linear": [(64, 32), (128, 64)], "bits": [2, 8]},
                   number=5, repeat=3)
    assert len(rows) == 12 and all(r.value > 0 and r.source == "measured" and r.tool == "tvm" for r in rows)
    store = MeasurementStore(tmp_path / "m.sqlite")
    store.add(rows)
    write_json(table_path("host-cpu"), fit_table(store.query("host-cpu", "latency"), "host-cpu", "latency"))
    cm = get_cost_model("host-cpu")
    assert cm.unit == "s"
    m = train(TrainConfig(model="mlp", bits="w8a8", method="adaqat", epochs=2,
                          method_options={"cost": "host-cpu", "lam": 0.1, "finetune_epochs": 1}),
              tmp_path / "run", progress=False)
    assert m["adaqat"]["cost_unit"] == "s" and m["adaqat"]["final_cost"] > 0
    table_path("host-cpu").unlink()
