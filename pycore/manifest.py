"""The manifest: one Parquet row per image file, the spine every curation command reads and writes.

The schema (columns, types, meaning) is documented in data_manifests/manifest_schema.md and
declared here in :data:`COLUMNS`; :func:`read_manifest` checks a file against it and
:func:`write_manifest` writes atomically. Commands add columns and never drop rows.

Paths: ``path`` is the file's path as UTF-8 text. A file name that is not valid UTF-8 cannot be
stored losslessly in a Parquet string, so for those rows ``path`` holds a readable version (invalid
bytes replaced by U+FFFD) and ``path_bytes`` holds the exact bytes; :func:`fs_paths` gives back
the real path for every row.

Carrying forward: every command reads a :class:`Manifest` (frame + metadata), computes its
columns, and writes ``manifest.derive(frame, command, updates)``: the rows are checked to be the
same, every earlier column is checked to be kept, and the earlier metadata is merged with this
command's keys (and the command appended to ``history``), so nothing an earlier step recorded is
lost.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from pycore import _rust
from pycore.errors import ManifestError, first_line
from pycore.io import atomic_path
from pycore.manifest_meta import SCHEMA_VERSION, display_path, first, footer  # noqa: F401 (re-exported)

#: Every column hw knows, with its Polars type. Unknown extra columns are kept as they are.
COLUMNS: dict[str, pl.DataType] = {
    "path": pl.String(),
    "path_bytes": pl.Binary(),
    "status": pl.String(),
    "error": pl.String(),
    "warning": pl.String(),
    "format": pl.String(),
    "width": pl.Int32(),
    "height": pl.Int32(),
    "orientation": pl.UInt8(),
    "file_size": pl.Int64(),
    "mtime": pl.Float64(),
    "content_hash": pl.String(),
    # images in tar shards / Parquet tables (pycore.sources)
    "member_offset": pl.Int64(),
    "source_caption": pl.String(),
    "source_json": pl.String(),
    "bucket_width": pl.Int32(),
    "bucket_height": pl.Int32(),
    "scale": pl.Float64(),
    "scaled_width": pl.Int32(),
    "scaled_height": pl.Int32(),
    "crop_left": pl.Int32(),
    "crop_top": pl.Int32(),
    "crop_fraction": pl.Float64(),
    "upscaled": pl.Boolean(),
    "crop_flagged": pl.Boolean(),
    # hw dedup
    "phash": pl.String(),
    "dhash": pl.String(),
    "dup_group": pl.Int64(),
    "dup_distance": pl.Int32(),
    "dup_max_distance": pl.Int32(),
    "dup_exact": pl.Boolean(),
    "keep": pl.Boolean(),
    "dup_similarity": pl.Float32(),
    "dup_moved_to": pl.String(),
    # hw caption
    "caption": pl.String(),
    "summary": pl.String(),
    "elements": pl.List(pl.String()),
    "inspired_by": pl.String(),
    "quality": pl.String(),
    "caption_status": pl.String(),
    "caption_error": pl.String(),
    "caption_tokens": pl.Int32(),
    "caption_too_long": pl.Boolean(),
    "caption_model": pl.String(),
    "aesthetic": pl.Float64(),
}

#: Columns every manifest must have.
REQUIRED = ("path", "status")

#: Every image status, in code order (a ``status_code`` array from Rust indexes it). The one
#: vocabulary is the Rust enum ``Status`` (rust_ext/src/status.rs); this is its export.
STATUSES: tuple[str, ...] = tuple(_rust.STATUSES)

#: Statuses set by bucketing (re-evaluated when a manifest is re-bucketed); all others come from
#: reading the file (or from hw dedup) and are kept.
BUCKET_STATUSES: tuple[str, ...] = tuple(_rust.BUCKET_STATUSES)

#: Statuses whose file has nothing to decode (for commands that open the pixels).
UNREADABLE_STATUSES: tuple[str, ...] = tuple(s for s in STATUSES if s not in ("ok", *BUCKET_STATUSES, "duplicate_moved"))


def status_code(name: str) -> int:
    """The code of a status name; an unknown name is a :class:`ManifestError` (never a default)."""
    try:
        return STATUSES.index(name)
    except ValueError:
        raise ManifestError(f"unknown image status {name!r} (known: {', '.join(STATUSES)})") from None


def status_names(codes: Any, name: str = "status") -> pl.Series:
    """A ``status`` column from an array of Rust status codes."""
    return pl.Series(name, STATUSES, dtype=pl.String).gather(pl.Series(codes).cast(pl.UInt32))


def unknown_statuses(frame: pl.DataFrame) -> list[str]:
    """Status values of ``frame`` that are not in the vocabulary."""
    return sorted(set(frame["status"].unique().drop_nulls().to_list()) - set(STATUSES))


def path_bytes_or_none(p: str) -> bytes | None:
    """The raw bytes of a path when they are not valid UTF-8, else None."""
    raw = os.fsencode(p)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw
    return None


def path_columns(paths: Sequence[str]) -> list[pl.Series]:
    """``path`` and ``path_bytes`` columns for file-system paths (str, surrogate-escaped)."""
    return [
        pl.Series("path", [display_path(p) for p in paths], dtype=pl.String),
        pl.Series("path_bytes", [path_bytes_or_none(p) for p in paths], dtype=pl.Binary),
    ]


def fs_paths(frame: pl.DataFrame) -> list[str]:
    """The exact file-system path of every row (surrogate-escaped str, usable with open())."""
    paths = frame["path"].to_list()
    if "path_bytes" not in frame.columns:
        return paths
    raw = frame["path_bytes"].to_list()
    return [os.fsdecode(b) if b is not None else p for p, b in zip(paths, raw, strict=True)]


def missing_columns(frame: pl.DataFrame, required: Iterable[str]) -> list[str]:
    return [c for c in required if c not in frame.columns]


def validate(frame: pl.DataFrame, required: Iterable[str] = REQUIRED, source: str = "manifest") -> pl.DataFrame:
    """Check required columns and known columns' types; cast compatible types; return the frame."""
    missing = missing_columns(frame, required)
    if missing:
        raise ManifestError(f"{source} is missing required column(s): {', '.join(missing)}")
    casts = []
    for name, dtype in COLUMNS.items():
        if name not in frame.columns or frame.schema[name] == dtype:
            continue
        have = frame.schema[name]
        numeric_ok = have.is_numeric() and dtype.is_numeric()
        if not (numeric_ok or have == pl.Null):
            raise ManifestError(f"{source}: column {name!r} has type {have}, expected {dtype}")
        casts.append(pl.col(name).cast(dtype, strict=True))
    if casts:
        try:
            frame = frame.with_columns(casts)
        except pl.exceptions.PolarsError as e:
            raise ManifestError(f"{source}: a column does not fit its type: {e}") from None
    if frame["path"].null_count():
        raise ManifestError(f"{source}: column 'path' has {frame['path'].null_count()} empty value(s)")
    if frame["status"].null_count():
        raise ManifestError(f"{source}: column 'status' has {frame['status'].null_count()} empty value(s)")
    return frame


