"""The CLI end to end, and its answers to bad input: one clear error, exit != 0, files untouched."""
import json
import shutil

import pytest

from bitfold.cli import main
from conftest import digest


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
        raise SystemExit(0)
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


def test_train_export_inspect(tmp_path, capsys):
    out = tmp_path / "r"
    code, so, _ = run_cli(["train", "--model", "mlp", "--bits", "w3a3", "--epochs", "2", "--quiet", "-o", str(out)],
                          capsys)
    assert code == 0 and "test accuracy" in so
    code, so, _ = run_cli(["export", str(out), "--format", "qcdq", "-o", str(tmp_path / "m.onnx")], capsys)
    assert code == 0 and "argmax agreement 100.00%" in so
    code, so, _ = run_cli(["inspect", str(tmp_path / "m.onnx")], capsys)
    assert code == 0 and '"format": "qcdq"' in so


def test_boards_listing(capsys):
    code, so, _ = run_cli(["boards"], capsys)
    assert code == 0
    for b in ("pynq-z2", "zcu104", "ultra96-v2", "ulx3s-85f", "icebreaker", "rpi4", "host-cpu"):
        assert b in so


@pytest.mark.parametrize("args, words", [
    (["boards", "no-such-board"], "unknown board 'no-such-board'"),
    (["train", "--bits", "w4a12", "-o", "{tmp}/x"], "outside [1, 8]"),
    (["train", "--bits", "four", "-o", "{tmp}/x"], "not understood"),
    (["train", "--bits-map", "{tmp}/missing.json", "-o", "{tmp}/x"], "does not exist"),
    (["train", "--model", "vgg", "--epochs", "1", "-o", "{tmp}/x"], "unknown model"),
    (["train", "--data", "mnist", "--epochs", "1", "-o", "{tmp}/x"], "needs --data-dir"),
    (["export", "{tmp}"], "not a bitfold run directory"),
    (["inspect", "{tmp}/garbage.onnx"], "not a valid ONNX model"),
])
def test_bad_input_gives_one_clear_error(tmp_path, capsys, args, words):
    (tmp_path / "garbage.onnx").write_bytes(b"\x08\x07garbage-not-protobuf" * 10)
    code, _, se = run_cli([a.replace("{tmp}", str(tmp_path)) for a in args], capsys)
    assert code == 2
    assert words in se and "Traceback" not in se
    assert not (tmp_path / "x").exists()


def test_malformed_bit_map_file(tmp_path, capsys):
    p = tmp_path / "bm.json"
    p.write_text('{"convs.0": {"w": 4}}')
    code, _, se = run_cli(["train", "--bits-map", str(p), "-o", str(tmp_path / "x")], capsys)
    assert code == 2 and "exactly the keys 'w' and 'a'" in se


def test_corrupt_checkpoint_and_truncated_onnx_leave_files_intact(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    ck = run / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[:2000])  # truncated
    existing = run / "model.qonnx.onnx"
    existing.write_bytes(b"previous export")
    before = {p.name: digest(p) for p in run.iterdir()}
    code, _, se = run_cli(["export", str(run)], capsys)
    assert code == 2 and "corrupt or not a bitfold checkpoint" in se
    assert {p.name: digest(p) for p in run.iterdir()} == before

    good = tmp_path / "good.onnx"
    code, _, _ = run_cli(["export", str(trained_run[0]), "-o", str(good)], capsys)
    assert code == 0
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    code, _, se = run_cli(["inspect", str(trunc)], capsys)
    assert code == 2 and "not a valid ONNX model" in se


def test_foreign_pickle_checkpoint_is_not_executed(trained_run, tmp_path, capsys):
    import pickle

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    with open(run / "checkpoint.pt", "wb") as fh:
        pickle.dump({"format": 1, "model": Evil()}, fh)
    code, _, se = run_cli(["export", str(run)], capsys)
    assert code == 2 and "checkpoint" in se
    assert not (tmp_path / "pwned").exists()


def test_demo_skips_a_stage_whose_tool_is_missing_with_one_line(tmp_path, capsys, monkeypatch):
    """The demo without the open flow and TVM: training, both exports and the summary still run; each
    missing tool is one line (the whole chain with every tool: tests/fpga/test_demo.py)."""
    import bitfold.export.open_fpga.flow as flow
    import bitfold.export.tvm.backend as tvm_backend
    from bitfold.core.errors import ToolMissingError

    def missing(name, *a, **k):
        raise ToolMissingError(f"{name} is not installed (needed by the open-FPGA flow)", "pip install 'bitfold[fpga]'")

    def no_tvm():
        raise ToolMissingError("the TVM backend needs apache-tvm, which is not installed", "pip install 'bitfold[tvm]'")
    monkeypatch.setattr(flow, "find_tool", missing)
    monkeypatch.setattr(tvm_backend, "import_tvm", no_tvm)
    code, so, _ = run_cli(["demo", "--out", str(tmp_path / "demo"), "--epochs", "3", "--quiet"], capsys)
    assert code == 0, so
    assert so.count("argmax agreement 100.00%") == 2
    skipped = [line for line in so.splitlines() if "skipped:" in line and "[" not in line[:3]]
    assert any("not installed" in line for line in skipped) and "FPGA build skipped" in so and "TVM build skipped" in so
    r = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert r["fpga"] is None and r["cpu"] is None and len(r["skipped"]) == 2
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 10_000
    assert (tmp_path / "demo" / "mlp_mixed.qonnx.onnx").is_file() and (tmp_path / "demo" / "mlp_mixed.qcdq.onnx").is_file()


def test_doctor_lists_every_component_and_what_it_disables(capsys, monkeypatch):
    from bitfold.cli import main
    from bitfold.app.doctor import diagnose
    monkeypatch.setenv("PATH", "/nonexistent")        # no vivado / cross compiler / loader on PATH
    monkeypatch.setenv("COLUMNS", "200")
    rows = {r["name"]: r for r in diagnose()}
    assert rows["torch"]["found"] and rows["qonnx"]["found"]
    assert rows["Vivado"]["found"] is None and "Xilinx bitstreams" in rows["Vivado"]["enables"]
    assert rows["qemu-aarch64-static"]["found"] is None and rows["arm64 sysroot"]["get"] == "bitfold setup arm64"
    assert "0.1.14" in rows["MetaSchedule (tvm-ffi 0.1.14, xgboost)"]["found"]   # the tvm extra's pin
    with pytest.raises(SystemExit) as e:
        main(["doctor"])
        raise SystemExit(0)
    out = capsys.readouterr().out
    assert e.value.code == 0 and "Vivado" in out and "missing" in out and "torch" in out
