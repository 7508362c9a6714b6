"""The method benchmark's --quick mode (benchmarks/methods_fashion.py) per method: Fashion-MNIST subset,
one seed, every run from the same float checkpoint; the table has its baseline rows and its shape."""
import csv
import importlib.util
import json
from pathlib import Path

import pytest

from bitfold.toolchain.data import FASHION_MNIST_DIR

BENCH = Path(__file__).parents[2] / "benchmarks" / "methods_fashion.py"
WANT = {
    "adaqat": {"FP32", "fixed W2A2", "fixed W8A8", "adaqat ste lam=1"},
    "mebqat": {"FP32", "mebqat (one model)", "fixed W2A2", "fixed W8A8", "mebqat at W2A2", "mebqat at W8A8",
               "adaqat at budget BitOPs(W2A2)", "mebqat selected at budget BitOPs(W2A2)"},
    "adq": {"FP32", "fixed W3A4", "fixed W4A4", "adq W3A4", "adq W4A4 (allocation source)",
            "adq Fisher-allocated <=3 avg bits", "adq W3A4 non-uniform activations"},
    "asq": {"FP32", "fixed W4A4", "asq W4A4", "asq W4A4: folded QCDQ (onnxruntime)", "asq W4A4: dynamic ONNX (onnxruntime)"},
}


@pytest.mark.parametrize("method", sorted(WANT))
def test_quick_table_has_its_baselines(method, tmp_path):
    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip("dataset-fashion-mnist (Debian package) is not installed")
    spec = importlib.util.spec_from_file_location("methods_fashion", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.main(["--method", method, "--quick", "--out", str(tmp_path), "--scheduler", "inprocess"])
    rows = {r["row"] for r in res}
    assert rows == WANT[method] | {"float checkpoint (start of every row)"}
    out = tmp_path / f"{method}_mlp"
    st = json.loads((out / "summary.json").read_text())["rows"]
    assert {s["row"] for s in st} == rows and all(s["seeds"] == 1 for s in st)
    trained = [s for s in st if s["acc_mean"] is not None]
    assert all(0.3 < s["acc_mean"] <= 1 for s in trained)          # every trained row learned something
    assert len(list(csv.DictReader(open(out / "runs.csv")))) == len(res)
    assert (out / f"{method}.png").read_bytes()[:4] == b"\x89PNG"
    # every quantized row started from the float checkpoint (its weights, not a fresh init)
    for d in (out / "s0").glob("r*"):
        assert json.loads((d / "config.json").read_text())["init_from"] == str(out / "s0" / "float")
