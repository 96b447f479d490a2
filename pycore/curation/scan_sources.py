"""Scanning images where they are stored — WebDataset/img2dataset tar shards and Parquet tables
with image bytes — into manifest frames with the same columns (and the same values, byte for
byte) as :func:`pycore.scan.scan_paths` gives for the same images as loose files.

Tar members are probed in place by byte range in Rust (nothing is extracted); Parquet cells are
read one record batch at a time and probed from their bytes. Every image member or cell becomes
a row, broken ones with a status and a reason; a shard that cannot be read at all, or whose
tar headers are damaged part-way, adds one row ``SHARD::`` carrying the problem so it is never
silently dropped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from pycore import _rust
from pycore.errors import HwError
from pycore.curation.scan import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ScanResult, empty_scan_frame, probe_frame
from pycore.manifest import status_code
from pycore.curation.shards import SourceOptions  # noqa: F401 (re-exported)
from pycore.sources import member_name, parquet_ref, tar_ref

#: Sidecar extensions carried into the manifest with ``sidecars=True``: member ``KEY.txt`` →
#: ``source_caption`` (img2dataset's alt text), ``KEY.json`` → ``source_json`` (its metadata).
SIDECARS = {"txt": "source_caption", "json": "source_json"}

#: Largest sidecar read into the manifest; larger ones get a warning and are left out.
MAX_SIDECAR_BYTES = 1 << 20


@dataclass
class _Rows:
    """Scan rows gathered across shards before they become a frame."""

    paths: list[str] = field(default_factory=list)
    cols: dict[str, list] = field(default_factory=dict)
    offsets: list[int | None] = field(default_factory=list)
    extra: dict[str, list[str | None]] = field(default_factory=dict)

    def add(self, paths: list[str], cols: dict, offsets: list[int | None], extra: dict[str, list[str | None]]) -> None:
        n0 = len(self.paths)
        self.paths += paths
        for k, v in cols.items():
            self.cols.setdefault(k, []).append(np.asarray(v) if isinstance(v, np.ndarray) else list(v))
        self.offsets += offsets
        for k in [*self.extra, *(k for k in extra if k not in self.extra)]:  # a fixed column order
            self.extra.setdefault(k, [None] * n0).extend(extra.get(k, [None] * len(paths)))

    def problem_row(self, path: str, status: str, error: str) -> None:
        cols = {"status_code": np.asarray([status_code(status)], np.uint8), "error": [error], "warning": [None], "format": [None],
                "width": np.zeros(1, np.uint32), "height": np.zeros(1, np.uint32),
                "orientation": np.zeros(1, np.uint8), "file_size": np.zeros(1, np.uint64),
                "mtime": np.full(1, np.nan), "content_hash": [None]}  # fmt: skip
        self.add([path], cols, [None], {})


def _frame(rows: _Rows) -> pl.DataFrame:
    if not rows.paths:
        return empty_scan_frame()
    extra = [pl.Series("member_offset", rows.offsets, dtype=pl.Int64),
             *[pl.Series(k, v, dtype=pl.String) for k, v in rows.extra.items()]]  # fmt: skip
    return probe_frame(rows.paths, rows.cols, extra)


def split_member(name: str) -> tuple[str, str]:
    """WebDataset's (key, extension): the extension starts at the first dot of the base name."""
    d, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), (ext.lower() if dot else "")


def is_image_ext(ext: str) -> bool:
    return ext.rpartition(".")[2] in IMAGE_EXTENSIONS


def _read_sidecar(shard: str, offset: int, size: int) -> tuple[str | None, str | None]:
    if size > MAX_SIDECAR_BYTES:
        return None, f"sidecar of {size} bytes is over {MAX_SIDECAR_BYTES} and was left out"
    with open(shard, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) < size:
        return None, "sidecar is cut off by the end of the shard"
    return data.decode("utf-8", errors="replace"), None


