"""One progress/event interface for every long-running step (build, probe, calibration, loop).

A step takes ``events: Events | None`` and reports through it:

* ``events.say(message)`` — a stage starts or a fact worth a line ("synthesizing", "note: ...");
* ``events.progress(done, total)`` — a count of work items (``total`` may be ``None``).

:data:`QUIET` drops everything. The CLI renders events with rich; a library user passes
``Events(say=print)`` or their own subclass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional


@dataclass
class Events:
    on_say: Optional[Callable[[str], None]] = None
    on_progress: Optional[Callable[[int, Optional[int]], None]] = None

    def say(self, message: str) -> None:
        if self.on_say is not None:
            self.on_say(message)

    def progress(self, done: int, total: int | None = None) -> None:
        if self.on_progress is not None:
            self.on_progress(done, total)


QUIET = Events()


def events_of(events: Events | None) -> Events:
    return QUIET if events is None else events
