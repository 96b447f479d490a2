"""Options shared by several commands, the console, and small output helpers."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

#: Human output goes to stderr so that --json on stdout stays machine-readable.
console = Console(stderr=True, highlight=False)

Threads = Annotated[
    int | None,
    typer.Option("--threads", "-j", help="Worker threads (0 = one per core). Default: $HW_THREADS or 0.", min=0),
]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output manifest (.parquet), written atomically.")]
Json = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON report on stdout instead of tables.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace output files that already exist.")]


def progress(disable: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=disable or not console.is_terminal,
    )


class BarProgress:
    """Renders pycore's :class:`pycore.progress.Progress` calls as a rich progress bar on stderr
    (nothing when stderr is not a terminal or ``disable``)."""

    def __init__(self, disable: bool = False) -> None:
        self._bar = progress(disable)
        self._task = None
        self._unit = "items"
        self._started = 0.0
        self._done = 0

    def __enter__(self) -> BarProgress:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.__exit__(*exc)  # type: ignore[arg-type]

    def stage(self, name: str, total: int | None = None, unit: str = "items") -> None:
        import time

        if self._task is not None:
            self._bar.remove_task(self._task)
        self._task = self._bar.add_task(name, total=total, rate="")
        self._unit, self._started, self._done = unit, time.perf_counter(), 0

    def advance(self, n: int = 1) -> None:
        import time

        if self._task is None:
            self.stage("working")
        self._done += n
        rate = self._done / max(time.perf_counter() - self._started, 1e-9)
        self._bar.update(self._task, advance=n, rate=f"{rate:,.1f} {self._unit}/s")  # type: ignore[arg-type]


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def warn(msg: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {msg}", soft_wrap=True)
