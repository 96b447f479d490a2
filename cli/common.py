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


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def warn(msg: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {msg}", soft_wrap=True)
