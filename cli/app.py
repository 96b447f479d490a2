"""The `hw` command: one Typer app, one module per command group, one error handler."""

from __future__ import annotations

import os
import sys
import warnings

import typer

from cli import bucket, caption, dedup, lora, spm, spo
from pycore.errors import HwError, HwWarning

app = typer.Typer(
    name="hw",
    help="Curate SDXL fine-tuning image sets and preference-tune SDXL. Run `hw COMMAND --help` for details.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


@app.callback()
def _root() -> None:
    """Curate SDXL fine-tuning image sets and preference-tune SDXL."""


# In pipeline order: curate, caption, score and train preference models, SPO training, LoRA tools.
bucket.register(app)
dedup.register(app)
caption.register(app)
spm.register(app)
spo.register(app)
lora.register(app)


def main(argv: list[str] | None = None) -> int:
    """Run the app; known errors become one line on stderr and exit code 1.

    Set HW_DEBUG=1 to see the traceback instead.
    """
    debug = os.environ.get("HW_DEBUG", "") not in ("", "0")
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            app(args=argv, prog_name="hw")
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
