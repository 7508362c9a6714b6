"""One exception type for every user-facing failure.

A :class:`BitfoldError` carries what went wrong and what to do about it; the CLI prints it as
one line (no traceback) and exits with status 2. Library code raises it at the boundary where
bad input is detected, never deep inside a dependency.
"""
from __future__ import annotations


class BitfoldError(Exception):
    """A user-facing error: ``message`` says what is wrong, ``hint`` what to do."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message} -> {hint}")


class ToolMissingError(BitfoldError):
    """An external tool (Vivado, yosys, a FINN environment, ...) is not available."""

    exit_code = 3