def read_manifest(path: str | os.PathLike[str], required: Iterable[str] = REQUIRED) -> pl.DataFrame:
    """Read and validate a manifest: a Parquet file or a folder of parts
    (:mod:`pycore.manifest_parts`). Errors are one-line :class:`ManifestError`s."""
    p = Path(path)
    if p.is_dir():
        from pycore.manifest_parts import read_parts

        return validate(read_parts(p), required, source=f"manifest {p}")
    if not p.is_file():
        raise ManifestError(f"manifest {p} does not exist")
    try:
        frame = pl.read_parquet(p)
    except (pl.exceptions.PolarsError, OSError) as e:
        raise ManifestError(f"cannot read manifest {p}: {first_line(e)}") from None
    return validate(frame, required, source=f"manifest {p}")


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """hw's key/value metadata stored in a manifest's Parquet footer (keys without 'hw.'); for a
    folder of parts, the first part's (every part carries the same)."""
    if os.path.isdir(path):
        from pycore.manifest_parts import first_part

        try:
            path = first_part(path)
        except ManifestError:
            return {}
    try:
        meta = pl.read_parquet_metadata(path)
    except (pl.exceptions.PolarsError, OSError):
        return {}
    return {k[3:]: v for k, v in meta.items() if k.startswith("hw.") and k != "hw.part"}


def prepare_write(frame: pl.DataFrame, metadata: Mapping[str, object] | None) -> tuple[pl.DataFrame, dict[str, str]]:
    """The frame as written (validated, known columns first) and its ``hw.*`` footer metadata."""
    frame = validate(frame)
    unknown = unknown_statuses(frame)
    if unknown:
        raise ManifestError(f"status value(s) {', '.join(map(repr, unknown))} are not image statuses "
                            f"(known: {', '.join(STATUSES)})")  # fmt: skip
    known = [c for c in COLUMNS if c in frame.columns]
    frame = frame.select(known + [c for c in frame.columns if c not in COLUMNS])
    return frame, footer(metadata)


