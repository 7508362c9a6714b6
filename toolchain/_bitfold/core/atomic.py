"""Atomic file output: write to a temporary file in the same directory, then rename.

An existing artefact is either left untouched or replaced by a complete new one; a crash or
an error in between never leaves a half-written file under the final name.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from bitfold.core.errors import BitfoldError


def ensure_writable_dir(path: Path) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (OSError, FileExistsError) as e:
        raise BitfoldError(f"cannot create output directory {path}: {e.strerror}",
                           "choose a writable location with -o/--out") from e
    if not os.access(path, os.W_OK):
        raise BitfoldError(f"output directory {path} is not writable",
                           "choose a writable location with -o/--out")
    return path


@contextlib.contextmanager
def atomic_path(final: Path | str, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it onto ``final`` on success.

    On any exception the temporary file is removed and ``final`` is untouched.
    """
    final = Path(final)
    ensure_writable_dir(final.parent if str(final.parent) else Path("."))
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix + ".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; give the final file normal permissions
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, final)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if isinstance(e, OSError) and not isinstance(e, BitfoldError):
            raise BitfoldError(f"writing {final} failed: {e.strerror or e}",
                               "free disk space or choose a writable location; the previous file is untouched") from e
        raise


def write_text(final: Path | str, text: str) -> Path:
    with atomic_path(final) as tmp:
        tmp.write_text(text)
    return Path(final)


def write_json(final: Path | str, obj) -> Path:
    return write_text(final, json.dumps(obj, indent=2, sort_keys=False) + "\n")
