"""Shipped cost tables are reproducible from their shipped rows, every row is dated, and a refit
keeps the whole-model factor with its evidence."""
import json
from importlib import resources
from pathlib import Path

import pytest

from bitfold.hw_models.store import Measurement
from bitfold.hw_models.table import find_table, fit_table, refit_model_factor

TABLES = Path(str(resources.files("bitfold.hw_models"))) / "tables"
ROWS = sorted(TABLES.glob("*.rows.json"))


def test_every_shipped_table_ships_its_rows():
    boards = sorted(p.stem for p in TABLES.glob("*.json") if not p.name.endswith(".rows.json")
                    and "kinds" in json.loads(p.read_text()))
    assert [p.name[:-len(".rows.json")] for p in ROWS] == boards and "host-cpu" in boards


def _close(a, b, where=""):
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-9), where
    else:
        assert a == b, where


@pytest.mark.parametrize("rows_file", ROWS, ids=lambda p: p.name)
def test_shipped_table_refits_from_its_shipped_rows(rows_file):
    data = json.loads(rows_file.read_text())
    shipped = json.loads((TABLES / f"{data['board']}.json").read_text())
    rows = [Measurement(**r) for r in data["rows"]]
    assert all(r.date for r in rows), "every shipped row has a date"
    fit = fit_table([r for r in rows if r.metric == shipped["metric"]], data["board"], shipped["metric"])
    assert fit["provenance"]["rows"] == shipped["provenance"]["rows"]
    assert fit["provenance"]["dates"] == shipped["provenance"]["dates"]
    _close(fit["kinds"], shipped["kinds"], data["board"])


def test_shipped_factor_refits_from_its_evidence_and_reports_out_of_sample_error():
    shipped = json.loads((TABLES / "ulx3s-85f.json").read_text())
    cal = shipped["calibration"]
    again = refit_model_factor(shipped, cal["models_measured"])["calibration"]
    assert again["scale"] == pytest.approx(cal["scale"], rel=1e-9) and again["models"] == cal["models"] == 7
    assert again["mape_loo"] == pytest.approx(cal["mape_loo"]) and cal["mape_loo"] > cal["mape_after"]


def test_calibrate_refit_keeps_the_factor_with_its_evidence(tmp_path, monkeypatch):
    """`bitfold hw fit` / `calibrate` used to write a table without the shipped factor (predictions
    moved by 16 %); now the factor is refitted on the new table from the same measured models."""
    from bitfold.app.calibrate import carry_model_factor, fit_board
    from bitfold.hw_models.store import MeasurementStore
    monkeypatch.setenv("BITFOLD_HOME", str(tmp_path))
    rows = [Measurement(**r) for r in json.loads((TABLES / "ulx3s-85f.rows.json").read_text())["rows"]]
    MeasurementStore(tmp_path / "m.sqlite").add([r for r in rows if r.metric == "lut"])
    shipped = find_table("ulx3s-85f")
    path, table = fit_board("ulx3s-85f", db=tmp_path / "m.sqlite")
    assert path.parent == tmp_path / "tables"
    cal = table["calibration"]
    assert cal["scale"] == pytest.approx(shipped.table["calibration"]["scale"], rel=1e-9)
    assert "refitted on the new table from 7 measured models" in cal["note"]
    # evidence without layer shapes is carried as it was, and says so
    old = json.loads(json.dumps(shipped.table))
    for e in old["calibration"]["models_measured"]:
        e.pop("layers")
    shipped.table = old
    carried = carry_model_factor(fit_table([r for r in rows if r.metric == "lut"], "ulx3s-85f", "lut"), shipped)
    assert carried["calibration"]["scale"] == old["calibration"]["scale"] and "carried unchanged" in \
        carried["calibration"]["note"]
