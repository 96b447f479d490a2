"""Where hw's bundled data files (bucket tables, tag lists, schema docs) live."""

from __future__ import annotations

from pathlib import Path

from pycore.errors import HwError

DATA_DIR = Path(__file__).resolve().parent.parent / "data_manifests"


def data_path(*parts: str) -> Path:
    """Path of a bundled data file; a clear error if the install lacks it."""
    p = DATA_DIR.joinpath(*parts)
    if not p.exists():
        raise HwError(f"bundled data file {p} is missing (hw runs from its source checkout; reinstall with `make setup`)")
    return p
