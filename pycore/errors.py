"""Exceptions and warnings the CLI turns into one-line messages.

- :class:`HwError`: a problem with the user's input or environment → ``hw: error: …``, exit 1.
- :class:`NothingDone`: the run finished but did none of the work asked for (empty input,
  0 images captioned, 0 pairs trained, 0 files moved) → ``hw: error: …``, exit 3.
- :class:`HwWarning`: something the user should know; library code emits it with
  ``warnings.warn(msg, HwWarning)`` and the CLI prints ``warning: …`` (Python callers see an
  ordinary warning they can filter).
"""

from __future__ import annotations


class HwError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    #: The CLI's exit code for this error.
    exit_code = 1


class NothingDone(HwError):
    """The command ran but did nothing the user asked for; the message says why."""

    exit_code = 3


class ManifestError(HwError):
    """A manifest file that is missing, unreadable or does not match the schema."""


class TableError(HwError):
    """A bucket table that cannot be loaded or is malformed."""


class HwWarning(UserWarning):
    """A warning meant for the user (the CLI prints it as one line)."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (its type name when it has none)."""
    s = str(e).strip()
    line = s.splitlines()[0] if s else type(e).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"
