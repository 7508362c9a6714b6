"""Run directories: config, checkpoint and metrics of one training run.

Layout of ``runs/x``::

    config.json      what was asked for (model, data, method, bit map, seed, ...)
    checkpoint.pt    latest epoch: weights, optimizer, scheduler, history (atomic, every epoch)
    bitmap.json      the resolved per-layer bit map ({layer: {w, a}})
    metrics.json     final accuracy, per-layer bits, BitOPs, weight bits, history

Checkpoints are read with ``torch.load(weights_only=True)``: a checkpoint from elsewhere cannot
run code.
"""
from __future__ import annotations

import json
import pickle
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from bitfold.core.atomic import atomic_path, write_json
from bitfold.core.errors import BitfoldError

CONFIG, CHECKPOINT, METRICS, BITMAP = "config.json", "checkpoint.pt", "metrics.json", "bitmap.json"
CHECKPOINT_FORMAT = 1


@dataclass
class TrainConfig:
    model: str = "cnn"
    data: str = "digits"
    data_dir: str | None = None
    bits: object = "w4a4"            # shorthand, {layer: {w, a}} dict, or JSON path
    method: str = "fixed"            # a registered method, or "float"
    method_options: dict = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "cpu"
    weights: str | None = None       # float state dict to start from (user models: file.py:factory)
    init_from: str | None = None     # a run directory whose weights start this run (e.g. after allocate)
    synthetic_shape: tuple = (3, 32, 32)
    subset: tuple | None = None      # (train, test) sample counts: a fixed subset (quick runs, smoke tests)
    compile: str | None = None       # torch.compile backend of the training steps (e.g. "inductor"); None: eager

    def to_json(self) -> dict:
        d = asdict(self)
        d["synthetic_shape"] = list(self.synthetic_shape)
        if self.subset is not None:
            d["subset"] = list(self.subset)
        if self.compile is None:     # configs of eager runs read as before the option existed
            del d["compile"]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise BitfoldError(f"run config has unknown field(s) {', '.join(sorted(unknown))}",
                               "was it written by a newer bitfold?")
        d = dict(d)
        if "synthetic_shape" in d:
            d["synthetic_shape"] = tuple(d["synthetic_shape"])
        if d.get("subset") is not None:
            d["subset"] = tuple(d["subset"])
        return cls(**d)


def dataset_of(cfg: TrainConfig):
    """The data set a run config names, cut to ``cfg.subset`` when it has one."""
    from bitfold.toolchain.data import load_dataset, take_subset
    ds = load_dataset(cfg.data, cfg.data_dir, cfg.seed, cfg.synthetic_shape)
    return ds if cfg.subset is None else take_subset(ds, *cfg.subset)


def load_config_file(path: str | Path) -> TrainConfig:
    """A TrainConfig from a JSON file (a run's ``config.json``, or one written by ``to_json``)."""
    p = Path(path)
    if not p.is_file():
        raise BitfoldError(f"config file {p} does not exist", "pass a run's config.json or a saved TrainConfig")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BitfoldError(f"{p} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise BitfoldError(f"{p} is not a TrainConfig (a JSON object)")
    return TrainConfig.from_json(data)


def read_config(run_dir: Path) -> TrainConfig:
    p = Path(run_dir) / CONFIG
    if not p.is_file():
        raise BitfoldError(f"{run_dir} is not a bitfold run directory (no {CONFIG})",
                           "pass the --out directory of a `bitfold train` run")
    try:
        return TrainConfig.from_json(json.loads(p.read_text()))
    except json.JSONDecodeError as e:
        raise BitfoldError(f"{p} is not valid JSON ({e.msg})") from e


def save_checkpoint(run_dir: Path, payload: dict) -> None:
    with atomic_path(Path(run_dir) / CHECKPOINT) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, **payload}, tmp)


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise BitfoldError(f"checkpoint {path} does not exist", "train first, or check the run directory")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BitfoldError(f"checkpoint {path} is corrupt or not a bitfold checkpoint ({first[:160]})",
                           "re-run training (or restore the file); untrusted files are never unpickled") from e
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT or "model" not in ck:
        raise BitfoldError(f"checkpoint {path} is not a bitfold checkpoint (format {CHECKPOINT_FORMAT})",
                           "pass a checkpoint written by `bitfold train`")
    return ck


def load_state_dict_file(path: str | Path) -> dict:
    """A float model's state dict from a ``.pt`` file (a bare state dict, or under 'state_dict'/'model')."""
    path = Path(path)
    if not path.is_file():
        raise BitfoldError(f"weights file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
        raise BitfoldError(f"weights file {path} cannot be read safely ({str(e).splitlines()[0][:160]})",
                           "save it with torch.save(model.state_dict(), path); files are loaded with "
                           "weights_only=True and never unpickled") from e
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                return obj[key]
    if not isinstance(obj, dict):
        raise BitfoldError(f"weights file {path} holds a {type(obj).__name__}, not a state dict")
    return obj


def load_run(run_dir: Path | str, map_location="cpu"):
    """Rebuild a run's model from its config and load its latest weights (eval mode).

    Returns ``(config, model, checkpoint)``.
    """
    from bitfold.toolchain.models import build_model
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    ck = load_checkpoint(run_dir / CHECKPOINT, map_location)
    bits = ck.get("bit_map") or cfg.bits
    model = build_model(cfg.model, tuple(ck["input_shape"]), ck["num_classes"], bits=bits,
                        method=cfg.method, **cfg.method_options)  # the checkpoint replaces any float weights
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise BitfoldError(f"checkpoint in {run_dir} does not match its config ({str(e).splitlines()[0]})",
                           "the run directory was modified; re-run training") from e
    model.eval()
    return cfg, model, ck


def write_metrics(run_dir: Path, metrics: dict) -> None:
    write_json(Path(run_dir) / METRICS, metrics)
