import hashlib
import os
import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore")
os.environ.setdefault("OMP_NUM_THREADS", "2")
# hermetic: measurement databases and fitted tables of this test session live in a temp dir
import tempfile  # noqa: E402

os.environ["BITFOLD_HOME"] = tempfile.mkdtemp(prefix="bitfold-home-")


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A short digits CNN run (mixed bits incl. 2-bit), shared by export and CLI tests."""
    from bitfold.toolchain.runs import TrainConfig
    from bitfold.toolchain.train import train
    out = tmp_path_factory.mktemp("runs") / "cnn_mixed"
    bits = {"convs.0": {"w": 8, "a": 8}, "convs.1": {"w": 2, "a": 4}, "convs.2": {"w": 3, "a": 2},
            "head": {"w": 5, "a": 6}}
    metrics = train(TrainConfig(model="cnn", bits=bits, epochs=3), out, progress=False)
    return out, metrics
