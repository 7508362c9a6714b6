"""`bitfold demo`, the README's first command, end to end with every tool: FP32 vs a mixed map trained
against the ulx3s-85f table, both exports verified, the open-flow bitstream simulated bit-exactly with
its LUTs measured, a TVM host build timed next to onnxruntime, the table and the PNG."""
import json

import pytest

from bitfold.cli import main


def test_demo_runs_the_whole_chain(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "5", "--quiet"])
        raise SystemExit(0)
    so = capsys.readouterr().out
    assert e.value.code == 0, so
    r = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert not r["skipped"], r["skipped"]
    assert so.count("argmax agreement 100.00%") == 2
    # a short run under a LUT budget: far above chance (0.10), not the 10-epoch demo's ~95 %
    assert r["mixed"]["accuracy"] > 0.6 and r["mixed"]["bitops"] < 0.5 * r["fp32"]["bitops"]
    f = r["fpga"]
    assert f["measured_lut"] > 0 and f["predicted_lut"] > 0 and f["bit_exact"] is True and f["simulated_samples"] >= 64
    assert list((tmp_path / "demo" / "mixed").rglob("top.bit")) and (tmp_path / "demo" / "mixed" / "report.png").is_file()
    assert r["cpu"]["tvm_median_s"] > 0 and r["cpu"]["ort_median_s"] > 0
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 10_000
    flat = " ".join(so.replace("│", " ").split())      # the console wraps table cells and long lines
    assert "LUT4" in flat and "onnxruntime" in flat and "bit-exact on 64 held-out inputs" in flat, flat[-1500:]
