"""The `hw` command: one Typer app, one module per command group, one error handler.

A command imports only what it uses: `hw bucket …` registers (imports) only cli.bucket; the
full list is registered for `hw --help` or a name that is not known here. Each command module
imports its heavy dependencies (polars, numpy, torch, rich tables) inside the command.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings

import importlib

import typer

from typer.core import TyperCommand

from cli.common import HwCommand, HwGroup
from pycore.errors import HwError, HwWarning

#: Command name → the cli module that registers it, in pipeline order (curate, caption, score and
#: train preference models, SPO training, LoRA tools).
COMMANDS = {
    "bucket": "cli.bucket", "dedup": "cli.dedup", "caption": "cli.caption",
    "spm-score": "cli.spm", "spm-train": "cli.spm", "spo-train": "cli.spo", "spo-sample": "cli.spo",
    "merge-lora": "cli.lora", "extract-lora": "cli.lora", "convert-lora": "cli.lora", "lora-info": "cli.lora",
}  # fmt: skip

app = typer.Typer(
    name="hw",
    help="Curate SDXL fine-tuning image sets and preference-tune SDXL. Run `hw COMMAND --help` for details.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    cls=HwGroup,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("hw")
        except PackageNotFoundError:
            v = "unknown (not installed)"
        typer.echo(f"hw {v}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print hw's version and exit.", callback=_version, is_eager=True),
) -> None:
    """Curate SDXL fine-tuning image sets and preference-tune SDXL."""


_registered: set[str] = set()


def register(argv: list[str] | None = None) -> typer.Typer:
    """Register the command modules ``argv`` needs and return the app to run.

    Without a known command name (`hw --help`, `hw`, a typo) every module is registered; without
    any command name (`hw`, `hw --help`, `hw --version`) no command can run, and the app returned
    lists the commands without building their options: building a command's options from its
    signature is most of the time `hw --help` would otherwise spend."""
    args = sys.argv[1:] if argv is None else argv
    name = next((a for a in args if not a.startswith("-")), None)
    wanted = [COMMANDS[name]] if name in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for module in wanted:
        if module not in _registered:
            importlib.import_module(module).register(app)
            _registered.add(module)
    for info in app.registered_commands:
        if info.cls in (None, TyperCommand):
            info.cls = HwCommand
    return _listing() if name is None else app


def _listing() -> typer.Typer:
    """A copy of the app whose commands have their name, help and panel but no options."""

    def _not_run() -> None:  # never called: without a command name no command runs
        raise HwError("internal error: a command listed for help was run")

    listing = copy.copy(app)
    listing.registered_commands = []
    for info in app.registered_commands:
        entry = copy.copy(info)
        entry.callback = _not_run
        listing.registered_commands.append(entry)
    return listing


def main(argv: list[str] | None = None) -> int:
    """Run the app; known errors become one line on stderr and exit code 1.

    Set HW_DEBUG=1 to see the traceback instead.
    """
    debug = os.environ.get("HW_DEBUG", "") not in ("", "0")
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            register(argv)(args=argv, prog_name="hw")
    except SystemExit as e:  # Typer's normal exit, usage errors (code 2) included
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        print("hw: interrupted", file=sys.stderr)
        return 130
    except (HwError, OSError) as e:
        if debug:
            raise
        print(f"hw: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 1)
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """pycore's HwWarnings print as one `warning:` line; other warnings as Python prints them."""
    if issubclass(category, HwWarning):
        from cli.common import warn

        warn(str(message))
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
