"""The `hw` command: one Typer app, one module per command group, one error handler.

A command imports only what it uses: `hw bucket …` registers (imports) only cli.bucket; the
full list is registered for `hw --help` or a name that is not known here. Each command module
imports its heavy dependencies (polars, numpy, torch, rich tables) inside the command.
"""

from __future__ import annotations

import copy
import importlib
import os
import re
import sys
import warnings
from typing import Any

import typer

from typer.core import TyperCommand

from cli.common import HwCommand, HwGroup
from pycore.errors import HwError, HwWarning, first_line

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


def _command_name(args: list[str]) -> str | None:
    """The command ``args`` name (the first word, when it is one of hw's commands)."""
    name = next((a for a in args if not a.startswith("-")), None)
    return name if name in COMMANDS else None


def register(argv: list[str] | None = None) -> typer.Typer:
    """Register the command modules ``argv`` needs and return the app to run.

    Without a known command name (`hw --help`, `hw`, a typo) every module is registered; without
    any command name (`hw`, `hw --help`, `hw --version`) no command can run, and the app returned
    lists the commands without building their options: building a command's options from its
    signature is most of the time `hw --help` would otherwise spend."""
    args = sys.argv[1:] if argv is None else argv
    name = _command_name(args)
    wanted = [COMMANDS[name]] if name else list(dict.fromkeys(COMMANDS.values()))
    done: set[str] = app.__dict__.setdefault("_hw_modules", set())  # per app object (tests swap it)
    for module in wanted:
        if module not in done:
            importlib.import_module(module).register(app)
            done.add(module)
    for info in app.registered_commands:
        if info.cls in (None, TyperCommand):
            info.cls = HwCommand
    return _listing() if all(a.startswith("-") for a in args) else app


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
    """Run the app and return its exit code: 0 done, 1 error, 2 usage error, 3 nothing done,
    130 interrupted. Every failure is one line on stderr (``hw: error: …``, ``hw: interrupted``).

    Typer/click's own error handling (usage boxes, "Aborted!") is bypassed: the command runs
    in a context made here, so usage errors, Ctrl-C and pycore's errors all reach this handler.
    Set HW_DEBUG=1 to see the traceback of an error instead.
    """
    debug = os.environ.get("HW_DEBUG", "") not in ("", "0")
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            command = typer.main.get_command(register(args))
            with command.make_context("hw", args) as ctx:
                command.invoke(ctx)
    except typer.Exit as e:  # --help, --version, ctx.exit()
        return e.exit_code
    except KeyboardInterrupt:
        return _interrupted()
    except typer.Abort:  # a prompt's Ctrl-C/EOF (and click.Abort raised by a command)
        return _interrupted()
    except typer.TyperException as e:  # click's UsageError family (exit 2) and ClickException
        if type(e).__name__ == "NoArgsIsHelpError":  # `hw CMD` alone: its help was printed
            return 2
        print(f"hw: error: {usage_message(e, _command_name(args))}", file=sys.stderr)
        return getattr(e, "exit_code", 1)
    except (HwError, OSError) as e:
        if debug:
            raise
        if isinstance(e, BrokenPipeError):  # `hw … --json | head`: the reader went away
            return _broken_pipe()
        print(f"hw: error: {first_line(e, 2000)}", file=sys.stderr)  # one line even if a library's message is not
        return getattr(e, "exit_code", 1)
    return 0


def _interrupted() -> int:
    """Ctrl-C: one line, exit 130 (outputs are atomic, so nothing partial was left behind)."""
    import signal

    try:  # a second Ctrl-C while the line is written must not break it (main thread only)
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:
        previous = None
    try:
        print("hw: interrupted", file=sys.stderr, flush=True)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return 130


def _broken_pipe() -> int:
    """The reader of stdout went away: exit 1 quietly (as Typer does)."""
    try:  # so that Python's flush of stdout at exit does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is not a file (captured, in-process)
        pass
    return 1


