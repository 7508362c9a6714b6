"""The headline benchmark's --quick mode, end to end on host-cpu (Fashion-MNIST subset, TVM builds,
measured latency): every configuration is trained, exported, built and measured, and the summary
holds what the benchmark reports."""
import importlib.util
import json
from pathlib import Path

import pytest

from bitfold.toolchain.data import FASHION_MNIST_DIR

BENCH = Path(__file__).parents[2] / "benchmarks" / "hw_aware_vs_bitops.py"


def test_quick_mode_runs_every_configuration_and_reports(tmp_path):
    pytest.importorskip("tvm", reason="apache-tvm is not installed")
    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip("dataset-fashion-mnist (Debian package) is not installed")
    spec = importlib.util.spec_from_file_location("hw_aware_vs_bitops", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--quick", "--targets", "host-cpu", "--out", str(tmp_path), "--scheduler", "inprocess"])
    labels = {s["label"] for s in out["stats"]}
    assert labels == {"uniform W2A2", "uniform W8A8", "bitops lam=1", "board lam=1"}
    assert all(s["cost_mean"] > 0 and 0.1 < s["acc_mean"] <= 1 for s in out["stats"])
    # every layer free: the AdaQAT points may move the first and last layer too
    pts = [json.loads(p.read_text()) for p in tmp_path.rglob("result.json")]
    assert len(pts) == 4 and all(len(p["bits"].split()) == 4 for p in pts)
    assert [r["bitops"] for r in out["reductions"]] == ["bitops lam=1"]
    assert (tmp_path / "summary.json").is_file() and (tmp_path / "hw_vs_bitops.png").stat().st_size > 0
    # a second call resumes from the cached points (same numbers, nothing retrained)
    again = bench.main(["--quick", "--targets", "host-cpu", "--out", str(tmp_path), "--scheduler", "inprocess"])
    assert again["stats"] == out["stats"]
