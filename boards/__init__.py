"""Board descriptions: one TOML file per board, shipped as package data.

``load_board("pynq-z2")`` reads the packaged file; ``load_board("path/to/my.toml")`` reads a
user's file. Every field is type-checked; an unknown board or a bad field gives one
:class:`~bitfold.core.errors.BitfoldError` naming the known boards / the field.
"""
from __future__ import annotations

import os
import platform
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from bitfold.core.errors import BitfoldError

KINDS = ("fpga", "cpu")

# field -> (type(s), required for kind)
_COMMON = {"name": (str, KINDS), "description": (str, KINDS), "kind": (str, KINDS), "backend": (str, KINDS),
           "clock_mhz": ((int, float), ("fpga",))}
_FPGA = {"vendor": (str, ("fpga",)), "family": (str, ("fpga",)), "part": (str, ("fpga",)),
         "resources": (dict, ("fpga",)), "finn_board": (str, ()), "device": (str, ()), "package": (str, ()),
         "speed": (int, ()), "pins": (dict, ()), "pll_mhz": ((int, float), ())}
_CPU = {"triple": (str, ("cpu",)), "cpu": (str, ("cpu",)), "cores": (int, ("cpu",)), "mattr": (list, ()),
        "rpc_key": (str, ())}
_FIELDS = {**_COMMON, **_FPGA, **_CPU}


@dataclass(frozen=True)
class Board:
    name: str
    description: str
    kind: str
    backend: str
    clock_mhz: float | None = None
    vendor: str | None = None
    family: str | None = None
    part: str | None = None
    device: str | None = None
    package: str | None = None
    speed: int | None = None
    finn_board: str | None = None
    resources: dict = field(default_factory=dict)
    pins: dict = field(default_factory=dict)     # FPGA: clk / rx / tx package pins of the board's oscillator and UART
    triple: str | None = None
    cpu: str | None = None
    cores: int | None = None
    mattr: tuple = ()
    rpc_key: str | None = None
    pll_mhz: float | None = None   # open flow: the design clock a PLL makes from the oscillator (None: the oscillator)
    source: str = ""

    @property
    def design_mhz(self) -> float | None:
        """The clock the design is planned for: the PLL's where the board has one, else the oscillator's."""
        return self.pll_mhz or self.clock_mhz


def _board_files() -> dict[str, Path]:
    root = resources.files(__name__)
    return {p.name[:-5]: Path(str(p)) for p in root.iterdir() if p.name.endswith(".toml")}


def known_boards() -> list[str]:
    return sorted(_board_files())


def _detect_host(data: dict) -> dict:
    machine = platform.machine().lower()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    data = dict(data)
    data["triple"] = f"{arch}-linux-gnu" if platform.system() == "Linux" else f"{arch}-unknown-{platform.system().lower()}"
    data["cpu"] = "native" if arch in ("x86_64", "aarch64") else "generic"
    data["cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return data


def validate_board(data: dict, source: str) -> Board:
    def bad(msg):
        return BitfoldError(f"board file {source}: {msg}", "fix the field (see README, 'Boards')")
    if not isinstance(data, dict):
        raise bad("is not a TOML table")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise bad(f"unknown field(s) {', '.join(unknown)}")
    kind = data.get("kind")
    if kind not in KINDS:
        raise bad(f"field 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    for key, (types, required_for) in _FIELDS.items():
        if key not in data:
            if kind in required_for:
                raise bad(f"missing required field '{key}'")
            continue
        val = data[key]
        if isinstance(val, bool) or not isinstance(val, types):
            tname = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
            raise bad(f"field '{key}' must be {tname}, got {type(val).__name__} {val!r}")
    # names become file names (cost tables, tuning databases) and RPC keys / triples go to tools as
    # arguments: only plain identifiers, never paths or shell syntax
    import re
    for key in ("name", "rpc_key", "finn_board", "part", "triple", "cpu"):
        if key in data and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}", data[key]) or \
                key in data and ".." in data[key]:
            raise bad(f"field '{key}' must be a plain identifier (letters, digits, . _ + -), got {data[key]!r}")
    from bitfold.core.registry import backend_names
    if data["backend"] not in backend_names():
        raise bad(f"field 'backend' must name a registered backend ({', '.join(backend_names())}), "
                  f"got {data['backend']!r}")
    for pk, pv in data.get("pins", {}).items():
        if pk not in ("clk", "rx", "tx") or not isinstance(pv, str) or not re.fullmatch(r"[A-Za-z0-9]{1,8}", pv):
            raise bad(f"field 'pins.{pk}' must be one of clk/rx/tx naming a package pin, got {pv!r}")
    for rk, rv in data.get("resources", {}).items():
        if isinstance(rv, bool) or not isinstance(rv, int) or rv < 0:
            raise bad(f"field 'resources.{rk}' must be a non-negative integer, got {rv!r}")
    if kind == "fpga" and "lut" not in data["resources"]:
        raise bad("missing required field 'resources.lut'")
    for key in ("clock_mhz", "pll_mhz"):
        if key in data and data[key] <= 0:
            raise bad(f"field '{key}' must be positive")
    if data.get("triple") == "detect":
        data = _detect_host(data)
    kw = dict(data)
    if "mattr" in kw:
        kw["mattr"] = tuple(kw["mattr"])
    for key in ("clock_mhz", "pll_mhz"):
        if key in kw:
            kw[key] = float(kw[key])
    return Board(**kw, source=source)


def load_board(name_or_path: str | Path) -> Board:
    """Load a packaged board by name, or a board TOML file by path."""
    files = _board_files()
    p = Path(name_or_path)
    if str(name_or_path) in files:
        p = files[str(name_or_path)]
    elif not (p.suffix == ".toml" and p.is_file()):
        raise BitfoldError(f"unknown board {str(name_or_path)!r}",
                           f"known boards: {', '.join(sorted(files))} (or pass a path to a board .toml file)")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BitfoldError(f"board file {p} is not valid TOML ({e})") from e
    return validate_board(data, str(p))
