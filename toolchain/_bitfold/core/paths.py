"""Where bitfold keeps its state: ``$BITFOLD_HOME`` (default ``~/.cache/bitfold``) holds the
measurement database, refitted cost tables, tuning databases, the FINN environment and the arm64
sysroot."""
from __future__ import annotations

import os
from pathlib import Path


def bitfold_home() -> Path:
    return Path(os.environ.get("BITFOLD_HOME", Path.home() / ".cache" / "bitfold"))
