"""Data sources. Nothing here downloads: the default is scikit-learn's embedded ``load_digits``.

* ``digits``    - 1,797 8x8 grey images (shipped inside scikit-learn's wheel), fixed-seed
                  stratified 80/20 split, pixels scaled to [0, 1].
* ``mnist``     - the four IDX files (optionally ``.gz``) from a local ``--data-dir``.
* ``fashion-mnist`` - the same four IDX files of Fashion-MNIST, found where Debian's package
  ``dataset-fashion-mnist`` installs them (or in ``--data-dir``).
* ``cifar10``   - the python pickle batches (``data_batch_1..5``, ``test_batch``) from ``--data-dir``.
* ``synthetic`` - random tensors of a given shape, for shape-only runs and benchmarks.
"""
from __future__ import annotations

import functools
import gzip
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bitfold.core.errors import BitfoldError

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "synthetic")
#: where Debian's package ``dataset-fashion-mnist`` puts the four IDX files
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample (C, H, W)."""
        return tuple(self.x_train.shape[1:])


def _to_tensors(x: np.ndarray, y: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y.astype(np.int64))


def load_digits_split(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None, :, :]
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in range(10):  # stratified split: the same fraction of every class is held out
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        test_idx.extend(idx[: int(round(len(idx) * test_fraction))])
    test_mask = np.zeros(len(y), bool)
    test_mask[test_idx] = True
    xtr, ytr = _to_tensors(x[~test_mask], y[~test_mask])
    xte, yte = _to_tensors(x[test_mask], y[test_mask])
    return Dataset("digits", xtr, ytr, xte, yte, 10)


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file's array (read-only; decoded once per process and file version: a sweep or a
    benchmark that trains many runs in one process reads Fashion-MNIST's 30 MB of gzip once)."""
    try:
        st = path.stat()
    except OSError as e:
        raise BitfoldError(f"{path} cannot be read ({e.strerror})", "point --data-dir at the original MNIST files") from e
    return _read_idx_cached(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _read_idx_cached(name: str, mtime_ns: int, size: int) -> np.ndarray:
    path = Path(name)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("bad magic")
        dims = struct.unpack(">" + "I" * ndim, data[4: 4 + 4 * ndim])
        arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return arr.reshape(dims)
    except (OSError, ValueError, struct.error, EOFError) as e:
        raise BitfoldError(f"{path} is not a valid IDX file ({e})",
                           "point --data-dir at the original MNIST files") from e


def _find(data_dir: Path, stem: str) -> Path:
    for cand in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (data_dir / cand).is_file():
            return data_dir / cand
    raise BitfoldError(f"MNIST file {stem}[.gz] not found in {data_dir}",
                       "bitfold never downloads: put the four MNIST IDX files into --data-dir")


_UNIT = (np.arange(256) / 255.0).astype(np.float32)


def load_mnist(data_dir: Path, name: str = "mnist") -> Dataset:
    """MNIST-format IDX files (MNIST or Fashion-MNIST: the same four file names), 28x28 in [0, 1]."""
    data_dir = Path(data_dir)
    arrays = [_read_idx(_find(data_dir, s)) for s in (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
    xtr, ytr, xte, yte = arrays
    # byte -> [0, 1] through a table of the 256 values (the same float32 values as x / 255.0, 8x less work)
    xtr, ytr = _to_tensors(_UNIT[xtr][:, None], ytr)
    xte, yte = _to_tensors(_UNIT[xte][:, None], yte)
    return Dataset(name, xtr, ytr, xte, yte, 10)


def load_fashion_mnist(data_dir: str | Path | None = None) -> Dataset:
    """Fashion-MNIST (60 k train / 10 k test, 28x28, 10 classes) from ``data_dir``, or from where
    Debian's ``dataset-fashion-mnist`` installs it. Nothing is downloaded."""
    if data_dir is None:
        if not FASHION_MNIST_DIR.is_dir():
            raise BitfoldError("Fashion-MNIST is not installed (bitfold never downloads)",
                               "apt-get install dataset-fashion-mnist (Debian), or pass --data-dir DIR holding "
                               "its four IDX files")
        data_dir = FASHION_MNIST_DIR
    elif not Path(data_dir).is_dir():
        raise BitfoldError(f"--data-dir {data_dir} does not exist")
    return load_mnist(Path(data_dir), "fashion-mnist")


CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)[None, :, None, None]
CIFAR_STD = np.array([0.2470, 0.2435, 0.2616], np.float32)[None, :, None, None]


def _read_cifar_batch(path: Path):
    if not path.is_file():
        raise BitfoldError(f"CIFAR-10 batch {path.name} not found in {path.parent}",
                           "bitfold never downloads: extract cifar-10-python.tar.gz into --data-dir")
    try:
        with open(path, "rb") as fh:
            # The CIFAR python batches are pickles; only open files you trust (the official archive).
            d = pickle.load(fh, encoding="bytes")
        x = np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(d[b"labels"], np.int64)
    except Exception as e:  # noqa: BLE001 - any decoding failure is the same user error
        raise BitfoldError(f"{path} is not a CIFAR-10 python batch ({e})") from e
    return x, y


def load_cifar10(data_dir: Path) -> Dataset:
    data_dir = Path(data_dir)
    if (data_dir / "cifar-10-batches-py").is_dir():
        data_dir = data_dir / "cifar-10-batches-py"
    parts = [_read_cifar_batch(data_dir / f"data_batch_{i}") for i in range(1, 6)]
    xtr = np.concatenate([p[0] for p in parts]); ytr = np.concatenate([p[1] for p in parts])
    xte, yte = _read_cifar_batch(data_dir / "test_batch")
    norm = lambda a: (a.astype(np.float32) / 255.0 - CIFAR_MEAN) / CIFAR_STD  # noqa: E731
    xtr, ytr = _to_tensors(norm(xtr), ytr)
    xte, yte = _to_tensors(norm(xte), yte)
    return Dataset("cifar10", xtr, ytr, xte, yte, 10)


def synthetic(shape=(3, 32, 32), num_classes: int = 10, n_train: int = 512, n_test: int = 128,
              seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    return Dataset("synthetic", torch.randn(n_train, *shape, generator=g),
                   torch.randint(0, num_classes, (n_train,), generator=g),
                   torch.randn(n_test, *shape, generator=g),
                   torch.randint(0, num_classes, (n_test,), generator=g), num_classes)


def take_subset(ds: Dataset, n_train: int, n_test: int) -> Dataset:
    """A fixed subset: ``n_train`` training samples drawn with a fixed seed (every class kept in
    proportion, as a random draw does) and the first ``n_test`` test samples."""
    import dataclasses
    if n_train < 1 or n_test < 1:
        raise BitfoldError(f"subset ({n_train}, {n_test}) must have at least one sample each")
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(ds.x_train), generator=g)[:n_train]
    return dataclasses.replace(ds, x_train=ds.x_train[idx], y_train=ds.y_train[idx],
                               x_test=ds.x_test[:n_test], y_test=ds.y_test[:n_test])


def load_dataset(name: str, data_dir: str | Path | None = None, seed: int = 0,
                 synthetic_shape=(3, 32, 32)) -> Dataset:
    if name == "digits":
        return load_digits_split(seed=0)  # the split is fixed, independent of the training seed
    if name in ("mnist", "cifar10"):
        if data_dir is None:
            raise BitfoldError(f"data set {name!r} needs --data-dir",
                               "bitfold never downloads; point --data-dir at the local files")
        if not Path(data_dir).is_dir():
            raise BitfoldError(f"--data-dir {data_dir} does not exist")
        return load_mnist(Path(data_dir)) if name == "mnist" else load_cifar10(Path(data_dir))
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir)
    if name == "synthetic":
        return synthetic(tuple(synthetic_shape), seed=seed)
    raise BitfoldError(f"unknown data set {name!r}", f"choose one of: {', '.join(DATASETS)}")
