"""Progress reporting from library code: pycore functions call a :class:`Progress`; the CLI renders
it as a bar, notebooks and scripts pass their own (or nothing)."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """What long-running pycore functions report. Every method may be called from the thread that
    runs the work only (never from Rust worker threads)."""

    def stage(self, name: str, total: int | None = None, unit: str = "items") -> None:
        """A new stage begins (``total`` items, when known)."""

    def advance(self, n: int = 1) -> None:
        """``n`` more items of the current stage are done."""


class NoProgress:
    """Reports nothing (the default for Python callers)."""

    def stage(self, name: str, total: int | None = None, unit: str = "items") -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass


NO_PROGRESS = NoProgress()
