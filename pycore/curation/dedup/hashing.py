"""Perceptual hashes (and, from the same decode, quality statistics) of a manifest's images.

``exact`` mode is bit-identical to the ``imagehash`` package (JPEG via libjpeg-turbo, PNG via the
``png`` crate, Pillow's luma and LANCZOS reproduced); files Rust does not decode (GIF, WebP, BMP,
TIFF, unusual CMYK JPEGs) go through Pillow + ``imagehash`` themselves, so every row's hash is
imagehash's. ``fast`` mode decodes JPEGs at reduced scale in the DCT domain. Hashes already in
the input manifest are reused, keyed by content hash.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from pycore.curation.dedup.options import DedupOptions, DedupReport
from pycore.curation.dedup.quality import RUST_KEYS, STAT_COLUMNS, pillow_stats
from pycore.progress import NO_PROGRESS, Progress

def hex64(values: np.ndarray) -> list[str]:
    return [f"{int(v):016x}" for v in values]


def parse_hex64(values: Sequence[str | None]) -> np.ndarray:
    return np.array([int(v, 16) if v else 0 for v in values], dtype=np.uint64)


def popcount64(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x.astype(np.uint64)).astype(np.int32)


def _pillow_hashes(path: str) -> tuple[int, int]:
    """imagehash itself (the reference), for files the Rust decoders do not handle."""
    import imagehash

    from pycore.sources import open_image

    with open_image(path) as im:  # a file, tar member or Parquet cell
        im.load()
        return int(str(imagehash.phash(im)), 16), int(str(imagehash.dhash(im)), 16)


#: Error kinds that mean the file could not be read at all (no decoder would help).
_UNREADABLE = ("not_found", "permission_denied", "is_directory", "empty")


@dataclass
class HashBatch:
    """What :func:`hash_paths` gives for each path (in input order)."""

    phash: np.ndarray
    dhash: np.ndarray
    status: list[str | None]  #: None where hashed, else the row's new status
    error: list[str | None]
    stats: dict[str, np.ndarray] = field(default_factory=dict)  #: column → values (with opts.stats)
    fallback: int = 0  #: files hashed through Pillow


def _empty_stats(n: int) -> dict[str, np.ndarray]:
    return {c: np.full(n, -1 if t == pl.Int16 else (False if t == pl.Boolean else np.nan),
                       dtype=np.int16 if t == pl.Int16 else (bool if t == pl.Boolean else np.float32))
            for c, t in STAT_COLUMNS.items()}  # fmt: skip


def _fallback(path: str, out: HashBatch, i: int, want_stats: bool) -> None:
    """Pillow as the decoder of last resort (and the reference for these formats)."""
    try:
        out.phash[i], out.dhash[i] = _pillow_hashes(path)
        if want_stats:
            for c, v in pillow_stats(path).items():
                out.stats[c][i] = -1 if v is None else v
        out.fallback += 1
    except Exception as e:  # noqa: BLE001 - any decoder failure becomes the row's reason
        out.status[i] = "decode_error"
        out.error[i] = f"cannot decode image: {type(e).__name__}: {e}".strip()


def hash_paths(paths: Sequence[str], opts: DedupOptions, progress: Progress = NO_PROGRESS, chunk: int = 2048) -> HashBatch:
    """Hashes (and with ``opts.stats`` the quality statistics) of each path, Rust first, Pillow
    for the formats Rust does not decode. Ctrl-C stops the Rust workers between files
    (KeyboardInterrupt is raised here). Paths may name tar members and Parquet cells
    (:mod:`pycore.sources`); with ``opts.ray`` the hashing is one Ray Data job
    (:mod:`pycore.distributed`), the Pillow fallbacks stay here."""
    from pycore.sources import perceptual_hashes

    n = len(paths)
    out = HashBatch(np.zeros(n, np.uint64), np.zeros(n, np.uint64), [None] * n, [None] * n,
                    _empty_stats(n) if opts.stats else {})  # fmt: skip
    fast = opts.fast_min_side if opts.hash_mode == "fast" else None
    if opts.ray:
        from functools import partial

        from pycore import distributed

        chunk = max(n, 1)
        perceptual_hashes = partial(distributed.perceptual_hashes, address=opts.ray,  # type: ignore[assignment]
                                    workers=opts.ray_workers, progress=progress.advance)  # fmt: skip
    for start in range(0, n, chunk):
        part = list(paths[start : start + chunk])
        r = perceptual_hashes(part, fast, opts.threads, stats=opts.stats)
        sl = slice(start, start + len(part))
        out.phash[sl], out.dhash[sl] = r["phash"], r["dhash"]
        for key, col in RUST_KEYS.items() if opts.stats else ():
            out.stats[col][sl] = r[key]
        for k in np.flatnonzero(~r["ok"]):
            i = start + int(k)
            if r["error_kind"][k] in _UNREADABLE:
                out.status[i], out.error[i] = r["error_kind"][k], r["error"][k]
            else:
                _fallback(paths[i], out, i, opts.stats)
        if not opts.ray:  # the Ray job reports its own progress per unit
            progress.advance(len(part))
    return out


def _plan(frame: pl.DataFrame, opts: DedupOptions, previous_mode: str | None,
          rep: DedupReport) -> tuple[list[int], dict[int, int], dict[int, int]]:  # fmt: skip
    """(rows to hash, {row: earlier row with the same bytes hashed in this run},
    {row: row of the input whose hashes and statistics are reused})."""
    n = frame.height
    ok = (frame["status"] == "ok").to_numpy()
    content = frame["content_hash"].to_list() if "content_hash" in frame.columns else [None] * n
    cache: dict[str, int] = {}
    reusable = previous_mode == opts.hash_mode and {"phash", "dhash"} <= set(frame.columns)
    if reusable and opts.stats:
        reusable = set(STAT_COLUMNS) <= set(frame.columns)
    if reusable:
        for i, (c, p) in enumerate(zip(content, frame["phash"].to_list(), strict=True)):
            if c and p and (not opts.stats or frame["q_sharpness"][i] is not None):
                cache.setdefault(c, i)
    todo: list[int] = []
    first_of: dict[str, int] = {}
    same_as: dict[int, int] = {}
    reuse: dict[int, int] = {}
    for i in np.flatnonzero(ok).tolist():
        c = content[i]
        if c and c in cache:
            reuse[i] = cache[c]
        elif c and c in first_of:  # byte-identical file hashed in this run: hash once
            same_as[i] = first_of[c]
        else:
            if c:
                first_of[c] = i
            todo.append(i)
    rep.reused += len(reuse)
    return todo, same_as, reuse


def compute_hashes(
    frame: pl.DataFrame,
    opts: DedupOptions,
    previous_mode: str | None = None,
    progress: Progress = NO_PROGRESS,
    report: DedupReport | None = None,
) -> pl.DataFrame:
    """Add/refresh ``phash``, ``dhash`` (and with ``opts.stats`` the ``q_*`` statistics) for the
    "ok" rows; a file that cannot be decoded gets a status and an error, never a number.

    Hashes and statistics present in ``frame`` from an earlier run in the same mode
    (``previous_mode``) are reused for every row with the same ``content_hash``.
    """
    from pycore.manifest import fs_paths

    rep = report if report is not None else DedupReport()
    n = frame.height
    todo, same_as, reuse = _plan(frame, opts, previous_mode, rep)
    paths = fs_paths(frame)
    progress.stage("hashing" + (" + statistics" if opts.stats else ""), len(todo), "img")
    b = hash_paths([paths[i] for i in todo], opts, progress)
    rep.hashed += len(todo)
    rep.pillow_fallback += b.fallback
    src = np.full(n, -1, np.int64)  # row of `b` holding each row's values
    src[todo] = np.arange(len(todo))
    for i, j in same_as.items():
        src[i] = src[j]
    status = frame["status"].to_list()
    error = frame["error"].to_list() if "error" in frame.columns else [None] * n
    for i in np.flatnonzero(src >= 0).tolist():
        k = int(src[i])
        kind = b.status[k]
        if kind is not None:
            status[i], error[i] = kind, b.error[k]
            rep.failed[kind] = rep.failed.get(kind, 0) + 1
    good = np.array([src[i] >= 0 and b.status[src[i]] is None for i in range(n)], bool)
    old_ph = frame["phash"].to_list() if reuse else []
    old_dh = frame["dhash"].to_list() if reuse else []
    phash = [f"{int(b.phash[src[i]]):016x}" if good[i] else (old_ph[reuse[i]] if i in reuse else None) for i in range(n)]
    dhash = [f"{int(b.dhash[src[i]]):016x}" if good[i] else (old_dh[reuse[i]] if i in reuse else None) for i in range(n)]
    cols = [pl.Series("status", status, dtype=pl.String), pl.Series("error", error, dtype=pl.String),
            pl.Series("phash", phash, dtype=pl.String), pl.Series("dhash", dhash, dtype=pl.String)]  # fmt: skip
    if opts.stats:
        cols += _stat_columns(frame, b, src, good, reuse)
    return frame.with_columns(cols)


def _stat_columns(frame: pl.DataFrame, b: HashBatch, src: np.ndarray, good: np.ndarray,
                  reuse: dict[int, int]) -> list[pl.Series]:  # fmt: skip
    """The q_* columns: this run's values where hashed, the input's where reused, else null."""
    n = frame.height
    out = []
    ridx = np.array(list(reuse.keys()), np.int64)
    rsrc = np.array(list(reuse.values()), np.int64)
    for col, dtype in STAT_COLUMNS.items():
        vals = np.zeros(n, b.stats[col].dtype)
        vals[good] = b.stats[col][src[good]]
        missing = ~good
        if len(ridx):
            old = frame[col].cast(dtype)
            prev = old.gather(rsrc.tolist())
            vals[ridx] = prev.fill_null(-1 if dtype == pl.Int16 else (False if dtype == pl.Boolean else np.nan)).to_numpy()
            missing[ridx] = prev.is_null().to_numpy()
        s = pl.Series(col, vals).cast(dtype)
        if dtype == pl.Int16:
            missing = missing | (vals < 0)
        elif dtype != pl.Boolean:
            missing = missing | ~np.isfinite(vals)
        out.append(s.set(pl.Series(missing), None))
    return out
