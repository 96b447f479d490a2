"""Options shared by several commands, the console, and small output helpers."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from cli import fastparams

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

_console: Console | None = None


def __getattr__(name: str) -> Any:
    """``console`` (human output, on stderr so that --json on stdout stays machine-readable) is made
    on first use: importing rich costs start-up time that `hw --help` and fast commands skip."""
    if name == "console":
        global _console
        if _console is None:
            from rich.console import Console

            _console = Console(stderr=True, highlight=False)
        return _console
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

Threads = Annotated[
    int | None,
    typer.Option("--threads", "-j", help="Worker threads (0 = one per core). Default: $HW_THREADS or 0.", min=0),
]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output manifest: a .parquet file, or a folder of parts (a path ending in / or without a suffix); written atomically.")]
Json = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON report on stdout instead of tables.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace output files that already exist.")]


class _PlainHelp:
    """Help as users read it: `SRC` (not Typer's `{SRC}`) in the usage line, and no `<bool>` type
    next to on/off flags. Plain values are coerced without Pydantic (cli.fastparams)."""

    def get_params(self, ctx: Any) -> list:
        params = super().get_params(ctx)  # type: ignore[misc]
        fastparams.install(params)
        for p in params:
            if getattr(p, "is_flag", False) and p.metavar is None:
                p.metavar = ""
            elif getattr(p, "param_type_name", "") == "argument" and p.metavar is None and p.name:
                p.metavar = p.name.upper()  # MANIFEST, not `manifest` or `{manifest}`
        return params

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = super().collect_usage_pieces(ctx)  # type: ignore[misc]
        return [re.sub(r"^\{(.*)\}(\.\.\.)?$", r"\1\2", x) for x in pieces]


class HwCommand(_PlainHelp, TyperCommand):
    """The click command class of every `hw` command (cli.app sets it)."""


class HwGroup(_PlainHelp, TyperGroup):
    """The click group class of the `hw` app."""


def progress(disable: bool = False) -> Progress:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = __getattr__("console")
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
    __getattr__("console").print(f"[yellow]warning:[/yellow] {msg}", soft_wrap=True)
