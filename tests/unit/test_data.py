import gzip
import pickle
import struct

import numpy as np
import pytest

from bitfold.toolchain.data import load_dataset
from bitfold.core.errors import BitfoldError


def test_digits_split_is_fixed_and_stratified():
    a, b = load_dataset("digits", seed=0), load_dataset("digits", seed=7)
    assert a.input_shape == (1, 8, 8) and len(a.x_train) + len(a.x_test) == 1797
    assert (a.x_test == b.x_test).all()
    counts = np.bincount(a.y_test.numpy())
    assert counts.min() >= 34 and counts.max() <= 38
    assert 0.0 <= float(a.x_train.min()) and float(a.x_train.max()) <= 1.0


def _idx(path, arr, gz=False):
    header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def test_mnist_idx_reader(tmp_path):
    rng = np.random.default_rng(0)
    _idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (20, 28, 28)), gz=True)
    _idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, (20,)), gz=True)
    imgs = rng.integers(0, 256, (5, 28, 28))
    _idx(tmp_path / "t10k-images-idx3-ubyte", imgs)
    _idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(5))
    ds = load_dataset("mnist", tmp_path)
    assert ds.input_shape == (1, 28, 28) and len(ds.x_train) == 20
    assert np.allclose(ds.x_test[:, 0].numpy(), imgs / 255.0) and ds.y_test.tolist() == [0, 1, 2, 3, 4]


def test_cifar_batch_reader(tmp_path):
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(tmp_path / name, "wb") as fh:
            pickle.dump({b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [1, 2, 3, 4]}, fh)
    ds = load_dataset("cifar10", tmp_path)
    assert ds.input_shape == (3, 32, 32) and len(ds.x_train) == 20 and len(ds.x_test) == 4


def test_missing_local_files_are_clear_errors(tmp_path):
    with pytest.raises(BitfoldError, match="never downloads"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(BitfoldError, match="never downloads"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(BitfoldError, match="does not exist"):
        load_dataset("cifar10", tmp_path / "nope")
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"junk")
    with pytest.raises(BitfoldError, match="not a valid IDX"):
        load_dataset("mnist", tmp_path)


def test_synthetic():
    ds = load_dataset("synthetic", synthetic_shape=(3, 32, 32))
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10


def test_fashion_mnist_from_the_debian_package():
    """The real data set, as Debian's dataset-fashion-mnist installs it (.ci/run installs it)."""
    from bitfold.toolchain.data import FASHION_MNIST_DIR
    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip("dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    ds = load_dataset("fashion-mnist")
    assert ds.name == "fashion-mnist" and ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert len(ds.x_train) == 60000 and len(ds.x_test) == 10000
    assert np.bincount(ds.y_test.numpy()).tolist() == [1000] * 10
    assert 0.0 <= float(ds.x_test.min()) and float(ds.x_test.max()) <= 1.0


def test_fashion_mnist_missing_package_is_one_clear_error(tmp_path, monkeypatch):
    import bitfold.toolchain.data as data
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "not-installed")
    with pytest.raises(BitfoldError, match="Fashion-MNIST is not installed") as e:
        load_dataset("fashion-mnist")
    assert "apt-get install dataset-fashion-mnist" in e.value.hint
    with pytest.raises(BitfoldError, match="does not exist"):
        load_dataset("fashion-mnist", tmp_path / "nowhere")


def test_fashion_mnist_from_a_data_dir(tmp_path):
    rng = np.random.default_rng(1)
    for stem, shape in (("train-images-idx3-ubyte", (12, 28, 28)), ("train-labels-idx1-ubyte", (12,)),
                        ("t10k-images-idx3-ubyte", (6, 28, 28)), ("t10k-labels-idx1-ubyte", (6,))):
        _idx(tmp_path / f"{stem}.gz", rng.integers(0, 10 if "labels" in stem else 256, shape), gz=True)
    ds = load_dataset("fashion-mnist", tmp_path)
    assert ds.name == "fashion-mnist" and len(ds.x_train) == 12 and ds.input_shape == (1, 28, 28)
