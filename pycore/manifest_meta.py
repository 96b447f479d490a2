"""The parts of the manifest that need no dataframe library (pycore.manifest imports Polars):
the footer metadata and the display text of a path.

hw's keys are stored as ``hw.<key>`` in the Parquet footer; values are strings, JSON text for
anything else. ``hw bucket DIR`` writes its manifest from Rust (:class:`pycore._rust.BucketRows`)
with exactly the footer :func:`pycore.manifest.write_manifest` writes, both from these functions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

SCHEMA_VERSION = "1"


def encode(meta: Mapping[str, object]) -> dict[str, str]:
    """Metadata values as stored: strings as they are, anything else as JSON."""
    return {k: (v if isinstance(v, str) else json.dumps(v, default=str)) for k, v in meta.items()}


def first(command: str, meta: Mapping[str, object]) -> dict[str, str]:
    """The metadata of the first manifest of a chain: ``history`` starts with ``command``."""
    out = encode(meta)
    out["history"] = json.dumps([command])
    return out


def footer(meta: Mapping[str, object] | None) -> dict[str, str]:
    """The Parquet footer's key/value pairs for hw's metadata (schema version first)."""
    out = {"hw.schema_version": SCHEMA_VERSION}
    for k, v in (meta or {}).items():
        out[f"hw.{k}"] = v if isinstance(v, str) else json.dumps(v)
    return out


def display_path(p: str) -> str:
    """UTF-8 text for a file-system path (invalid bytes become U+FFFD)."""
    return os.fsencode(p).decode("utf-8", errors="replace")
