"""Backend registry: a board's ``backend`` field names the builder that turns a verified ONNX
export into a build directory (``build.json`` + artefacts).

Builders are looked up lazily, so a backend's heavy dependency (TVM, a FINN environment, the
yowasp tools) is only needed when that backend is used.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from bitfold.toolchain.errors import BitfoldError


@dataclass
class BuildResult:
    out_dir: Path
    board: str
    backend: str
    artefacts: dict
    verified: bool
    verification: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def as_dict(self):
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        return d


def _tvm():
    from . import tvm_backend
    return tvm_backend.build


def _open_fpga():
    from . import open_fpga
    return open_fpga.build


def _finn():
    from . import finn_backend
    return finn_backend.build


BACKENDS: dict[str, Callable[[], Callable]] = {"tvm": _tvm, "open-fpga": _open_fpga, "finn": _finn}


def register_backend(name: str, loader: Callable[[], Callable]) -> None:
    BACKENDS[name] = loader


@contextlib.contextmanager
def staged_dir(final: Path):
    """Build into a temporary sibling directory; replace ``final`` only when the build succeeded."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build(onnx_path: str | Path, board: str, out_dir: str | Path, **options) -> BuildResult:
    """Build ``onnx_path`` for ``board`` into ``out_dir`` with the board's backend."""
    from bitfold.boards import load_board
    b = load_board(board)
    if b.backend not in BACKENDS:
        raise BitfoldError(f"board {b.name} uses the {b.backend!r} backend, which this bitfold version does not "
                           f"provide yet", f"available backends: {', '.join(BACKENDS)}")
    return BACKENDS[b.backend]()(Path(onnx_path), b, Path(out_dir), **options)
