"""Raw hardware measurements, with provenance, in a SQLite database (WAL mode).

Several measuring processes may write at once: each insert is one short transaction, SQLite's
write-ahead log serialises them, and a busy database is waited for (``timeout``), never skipped.
Default location: ``$BITFOLD_HOME/measurements.sqlite`` (``~/.cache/bitfold`` by default).
"""
from __future__ import annotations

import datetime as _dt
import json
import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bitfold.core.errors import BitfoldError
from bitfold.core.paths import bitfold_home

SOURCES = ("measured", "estimated", "literature")
SCHEMA = """
CREATE TABLE IF NOT EXISTS measurements (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    board TEXT NOT NULL, device_id TEXT, kind TEXT NOT NULL,
    in_features INTEGER, out_features INTEGER, kernel INTEGER, spatial INTEGER,
    macs INTEGER NOT NULL, weights INTEGER NOT NULL,
    b_w INTEGER NOT NULL, b_a INTEGER NOT NULL, parallelism INTEGER NOT NULL DEFAULT 1,
    metric TEXT NOT NULL, value REAL NOT NULL, unit TEXT NOT NULL,
    source TEXT NOT NULL, tool TEXT NOT NULL, tool_version TEXT, date TEXT NOT NULL,
    extra TEXT
);
CREATE INDEX IF NOT EXISTS by_board ON measurements (board, metric, kind);
"""


@dataclass
class Measurement:
    board: str
    kind: str                      # "conv" | "linear" | "model"
    macs: int
    weights: int
    b_w: int
    b_a: int
    metric: str                    # "latency" | "lut" | "ff" | "bram" | "dsp" | "energy" | ...
    value: float
    unit: str
    source: str                    # measured | estimated | literature
    tool: str
    tool_version: str = ""
    device_id: str = ""
    in_features: int = 0
    out_features: int = 0
    kernel: int = 1
    spatial: int = 1
    parallelism: int = 1
    date: str = ""
    extra: dict = field(default_factory=dict)


class MeasurementStore:
    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else bitfold_home() / "measurements.sqlite"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as con:
                con.execute("PRAGMA journal_mode=WAL")
                con.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise BitfoldError(f"measurement database {self.path} cannot be opened ({e})",
                               "move the file away; a new one is created") from e

    def _connect(self):
        return sqlite3.connect(self.path, timeout=60, isolation_level=None)

    def add(self, rows: list[Measurement]) -> int:
        if not rows:
            return 0
        for r in rows:
            if r.source not in SOURCES:
                raise BitfoldError(f"measurement source {r.source!r} must be one of {', '.join(SOURCES)}")
            if not r.date:
                r.date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        cols = [f for f in asdict(rows[0])]
        sql = f"INSERT INTO measurements ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})"
        vals = [tuple(json.dumps(v) if k == "extra" else v for k, v in asdict(r).items()) for r in rows]
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            con.executemany(sql, vals)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        finally:
            con.close()
        return len(rows)

    def task_keys(self, board: str) -> set[str]:
        """Keys of the sweep tasks whose rows are recorded for ``board`` (``extra["task"]``): a
        resumed sweep skips them, so a block is recorded once however often the sweep runs."""
        return {r.extra["task"] for r in self.query(board) if r.extra.get("task")}

    def query(self, board: str, metric: str | None = None) -> list[Measurement]:
        con = self._connect()
        con.row_factory = sqlite3.Row
        try:
            q = "SELECT * FROM measurements WHERE board = ?" + (" AND metric = ?" if metric else "") + " ORDER BY id"
            rows = con.execute(q, (board, metric) if metric else (board,)).fetchall()
        finally:
            con.close()
        out = []
        for r in rows:
            d = dict(r)
            d.pop("id")
            d["extra"] = json.loads(d["extra"] or "{}")
            out.append(Measurement(**d))
        return out