def write_manifest(
    frame: pl.DataFrame,
    path: str | os.PathLike[str],
    *,
    metadata: dict[str, object] | None = None,
    overwrite: bool = False,
    part_rows: int | None = None,
) -> None:
    """Validate and write atomically; known columns come first in schema order. hw never writes a
    status outside :data:`STATUSES`. A ``path`` ending with ``/``, an existing folder or a path
    without a suffix is written as a folder of parts (:mod:`pycore.manifest_parts`) of
    ``part_rows`` rows."""
    frame, meta = prepare_write(frame, metadata)
    from pycore.manifest_parts import wants_parts, write_parts

    if wants_parts(path):
        write_parts(frame, path, meta, overwrite=overwrite, part_rows=part_rows)
        return
    with atomic_path(path, overwrite=overwrite) as tmp:
        frame.write_parquet(tmp, metadata=meta)


@dataclass
class Manifest:
    """A manifest table with hw's metadata (``hw.*`` keys of the Parquet footer, prefix removed;
    values are strings, JSON text for anything else)."""

    frame: pl.DataFrame
    meta: dict[str, str] = field(default_factory=dict)
    source: Path | None = None

    @classmethod
    def parts(cls, path: str | os.PathLike[str], required: Iterable[str] = REQUIRED) -> Iterator[Manifest]:
        """A manifest folder one part at a time (each a :class:`Manifest` with the folder's
        metadata), for commands that stream instead of holding every row; a file is one part."""
        meta = {k: v for k, v in read_metadata(path).items() if k != "schema_version"}
        if not os.path.isdir(path):
            yield cls.read(path, required)
            return
        from pycore.manifest_parts import iter_parts

        for f, frame in iter_parts(path):
            yield cls(validate(frame, required, source=f"manifest part {f}"), dict(meta), Path(path))

    @classmethod
    def read(cls, path: str | os.PathLike[str], required: Iterable[str] = REQUIRED) -> Manifest:
        frame = read_manifest(path, required)
        meta = {k: v for k, v in read_metadata(path).items() if k != "schema_version"}
        return cls(frame, meta, Path(path))

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value, decoded from JSON where it is JSON (plain strings as they are)."""
        if key not in self.meta:
            return default
        v = self.meta[key]
        try:
            return json.loads(v)
        except (ValueError, TypeError):
            return v

    @property
    def history(self) -> list[str]:
        h = self.get("history", [])
        return list(h) if isinstance(h, list) else []

    def derive(self, frame: pl.DataFrame, command: str, updates: Mapping[str, object] | None = None) -> Manifest:
        """The next manifest: ``frame`` must hold the same rows (any order) and every column this
        one has; metadata is this one's with ``updates`` merged over it and ``command`` appended
        to ``history``."""
        if len(frame) != len(self.frame):
            raise ManifestError(f"{command}: would write {len(frame):,} rows for a manifest of {len(self.frame):,}; "
                                "commands never drop or add rows")  # fmt: skip
        dropped = [c for c in self.frame.columns if c not in frame.columns]
        if dropped:
            raise ManifestError(f"{command}: would drop column(s) {', '.join(dropped)} of the input manifest")
        if not frame["path"].equals(self.frame["path"]) and not frame["path"].sort().equals(self.frame["path"].sort()):
            raise ManifestError(f"{command}: the rows' paths differ from the input manifest's")
        meta = dict(self.meta)
        for k, v in (updates or {}).items():
            meta[k] = v if isinstance(v, str) else json.dumps(v, default=str)
        meta["history"] = json.dumps([*self.history, command])
        return Manifest(frame, meta, None)

    def write(self, path: str | os.PathLike[str], *, overwrite: bool = False, part_rows: int | None = None) -> None:
        """Validate and write atomically, as one file or a folder of parts (see :func:`write_manifest`)."""
        write_manifest(self.frame, path, metadata=self.meta, overwrite=overwrite, part_rows=part_rows)


def new_manifest(frame: pl.DataFrame, command: str, meta: Mapping[str, object]) -> Manifest:
    """The first manifest of a chain (``hw bucket`` on a folder): ``history`` starts with ``command``."""
    return Manifest(frame, first(command, meta), None)
