"""Exceptions the CLI turns into one-line messages (exit code 1)."""

from __future__ import annotations


class HwError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ManifestError(HwError):
    """A manifest file that is missing, unreadable or does not match the schema."""


class TableError(HwError):
    """A bucket table that cannot be loaded or is malformed."""
