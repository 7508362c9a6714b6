"""Backends: the interface every backend implements, its build result, and the build entry point.

A board's ``backend`` field names a backend in the registry (:mod:`bitfold.core.registry`); the
backend turns a verified ONNX export into a build directory (``build.json`` + artefacts),
measures builds, and measures one-layer blocks for the board's cost table.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bitfold.core.errors import BitfoldError


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


@dataclass(frozen=True)
class Requirement:
    """One thing a backend needs, for ``bitfold doctor``: how to detect it, what it enables, how to get it.

    ``how``: ``("dist", name)`` an installed Python distribution, ``("module", name)`` an importable
    module, ``("exe", name)`` a program on PATH, or ``("call", fn)`` a function returning a version
    string (or None when missing)."""
    name: str
    how: tuple
    enables: str
    get: str

    def found(self) -> str | None:
        import importlib
        import shutil
        from importlib.metadata import PackageNotFoundError, version
        kind, what = self.how
        try:
            if kind == "dist":
                return version(what)
            if kind == "module":
                return getattr(importlib.import_module(what), "__version__", "installed")
            if kind == "exe":
                return shutil.which(what)
            if kind == "call":
                return what()
        except (PackageNotFoundError, ImportError, OSError, BitfoldError):
            return None
        except Exception:  # noqa: BLE001 - a broken install is reported as missing, not raised
            return None
        return None


class Backend:
    """The interface of a backend: a folder under ``export/`` with one subclass, registered by name
    (entry point ``bitfold.backends`` or :func:`bitfold.core.registry.register_backend`).

    * ``name``, ``board_kind`` ("fpga" | "cpu"), ``accepts`` (export formats it builds from),
      ``metric`` / ``unit`` (what its cost tables measure);
    * ``Options``: a dataclass of its typed build options; :meth:`options` checks a dict against it;
    * :meth:`build` — a verified export -> a build directory (``build.json`` + artefacts);
    * :meth:`measure` — a build directory -> its measured cost (latency, resources);
    * :meth:`probe` — the cost-table measurement driver: one-layer blocks over a grid -> rows;
    * :meth:`requirements` — what it needs installed (``bitfold doctor``).
    """
    name = ""
    board_kind = ""
    accepts: tuple = ()
    metric = ""
    unit = ""

    @dataclass
    class Options:
        pass

    def options(self, given: dict | None = None):
        """``given`` (only the options the user set) as this backend's ``Options``; an option it
        does not have is one clear error naming the flag."""
        import dataclasses
        given = {k: v for k, v in (given or {}).items()}
        known = {f.name for f in dataclasses.fields(self.Options)}
        bad = sorted(k for k in given if k not in known)
        if bad:
            raise BitfoldError(f"{' / '.join('--' + k.replace('_', '-') for k in bad)} "
                               f"{'does' if len(bad) == 1 else 'do'} not apply to {self.board_kind.upper()} boards "
                               f"({self.name} backend)",
                               f"options of the {self.name} backend: "
                               f"{', '.join('--' + k.replace('_', '-') for k in sorted(known)) or 'none'}")
        return self.Options(**given)

    def build(self, onnx_path: Path, board, out_dir: Path, options=None, events=None) -> "BuildResult":
        raise NotImplementedError

    def measure(self, build_dir: Path, board, **kw) -> dict:
        raise BitfoldError(f"the {self.name} backend cannot measure a build")

    def probe(self, board, full: bool = False, events=None, **kw) -> list:
        raise BitfoldError(f"the {self.name} backend has no cost-table measurement driver")

    def requirements(self) -> list[Requirement]:
        return []


@dataclass
class FpgaOptions:
    """Build options every FPGA backend has."""
    folding: object = None            # a folding JSON file; None: planned for the board's budget and rate
    verify: bool = True               # simulate / execute the design against the export
    bitstream: bool = True            # go on past synthesis (place & route, bitstream) where the tools exist
    target_fps: float | None = None   # inferences/s to fold for (0: as fast as the budget allows)


def backend_for(board) -> Backend:
    """The backend a board names, from the registry."""
    from bitfold.core.registry import get_backend
    return get_backend(board.backend)


def build(onnx_path: str | Path, board: str, out_dir: str | Path, options: dict | None = None, events=None,
          **option_kw) -> BuildResult:
    """Build ``onnx_path`` for ``board`` into ``out_dir`` with the board's backend.

    ``options``: the backend's options by name (see its ``Options``); keyword arguments are
    accepted as options too."""
    from bitfold.boards import load_board
    b = load_board(board)
    be = backend_for(b)
    opts = be.options({**(options or {}), **option_kw})
    return be.build(Path(onnx_path), b, Path(out_dir), opts, events)
