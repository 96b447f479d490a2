"""Scanning a folder of images into a manifest frame (the work is done in Rust).

:func:`scan_folder` gives a Polars frame; :func:`scan_folder_rows` keeps the rows in Rust
(:class:`pycore._rust.BucketRows`) for ``hw bucket DIR``, which then needs neither Polars nor
NumPy. Both walk and probe with the same Rust code.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pycore import _rust
from pycore.errors import HwError
from pycore.limits import MAX_PIXELS
from pycore.manifest_meta import display_path

if TYPE_CHECKING:
    import numpy as np
    import polars as pl

#: File extensions treated as images (case-insensitive). The format itself is always read from
#: the file's bytes; the extension only decides which files are looked at.
IMAGE_EXTENSIONS = (
    "jpg", "jpeg", "jpe", "jfif", "png", "apng", "webp", "gif", "bmp", "dib",
    "tif", "tiff", "avif", "heic", "heif", "jxl",
)  # fmt: skip

#: Larger declared sizes get status "too_large" (see pycore.limits.MAX_PIXELS).
DEFAULT_MAX_PIXELS = MAX_PIXELS


@dataclass
class ScanResult:
    frame: pl.DataFrame
    root: str
    #: Files that are not images by extension, counted by extension ("" = none).
    skipped: dict[str, int] = field(default_factory=dict)
    #: Folders that could not be read or were reached twice (link loops), with the reason.
    problems: list[tuple[str, str]] = field(default_factory=list)


def list_images(root: str, threads: int = 0) -> tuple[list[str], dict[str, int], list[tuple[str, str]]]:
    """Candidate image paths under ``root`` (sorted), skipped counts, and folder problems."""
    if not os.path.exists(root):
        raise HwError(f"{root} does not exist")
    if not os.path.isdir(root):
        raise HwError(f"{root} is not a folder or a manifest (.parquet)")
    try:
        files, skipped, problems = _rust.walk_dir(root, list(IMAGE_EXTENSIONS), threads)
    except OSError as e:
        raise HwError(f"cannot read {root}: {e}") from None
    return files, dict(skipped), problems


def scan_paths(
    paths: list[str],
    *,
    hash: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    threads: int = 0,
    progress: Callable[[int], None] | None = None,
    chunk: int = 8192,
) -> pl.DataFrame:
    """Probe files (in Rust, in parallel, GIL released) into manifest columns, in input order."""
    parts: dict[str, list] = {}
    for start in range(0, len(paths), chunk):
        cols = _rust.scan_files(paths[start : start + chunk], hash, max_pixels, threads)
        for k, v in cols.items():
            parts.setdefault(k, []).append(v)
        if progress:
            progress(min(chunk, len(paths) - start))
    if not paths:
        return empty_scan_frame()
    return probe_frame(paths, parts)


def probe_frame(paths: Sequence[str], parts: dict[str, list], extra: Sequence[pl.Series] = ()) -> pl.DataFrame:
    """The manifest columns of probed images from the Rust scan's column chunks (``parts``: each
    column's chunks in order), then ``extra`` columns; unknown values are null, not zero or NaN."""
    import numpy as np
    import polars as pl

    from pycore.manifest import path_columns, status_names

    def cat(name: str) -> list | np.ndarray:
        vals = parts[name]
        return np.concatenate(vals) if isinstance(vals[0], np.ndarray) else [x for v in vals for x in v]

    has_size = pl.Series(cat("width")) > 0
    frame = pl.DataFrame([
        *path_columns(paths),
        status_names(cat("status_code")),
        pl.Series("error", cat("error"), dtype=pl.String),
        pl.Series("warning", cat("warning"), dtype=pl.String),
        pl.Series("format", cat("format"), dtype=pl.String),
        pl.Series("width", cat("width")).cast(pl.Int32),
        pl.Series("height", cat("height")).cast(pl.Int32),
        pl.Series("orientation", cat("orientation")).cast(pl.UInt8),
        pl.Series("file_size", cat("file_size")).cast(pl.Int64),
        pl.Series("mtime", cat("mtime")).cast(pl.Float64),
        pl.Series("content_hash", cat("content_hash"), dtype=pl.String),
        *extra,
    ])  # fmt: skip
    return frame.with_columns(
        pl.when(has_size).then(pl.col("width")).alias("width"),
        pl.when(has_size).then(pl.col("height")).alias("height"),
        pl.when(pl.col("orientation") > 0).then(pl.col("orientation")).alias("orientation"),
        pl.when(pl.col("file_size") > 0).then(pl.col("file_size")).otherwise(
            pl.when(pl.col("status") == "empty").then(0)
        ).alias("file_size"),
        pl.col("mtime").fill_nan(None),
    )


def empty_scan_frame() -> pl.DataFrame:
    import polars as pl

    from pycore.manifest import COLUMNS

    names = ["path", "path_bytes", "status", "error", "warning", "format", "width", "height",
             "orientation", "file_size", "mtime", "content_hash"]  # fmt: skip
    return pl.DataFrame(schema={n: COLUMNS[n] for n in names})


def scan_folder(
    root: str,
    *,
    hash: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    threads: int = 0,
    progress: Callable[[int], None] | None = None,
    on_listed: Callable[[int], None] | None = None,
) -> ScanResult:
    """Walk ``root`` and probe every image file found. One row per candidate file."""
    root = os.path.abspath(root)
    files, skipped, problems = list_images(root, threads)
    if on_listed:
        on_listed(len(files))
    frame = scan_paths(files, hash=hash, max_pixels=max_pixels, threads=threads, progress=progress)
    return ScanResult(frame, display_path(root), skipped, problems)


@dataclass
class FolderRows:
    """A scanned folder whose rows stay in Rust (see :func:`scan_folder_rows`)."""

    rows: _rust.BucketRows
    root: str
    skipped: dict[str, int] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)


def scan_folder_rows(
    root: str,
    *,
    hash: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    threads: int = 0,
    progress: Callable[[int], None] | None = None,
    on_listed: Callable[[int], None] | None = None,
    chunk: int = 8192,
) -> FolderRows:
    """:func:`scan_folder` with the rows kept in Rust, to be bucketed and written from there."""
    root = os.path.abspath(root)
    files, skipped, problems = list_images(root, threads)
    if on_listed:
        on_listed(len(files))
    rows = _rust.BucketRows()
    for start in range(0, len(files), chunk):
        rows.scan(files[start : start + chunk], hash, max_pixels, threads)
        if progress:
            progress(min(chunk, len(files) - start))
    return FolderRows(rows, display_path(root), skipped, problems)
