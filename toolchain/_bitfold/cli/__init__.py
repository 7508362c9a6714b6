"""The ``bitfold`` command line: one module per command group, each command only parses its flags,
calls the documented Python API and renders the result (:mod:`bitfold.cli.render`).

* :mod:`.train_cmds` — train, export, eval, select, allocate, fewshot
* :mod:`.build_cmds` — build, inspect, boards, setup, run-fpga, measure, rpc-server
* :mod:`.hw_cmds`    — calibrate, costs, hw measure|fit|show
* :mod:`.loop_cmds`  — run, sweep, report, demo, doctor
"""
from __future__ import annotations

import os
import sys
import warnings

import typer

from bitfold.cli import build_cmds, hw_cmds, loop_cmds, train_cmds
from bitfold.cli.render import err
from bitfold.core.errors import BitfoldError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="bitfold: hardware-aware quantization-aware training and deployment.")
for group in (train_cmds, build_cmds, hw_cmds, loop_cmds):
    group.register(app)


def main(argv=None):
    warnings.filterwarnings("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    try:
        app(args=argv, standalone_mode=False)
    except BitfoldError as e:
        err.print(f"[bold red]error:[/] {e.message}", highlight=False)
        if e.hint:
            err.print(f"[yellow]  what to do:[/] {e.hint}", highlight=False)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as e:  # usage errors: click's, or typer's own copy of click (typer >= 0.29)
        if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(e.exit_code)
        if type(e).__name__ == "Exit" and isinstance(getattr(e, "exit_code", None), int):
            sys.exit(e.exit_code)
        if type(e).__name__ == "Abort":
            sys.exit(1)
        raise
