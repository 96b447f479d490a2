"""Image references: where a manifest row's image is, and the one way every command opens it.

A manifest's ``path`` is one of (documented in data_manifests/manifest_schema.md):

- a file: ``/data/img/0001.jpg``
- a tar member (WebDataset / img2dataset shard): ``/data/shards/00000.tar::000000012.jpg`` — the
  shard's absolute path, ``::``, the member's name inside the tar
- a Parquet cell (Hugging Face datasets / img2dataset parquet): ``/data/train-0000.parquet::image/17``
  — the table's path, ``::``, the column, ``/``, the 0-based row number in the file

A path is a reference into a container only when the part before the first ``::`` ends in
``.tar`` or ``.parquet``; anything else is a plain file path (so file names containing ``::``
still work). Tar members are read in place by byte range (the shard's index is built once per
process and cached); Parquet cells are read one row group at a time (the last few are cached).

:func:`read_bytes` and :func:`open_image` are what later commands (dedup, caption, spm-score,
the training dataset) call instead of ``open(path)`` / ``Image.open(path)``.
"""

from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pycore.errors import HwError

SEP = "::"
TAR_SUFFIX = ".tar"
PARQUET_SUFFIX = ".parquet"


class SourceError(HwError):
    """An image reference that cannot be read (recorded as a row's status where a command can)."""

    def __init__(self, msg: str, kind: str = "io_error") -> None:
        super().__init__(msg)
        self.kind = kind


@dataclass(frozen=True)
class Ref:
    """A parsed reference. ``kind`` is ``file``, ``tar`` or ``parquet``."""

    kind: str
    container: str
    member: str = ""
    column: str = ""
    row: int = -1


def tar_ref(shard: str, member: str) -> str:
    return f"{shard}{SEP}{member}"


def parquet_ref(table: str, column: str, row: int) -> str:
    return f"{table}{SEP}{column}/{row}"


def parse_ref(ref: str) -> Ref:
    """Split a manifest path into its parts (a plain path is ``Ref("file", path)``)."""
    head, sep, tail = ref.partition(SEP)
    if not sep:
        return Ref("file", ref)
    low = head.lower()
    if low.endswith(TAR_SUFFIX):
        return Ref("tar", head, member=tail)
    if low.endswith(PARQUET_SUFFIX):
        column, slash, row = tail.rpartition("/")
        if not slash or not row.isdigit():
            raise SourceError(f"{ref}: a Parquet reference ends in ::COLUMN/ROW", "invalid_input")
        return Ref("parquet", head, column=column, row=int(row))
    return Ref("file", ref)


def is_container_ref(ref: str) -> bool:
    return parse_ref(ref).kind != "file"


# ---- tar members -------------------------------------------------------------------------------

@dataclass
class TarIndex:
    """A shard's members: name → (offset, size); ``length`` is the shard's size in bytes."""

    members: dict[str, tuple[int, int]]
    length: int
    problem: tuple[str, str] | None


_lock = threading.Lock()
_tar_cache: OrderedDict[tuple[str, int, int], TarIndex] = OrderedDict()
_TAR_CACHE_SIZE = 64


def member_name(raw: bytes) -> str:
    """A tar member name as text (non-UTF-8 bytes surrogate-escaped, so nothing is lost)."""
    return raw.decode("utf-8", errors="surrogateescape")


def tar_index(shard: str) -> TarIndex:
    """The shard's index (built in Rust by reading only headers; cached per process while the
    shard's size and modification time stay the same)."""
    from pycore import _rust

    try:
        st = os.stat(shard)
    except OSError as e:
        raise SourceError(f"cannot open shard {shard}: {e.strerror or e}", _io_kind(e)) from None
    key = (shard, st.st_size, st.st_mtime_ns)
    with _lock:
        hit = _tar_cache.get(key)
        if hit is not None:
            _tar_cache.move_to_end(key)
            return hit
    try:
        names, offsets, sizes, kinds, length, problem = _rust.tar_index(shard)
    except OSError as e:
        raise SourceError(f"cannot read shard {shard}: {e}", "io_error") from None
    members = {
        member_name(n): (int(o), int(s))
        for n, o, s, k in zip(names, offsets.tolist(), sizes.tolist(), kinds, strict=True)
        if k == "file"
    }
    idx = TarIndex(members, int(length), problem)
    with _lock:
        _tar_cache[key] = idx
        while len(_tar_cache) > _TAR_CACHE_SIZE:
            _tar_cache.popitem(last=False)
    return idx