#: pydantic's error type (Typer validates option values with it) → what went wrong, in our words.
_VALUE_PROBLEMS = {
    "int_parsing": "expected a whole number", "int_type": "expected a whole number",
    "int_from_float": "expected a whole number", "float_parsing": "expected a number",
    "float_type": "expected a number", "bool_parsing": "expected true or false",
    "finite_number": "expected a finite number",
}  # fmt: skip
_BOUNDS = {"greater_than_equal": ("ge", "≥"), "greater_than": ("gt", ">"), "less_than_equal": ("le", "≤"), "less_than": ("lt", "<")}


def usage_message(e: Exception, command: str | None = None) -> str:
    """One line for a click/Typer usage error: ``<option>: <what is wrong> (see hw CMD --help)``
    (``command``: the command the arguments named, for errors the parser raises without one)."""
    param = getattr(e, "param", None)
    hint = getattr(e, "param_hint", None)
    name = hint if isinstance(hint, str) else _param_name(param) if param is not None else getattr(e, "option_name", None)
    kind = type(e).__name__
    if kind == "MissingParameter":
        what = "required, not given"
    elif kind == "NoSuchOption":
        options = _close_options(name or "", getattr(e, "ctx", None))
        what = "no such option" + (f" (did you mean {' or '.join(options)}?)" if options else "")
    elif kind == "BadParameter":
        what = _value_problem(e)
    else:
        what = _sentence(getattr(e, "message", "") or str(e))
        if name is not None:
            what = re.sub(rf"^option '{re.escape(name)}' ", "", what)
            what = "needs a value" if what == "requires an argument" else what
    ctx = getattr(e, "ctx", None)
    path = ctx.command_path if ctx is not None else f"hw {command}" if command else "hw"
    hint = f" (see {path} --help)"
    return f"{name}: {what}{hint}" if name else f"{what}{hint}"


def _close_options(typed: str, ctx: Any) -> list[str]:
    """The command's long options that ``typed`` is a prefix or a near miss of (click's own
    suggestions count the shared ``--`` and offer ``--out`` for ``--wat``)."""
    if ctx is None or not typed.startswith("--") or len(typed) < 4:
        return []
    import difflib

    names = sorted({o for p in ctx.command.params for o in getattr(p, "opts", []) + getattr(p, "secondary_opts", []) if o.startswith("--")})
    stem = typed[2:].split("=", 1)[0]
    near = difflib.get_close_matches(stem, [o[2:] for o in names], n=3, cutoff=0.75)
    prefixed = [o[2:] for o in names if o[2:].startswith(stem)] if len(stem) >= 3 else []
    return ["--" + o for o in dict.fromkeys(near + prefixed)][:3]


def _param_name(param: Any) -> str:
    """``--threads`` for an option (its first long name), ``SRC`` for an argument."""
    opts = list(getattr(param, "opts", []) or [])
    if getattr(param, "param_type_name", "") == "argument" or not opts:
        return (param.metavar or param.name or "argument").upper()
    return next((o for o in opts if o.startswith("--")), opts[0])


def _value_problem(e: Exception) -> str:
    """What is wrong with a value Typer rejected, with the value (pydantic's error is the cause)."""
    errors = getattr(e.__cause__, "errors", None)
    err = errors()[0] if callable(errors) and errors() else None
    if err is None:
        return _sentence(getattr(e, "message", "") or str(e))
    got = err.get("input")
    got_s = f", got {got!r}" if isinstance(got, str) else ""
    kind, bound = err.get("type", ""), err.get("ctx") or {}
    if kind in _VALUE_PROBLEMS:
        return _VALUE_PROBLEMS[kind] + got_s
    if kind in _BOUNDS:
        key, sign = _BOUNDS[kind]
        return f"must be {sign} {bound.get(key)}{got_s}"
    msg = _sentence(str(err.get("msg", "")).removeprefix("Value error, "))
    return msg if got is None or repr(got) in msg else msg + got_s


def _sentence(msg: str) -> str:
    """A click/pydantic message as a clause: first letter lower-case, no final full stop."""
    msg = " ".join(msg.split()).rstrip(".")
    return msg[:1].lower() + msg[1:] if msg[:2] != msg[:2].upper() else msg


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