def scan_shard(shard: str, *, hash: bool, max_pixels: int, threads: int, sidecars: bool,
               rows: _Rows, skipped: dict[str, int], problems: list[tuple[str, str]]) -> int:  # fmt: skip
    """Add one row per image member of ``shard`` to ``rows``; returns the number of rows added."""
    try:
        names_raw, offsets, sizes, kinds, _length, problem = _rust.tar_index(shard)
    except OSError as e:
        rows.problem_row(tar_ref(shard, ""), _kind_of(str(e)), f"cannot read shard: {e}")
        problems.append((shard, str(e)))
        return 1
    names = [member_name(n) for n in names_raw]
    offs, szs = offsets.tolist(), sizes.tolist()
    images, side = [], {}
    for i, (name, kind) in enumerate(zip(names, kinds, strict=True)):
        if kind != "file":
            continue
        key, ext = split_member(name)
        if is_image_ext(ext):
            images.append(i)
        elif sidecars and ext in SIDECARS:
            side[(key, ext)] = i
        else:
            skipped[ext] = skipped.get(ext, 0) + 1
    if images:
        sel_off = np.asarray([offs[i] for i in images], np.uint64)
        sel_sz = np.asarray([szs[i] for i in images], np.uint64)
        cols = _rust.scan_ranges([shard] * len(images), sel_off, sel_sz, hash, max_pixels, threads)
        extra: dict[str, list[str | None]] = {}
        if sidecars:
            for ext, col in SIDECARS.items():
                vals: list[str | None] = []
                for i in images:
                    j = side.get((split_member(names[i])[0], ext))
                    text, why = _read_sidecar(shard, offs[j], szs[j]) if j is not None else (None, None)
                    if why:
                        problems.append((tar_ref(shard, names[j]), why))  # type: ignore[index]
                    vals.append(text)
                extra[col] = vals
        rows.add([tar_ref(shard, names[i]) for i in images], cols, [offs[i] for i in images], extra)
    if problem is not None:
        status, msg = problem
        last_cut = bool(images) and status == "truncated" and offs[images[-1]] + szs[images[-1]] > _length
        problems.append((shard, msg))
        if not last_cut:  # the damage is not already on a member's row
            rows.problem_row(tar_ref(shard, ""), status, f"{msg} (shard {os.path.basename(shard)})")
            return len(images) + 1
    return len(images)


def _kind_of(msg: str) -> str:
    low = msg.lower()
    if "no such file" in low:
        return "not_found"
    if "permission denied" in low:
        return "permission_denied"
    return "io_error"