def read_range(path: str, offset: int, size: int) -> bytes:
    """``size`` bytes of a file from ``offset``; a short read is a truncated member."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e.strerror or e}", _io_kind(e)) from None
    if len(data) < size:
        raise SourceError(f"the shard ends inside this member: {len(data)} of {size} bytes present", "truncated")
    return data


def _read_tar(r: Ref, offset: int | None, size: int | None) -> bytes:
    if offset is None or size is None:
        idx = tar_index(r.container)
        if r.member not in idx.members:
            raise SourceError(f"{r.container} has no member {r.member!r}", "not_found")
        offset, size = idx.members[r.member]
    return read_range(r.container, offset, size)


# ---- Parquet cells -----------------------------------------------------------------------------

_pq_cache: OrderedDict[tuple[str, str, int], tuple[int, Any]] = OrderedDict()
_PQ_CACHE_SIZE = 2


def cell_bytes(value: Any) -> bytes | None:
    """The image bytes of a cell: a binary value, or HF datasets' ``{"bytes", "path"}`` struct."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return None


def _row_group(table: str, column: str, row: int) -> tuple[int, Any]:
    """(first row of the group, the column's values in the row group holding ``row``)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise HwError("reading images from Parquet tables needs pyarrow: pip install 'hw[shards]'") from None

    try:
        pf = pq.ParquetFile(table)
    except (OSError, ValueError) as e:
        raise SourceError(f"cannot read table {table}: {e}", "io_error") from None
    meta = pf.metadata
    first = 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if row < first + n:
            key = (table, column, g)
            with _lock:
                hit = _pq_cache.get(key)
            if hit is not None:
                return hit
            if column not in pf.schema_arrow.names:
                raise SourceError(f"table {table} has no column {column!r}", "not_found")
            col = pf.read_row_group(g, columns=[column]).column(0)
            val = (first, col)
            with _lock:
                _pq_cache[key] = val
                while len(_pq_cache) > _PQ_CACHE_SIZE:
                    _pq_cache.popitem(last=False)
            return val
        first += n
    raise SourceError(f"table {table} has no row {row} ({first} rows)", "not_found")


def _read_parquet(r: Ref) -> bytes:
    first, col = _row_group(r.container, r.column, r.row)
    data = cell_bytes(col[r.row - first].as_py())
    if data is None:
        raise SourceError(f"row {r.row} of {r.container} has no image bytes in column {r.column!r}", "empty")
    return data


# ---- the one opener ----------------------------------------------------------------------------

def read_bytes(ref: str, offset: int | None = None, size: int | None = None) -> bytes:
    """The bytes of the image a manifest path names (a file, a tar member or a Parquet cell).

    For tar members, ``offset``/``size`` (from the manifest's ``member_offset``/``file_size``)
    skip the index lookup. Raises :class:`SourceError` (with ``.kind`` a status name).
    """
    r = parse_ref(ref)
    if r.kind == "tar":
        return _read_tar(r, offset, size)
    if r.kind == "parquet":
        return _read_parquet(r)
    try:
        with open(ref, "rb") as f:
            return f.read()
    except OSError as e:
        raise SourceError(f"cannot read {ref}: {e.strerror or e}", _io_kind(e)) from None


def open_image(ref: str, offset: int | None = None, size: int | None = None):
    """A Pillow image for a manifest path (lazy, like ``Image.open``; use it as a context manager).
    Files are opened by path; tar members and Parquet cells from their bytes."""
    from PIL import Image

    if parse_ref(ref).kind == "file":
        return Image.open(ref)
    return Image.open(io.BytesIO(read_bytes(ref, offset, size)))


def row_offsets(frame: Any) -> list[int | None]:
    """The ``member_offset`` column as a list (all None when the manifest has none)."""
    if "member_offset" not in frame.columns:
        return [None] * frame.height
    return frame["member_offset"].to_list()


def perceptual_hashes(refs: Sequence[str], fast_min_side: int | None, threads: int, stats: bool = False) -> dict[str, Any]:
    """``_rust.perceptual_hashes`` for any references: files are read in Rust by path, tar members
    and Parquet cells are read here and hashed from their bytes. Same columns, same order."""
    from pycore import _rust

    kinds = [parse_ref(r).kind for r in refs]
    if all(k == "file" for k in kinds):
        return _rust.perceptual_hashes(list(refs), fast_min_side=fast_min_side, threads=threads, stats=stats)
    n = len(refs)
    out: dict[str, Any] = {
        "phash": np.zeros(n, np.uint64), "dhash": np.zeros(n, np.uint64), "ok": np.zeros(n, bool),
        "error_kind": [None] * n, "error": [None] * n,
    }  # fmt: skip
    cols = ["phash", "dhash", "ok", "error_kind", "error"]
    if stats:  # the columns' "unknown" values, as Rust gives them for a row that failed
        for c in ("sharpness", "luma_mean", "luma_std", "clip_low", "clip_high", "colorfulness"):
            out[c] = np.full(n, np.nan, np.float32)
        out["grayscale"], out["jpeg_quality"] = np.zeros(n, bool), np.full(n, -1, np.int16)
        cols += ["sharpness", "luma_mean", "luma_std", "clip_low", "clip_high", "colorfulness", "grayscale",
                 "jpeg_quality"]  # fmt: skip
    files = [i for i, k in enumerate(kinds) if k == "file"]
    others = [i for i, k in enumerate(kinds) if k != "file"]
    bufs: list[bytes] = []
    readable: list[int] = []
    for i in others:
        try:
            bufs.append(read_bytes(refs[i]))
            readable.append(i)
        except SourceError as e:
            out["error_kind"][i], out["error"][i] = e.kind, str(e)
    for idx, res in ((files, _rust.perceptual_hashes([refs[i] for i in files], fast_min_side=fast_min_side,
                                                     threads=threads, stats=stats) if files else None),
                     (readable, _rust.perceptual_hashes_buffers(bufs, fast_min_side=fast_min_side, threads=threads,
                                                                stats=stats) if bufs else None)):  # fmt: skip
        if res is None:
            continue
        for k, i in enumerate(idx):
            for col in cols:
                out[col][i] = res[col][k]
    return out


def content_hashes(refs: Sequence[str], threads: int = 0) -> list[str | None]:
    """xxh3-128 (hex) of each reference's bytes, as ``hw bucket`` records it; None where unreadable.
    Files are hashed in Rust by path; tar members and Parquet cells from their bytes."""
    from pycore import _rust

    kinds = [parse_ref(r).kind for r in refs]
    out: list[str | None] = [None] * len(refs)
    files = [i for i, k in enumerate(kinds) if k == "file"]
    if files:
        res = _rust.scan_files([refs[i] for i in files], hash=True, threads=threads)
        for j, i in enumerate(files):
            out[i] = res["content_hash"][j]
    others, bufs = [], []
    for i, k in enumerate(kinds):
        if k != "file":
            try:
                bufs.append(read_bytes(refs[i]))
                others.append(i)
            except SourceError:
                pass
    if bufs:
        res = _rust.scan_buffers(bufs, hash=True, threads=threads)
        for j, i in enumerate(others):
            out[i] = res["content_hash"][j]
    return out


def _io_kind(e: OSError) -> str:
    import errno

    return {errno.ENOENT: "not_found", errno.EACCES: "permission_denied", errno.EISDIR: "is_directory"}.get(
        e.errno or 0, "io_error"
    )