def scan_shards(
    shards: Sequence[str],
    *,
    hash: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    threads: int = 0,
    sidecars: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ScanResult:
    """Scan WebDataset tar shards in place: one row per image member (path ``SHARD::MEMBER``),
    in shard order then member order. ``progress(1)`` is called after each shard."""
    rows, skipped, problems = _Rows(), {}, []  # type: ignore[var-annotated]
    for shard in shards:
        n = scan_shard(shard, hash=hash, max_pixels=max_pixels, threads=threads, sidecars=sidecars,
                       rows=rows, skipped=skipped, problems=problems)  # fmt: skip
        if progress:
            progress(1)
    root = os.path.commonpath(list(shards)) if shards else ""
    return ScanResult(_frame(rows), root, skipped, problems)


def require_pyarrow():
    """pyarrow.parquet, or a one-line error naming the extra that installs it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise HwError("reading Parquet image tables needs pyarrow: pip install 'hw[shards]'") from None
    return pq


def image_column_kind(schema, column: str, table: str) -> str:
    """``binary`` or ``struct`` (HF datasets' Image: ``{bytes, path}``); an error otherwise."""
    import pyarrow as pa

    if column not in schema.names:
        raise HwError(f"table {table} has no column {column!r} (columns: {', '.join(schema.names)})")
    t = schema.field(column).type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "binary"
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
        return "struct"
    raise HwError(f"column {column!r} of {table} is {t}, not image bytes (binary, or a struct with a 'bytes' field)")


def scan_table(table: str, column: str, *, hash: bool, max_pixels: int, threads: int,
               caption_column: str | None, rows: _Rows, batch_rows: int = 256) -> int:  # fmt: skip
    """Add one row per row of a Parquet table with image bytes in ``column``."""
    pq = require_pyarrow()

    try:
        pf = pq.ParquetFile(table)
    except (OSError, ValueError) as e:
        raise HwError(f"cannot read table {table}: {str(e).splitlines()[0]}") from None
    kind = image_column_kind(pf.schema_arrow, column, table)
    cols = [column] + ([caption_column] if caption_column else [])
    if caption_column and caption_column not in pf.schema_arrow.names:
        raise HwError(f"table {table} has no column {caption_column!r} for --caption-column")
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
        arr = batch.column(0)
        cells = (_struct_bytes(arr) if kind == "struct" else arr).to_pylist()
        got = _rust.scan_buffers([c if c is not None else b"" for c in cells], hash, max_pixels, threads)
        err = list(got["error"])
        for i, c in enumerate(cells):
            if c is None:
                err[i] = f"no image bytes in column {column!r}"
        got["error"] = err
        extra = {}
        if caption_column:
            extra["source_caption"] = [None if c is None else str(c) for c in batch.column(1).to_pylist()]
        paths = [parquet_ref(table, column, row + i) for i in range(len(cells))]
        rows.add(paths, got, [None] * len(cells), extra)
        row += len(cells)
    return row


def _struct_bytes(arr):
    """The ``bytes`` field of a struct column, null where the struct itself is null."""
    import pyarrow as pa
    import pyarrow.compute as pc

    b = arr.field("bytes")
    if arr.null_count == 0:
        return b
    return pc.if_else(pc.is_null(arr), pa.nulls(len(arr), b.type), b)


def scan_tables(
    tables: Sequence[str],
    column: str,
    *,
    hash: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    threads: int = 0,
    caption_column: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> ScanResult:
    """Scan Parquet tables with image bytes: one row per table row (path ``TABLE::COLUMN/ROW``)."""
    rows = _Rows()
    for t in tables:
        n = scan_table(t, column, hash=hash, max_pixels=max_pixels, threads=threads,
                       caption_column=caption_column, rows=rows)  # fmt: skip
        if progress:
            progress(1)
    root = os.path.commonpath(list(tables)) if tables else ""
    frame = _frame(rows)
    if "member_offset" in frame.columns:
        frame = frame.drop("member_offset")
    return ScanResult(frame, root, {}, [])


def scan_source(
    src: str | os.PathLike[str],
    sopts: SourceOptions,
    *,
    hash: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    threads: int = 0,
    progress: Callable[[int], None] | None = None,
    on_listed: Callable[[int], None] | None = None,
) -> ScanResult | None:
    """Scan ``src`` when it names tar shards or (with ``image_column``) Parquet image tables;
    None when it is a folder of images or a manifest (the caller's usual path)."""
    s = os.fspath(src)
    named = containers(s, sopts)
    if named is None:
        if sopts.ray and os.path.isdir(s) and not _is_manifest_folder(s):
            return _folder_on_ray(s, sopts, hash, max_pixels, threads, progress, on_listed)
        return None
    kind, files = named
    if on_listed:
        on_listed(len(files))
    if sopts.ray:
        return _on_ray([{"kind": kind, "path": f} for f in files], files, sopts, hash, max_pixels, threads, progress)
    return next(iter_scans(kind, files, sopts, hash=hash, max_pixels=max_pixels, threads=threads, progress=progress,
                           rows_per_part=0))  # fmt: skip


def containers(src: str | os.PathLike[str], sopts: SourceOptions) -> tuple[str, list[str]] | None:
    """(``"table"``, Parquet tables) with ``image_column``, (``"shard"``, tar shards) when ``src``
    names shards, None for a folder of images or a manifest. Mistakes are one-line errors."""
    from pycore.curation.shards import SHARD_SUFFIXES, TABLE_SUFFIXES, expand_inputs, names_shards

    s = os.fspath(src)
    if sopts.image_column:
        tables = expand_inputs(s, TABLE_SUFFIXES)
        _check_exist(tables)
        return "table", tables
    if not names_shards(s):
        if sopts.sidecars:
            raise HwError("--sidecars applies to tar shards (a .tar, a folder of them, a {a..b} pattern or a list)")
        if s.lower().endswith(".parquet") and os.path.isfile(s):
            _hint_image_table(s)
        return None
    shards = expand_inputs(s, SHARD_SUFFIXES)
    if all(not os.path.exists(p) for p in shards):
        raise HwError(f"none of the {len(shards)} shard(s) named by {s} exist (first: {shards[0]})")
    return "shard", shards


def iter_scans(kind: str, files: Sequence[str], sopts: SourceOptions, *, hash: bool = True,
               max_pixels: int = DEFAULT_MAX_PIXELS, threads: int = 0, progress: Callable[[int], None] | None = None,
               rows_per_part: int = 0) -> Iterator[ScanResult]:  # fmt: skip
    """Scan shards or tables in order, one container at a time, yielding a :class:`ScanResult`
    each time at least ``rows_per_part`` rows are gathered (whole containers; the rest at the
    end). ``rows_per_part`` 0: one result for everything. Memory: one result's rows."""
    root = os.path.commonpath(list(files)) if files else ""
    frames: list[pl.DataFrame] = []
    skipped: dict[str, int] = {}
    problems: list[tuple[str, str]] = []
    rows = 0
    for f in files:
        if kind == "table":
            assert sopts.image_column is not None
            r = scan_tables([f], sopts.image_column, hash=hash, max_pixels=max_pixels, threads=threads,
                            caption_column=sopts.caption_column)  # fmt: skip
        else:
            r = scan_shards([f], hash=hash, max_pixels=max_pixels, threads=threads, sidecars=sopts.sidecars)
        frames.append(r.frame)
        rows += r.frame.height
        for k, v in r.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
        problems += r.problems
        if progress:
            progress(1)
        if rows_per_part and rows >= rows_per_part:
            yield ScanResult(_concat(frames), root, skipped, problems)
            frames, skipped, problems, rows = [], {}, [], 0
    if frames or not rows_per_part:
        yield ScanResult(_concat(frames), root, skipped, problems)


def _concat(frames: list[pl.DataFrame]) -> pl.DataFrame:
    frames = [f for f in frames if f.height] or frames[:1]
    if not frames:
        return empty_scan_frame()
    return pl.concat(frames, how="diagonal_relaxed") if len(frames) > 1 else frames[0]


def _check_exist(paths: list[str]) -> None:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise HwError(f"{missing[0]} does not exist{more}")


def _hint_image_table(path: str) -> None:
    """A .parquet without hw's columns but with an image column: say how to scan it."""
    try:  # polars, not pyarrow: a plain re-bucket must not need the shards extra
        names = list(pl.read_parquet_schema(path))
    except (pl.exceptions.PolarsError, OSError):
        return
    if "status" not in names and "path" not in names:
        cand = next((n for n in ("image", "jpg", "png", "bytes") if n in names), None)
        hint = f" — to scan its images, pass --image-column {cand}" if cand else ""
        raise HwError(f"{path} is not an hw manifest (no path/status columns){hint}")


def _is_manifest_folder(path: str) -> bool:
    from pycore.manifest_parts import is_manifest_folder

    return is_manifest_folder(path)


def _scan_unit(sopts: SourceOptions, hash: bool, max_pixels: int, threads: int):
    from pycore.distributed import ScanUnit

    return ScanUnit(hash=hash, max_pixels=max_pixels, threads=threads, sidecars=sopts.sidecars,
                    image_column=sopts.image_column, caption_column=sopts.caption_column)  # fmt: skip


def _on_ray(units: list[dict], containers: list[str], sopts: SourceOptions, hash: bool, max_pixels: int,
            threads: int, progress: Callable[[int], None] | None) -> ScanResult:  # fmt: skip
    """The same scan as a Ray Data job, one unit per shard or table (pycore.distributed)."""
    from pycore.distributed import scan_units

    assert sopts.ray is not None
    frame, skipped, problems = scan_units(units, _scan_unit(sopts, hash, max_pixels, threads), address=sopts.ray,
                                          workers=sopts.ray_workers, progress=progress)  # fmt: skip
    if sopts.image_column and "member_offset" in frame.columns:
        frame = frame.drop("member_offset")
    return ScanResult(frame, os.path.commonpath(containers) if containers else "", skipped, problems)


def _folder_on_ray(root: str, sopts: SourceOptions, hash: bool, max_pixels: int, threads: int,
                   progress: Callable[[int], None] | None, on_listed: Callable[[int], None] | None) -> ScanResult:  # fmt: skip
    """A folder of loose images scanned on Ray in chunks of files (the walk stays on the driver)."""
    from pycore.distributed import CHUNK_ROWS, scan_units
    from pycore.manifest import display_path
    from pycore.curation.scan import list_images

    root = os.path.abspath(root)
    files, skipped, problems = list_images(root, threads)
    if on_listed:
        on_listed(-(-len(files) // CHUNK_ROWS))
    if any(display_path(f) != f for f in files):
        raise HwError("--ray cannot carry file names that are not valid UTF-8; run without --ray")
    units = [{"kind": "files", "paths": files[i : i + CHUNK_ROWS]} for i in range(0, len(files), CHUNK_ROWS)]
    assert sopts.ray is not None
    frame, _, _ = scan_units(units, _scan_unit(sopts, hash, max_pixels, threads), address=sopts.ray,
                             workers=sopts.ray_workers, progress=progress)  # fmt: skip
    if not units:
        frame = empty_scan_frame()
    return ScanResult(frame, display_path(root), skipped, problems)
