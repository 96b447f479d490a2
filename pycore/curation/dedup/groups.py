"""Near pairs, connected groups and the kept image of each group."""

from __future__ import annotations

import numpy as np
import polars as pl

from pycore.curation.dedup.hashing import parse_hex64, popcount64
from pycore.curation.dedup.options import DedupOptions, DedupReport
from pycore.errors import HwError

def near_pairs(hashes: np.ndarray, threshold: int, threads: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (i < j) with Hamming distance ≤ threshold: (i, j, distance) arrays."""
    from pycore import _rust

    return _rust.hamming_pairs(np.ascontiguousarray(hashes, dtype=np.uint64), threshold, threads=threads)


def cosine_pairs(emb: np.ndarray, threshold: float, block: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (i < j) of L2-normalised rows with cosine similarity ≥ threshold, block by block
    (memory O(block²), exhaustive: no pair missed)."""
    n = emb.shape[0]
    ii, jj, ss = [], [], []
    e = np.ascontiguousarray(emb, dtype=np.float32)
    for a in range(0, n, block):
        ea = e[a : a + block]
        for b in range(a, n, block):
            sim = ea @ e[b : b + block].T
            if a == b:
                sim = np.triu(sim, k=1) + np.tril(np.full_like(sim, -2.0))
            x, y = np.nonzero(sim >= threshold)
            ii.append(x + a)
            jj.append(y + b)
            ss.append(sim[x, y])
    if not ii:
        return np.zeros(0, np.uint32), np.zeros(0, np.uint32), np.zeros(0, np.float32)
    return (np.concatenate(ii).astype(np.uint32), np.concatenate(jj).astype(np.uint32),
            np.concatenate(ss).astype(np.float32))  # fmt: skip


#: Formats cameras write (least processed) rank before formats images are usually re-saved in.
CAMERA_FORMATS = ("jpeg", "heic", "avif", "jxl")


def _keep_order(frame: pl.DataFrame, opts: DedupOptions) -> pl.DataFrame:
    """Rows sorted so the first of each group is the one to keep: --keep-by, then
    :data:`~pycore.curation.dedup.options.KEEP_POLICY`."""
    keys: list[pl.Expr] = []
    desc: list[bool] = []
    if opts.keep_by is not None:
        keys.append(pl.col(opts.keep_by))
        desc.append(not opts.keep_ascending)
    cols = frame.columns
    if "width" in cols and "height" in cols:
        keys.append((pl.col("width").cast(pl.Int64) * pl.col("height").cast(pl.Int64)).alias("_area"))
        desc.append(True)
    if "format" in cols:
        keys.append(pl.col("format").is_in(CAMERA_FORMATS).alias("_camera"))
        desc.append(True)
    for c, d in (("q_jpeg_quality", True), ("mtime", False)):
        if c in cols:
            keys.append(pl.col(c))
            desc.append(d)
    keys.append(pl.col("path"))
    desc.append(False)
    return frame.sort(keys, descending=desc, nulls_last=True)


def _edges(frame: pl.DataFrame, ok_idx: np.ndarray, hashes: np.ndarray, opts: DedupOptions, rep: DedupReport,
           embeddings: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Graph edges between ok rows (indices into ok_idx): same content hash, and near pairs."""
    m = len(ok_idx)
    edges_i: list[np.ndarray] = []
    edges_j: list[np.ndarray] = []
    if "content_hash" in frame.columns and m:
        ch = frame["content_hash"].gather(ok_idx)
        if ch.null_count() < m:
            codes = ch.cast(pl.Categorical).to_physical().to_numpy()
            loc = np.flatnonzero(ch.is_not_null().to_numpy())
            order = loc[np.argsort(codes[loc], kind="stable")]
            same = codes[order[1:]] == codes[order[:-1]]
            edges_i.append(order[:-1][same].astype(np.uint32))
            edges_j.append(order[1:][same].astype(np.uint32))
            _, counts = np.unique(codes[loc], return_counts=True)
            rep.exact_groups = int((counts > 1).sum())
    if opts.method == "phash":
        uniq, first, inv = np.unique(hashes, return_index=True, return_inverse=True)
        pi, pj, _ = near_pairs(uniq, opts.threshold, opts.threads)
        edges_i += [first[pi].astype(np.uint32), np.arange(m, dtype=np.uint32)]
        edges_j += [first[pj].astype(np.uint32), first[inv].astype(np.uint32)]
        rep.threshold = opts.threshold
    else:
        if embeddings is None:
            raise HwError("--method clip needs embeddings")
        pi, pj, _ = cosine_pairs(embeddings[ok_idx], opts.clip_threshold)
        edges_i.append(pi)
        edges_j.append(pj)
        rep.threshold = opts.clip_threshold
    rep.pairs = int(len(pi))
    ei = np.concatenate(edges_i) if edges_i else np.zeros(0, np.uint32)
    ej = np.concatenate(edges_j) if edges_j else np.zeros(0, np.uint32)
    return np.ascontiguousarray(ei, np.uint32), np.ascontiguousarray(ej, np.uint32)


def _kept_rows(frame: pl.DataFrame, ok_idx: np.ndarray, labels: np.ndarray, hashes: np.ndarray,
               opts: DedupOptions) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """For every row: the row kept in its group (-1 outside groups) and that row's phash."""
    n = frame.height
    wanted = ("path", "width", "height", "format", "mtime", "q_jpeg_quality", opts.keep_by)
    sub = pl.DataFrame({"_row": ok_idx, "_g": labels, "_h": hashes}).hstack(
        frame[ok_idx.tolist()].select([c for c in dict.fromkeys(wanted) if c and c in frame.columns]))
    grouped = _keep_order(sub.filter(pl.col("_g") >= 0), opts)
    kept = grouped.group_by("_g", maintain_order=True).first()
    kept_row = np.full(n, -1, dtype=np.int64)
    kept_hash = np.zeros(n, dtype=np.uint64)
    if kept.height:
        kg = kept["_g"].to_numpy()
        krow = np.full(int(kg.max()) + 1, -1, np.int64)
        khash = np.zeros(int(kg.max()) + 1, np.uint64)
        krow[kg] = kept["_row"].to_numpy()
        khash[kg] = kept["_h"].to_numpy()
        in_g = labels >= 0
        kept_row[ok_idx[in_g]] = krow[labels[in_g]]
        kept_hash[ok_idx[in_g]] = khash[labels[in_g]]
    return kept_row, kept_hash


def _nullable(name: str, values: np.ndarray, dtype: pl.DataType | type[pl.DataType], null: np.ndarray) -> pl.Series:
    return pl.Series(name, values, dtype=dtype).set(pl.Series(null), None)


def assign_groups(
    frame: pl.DataFrame,
    opts: DedupOptions,
    report: DedupReport | None = None,
    embeddings: np.ndarray | None = None,
) -> pl.DataFrame:
    """Add ``dup_group``, ``dup_distance``, ``dup_max_distance``, ``dup_exact``, ``keep``
    (and ``dup_similarity`` with embeddings) from content hashes and near pairs."""
    from pycore import _rust

    if opts.keep_by is not None:
        check_keep_by(frame, opts.keep_by)
    rep = report if report is not None else DedupReport()
    n = frame.height
    ok_idx = np.flatnonzero(((frame["status"] == "ok") & frame["phash"].is_not_null()).to_numpy())
    hashes = parse_hex64(frame["phash"].gather(ok_idx).to_list()) if len(ok_idx) else np.zeros(0, np.uint64)
    ei, ej = _edges(frame, ok_idx, hashes, opts, rep, embeddings)
    labels = _rust.connected_components(len(ok_idx), ei, ej)
    maxd, _exact = _rust.group_max_distances(hashes, labels, threads=opts.threads)
    kept_row, kept_hash = _kept_rows(frame, ok_idx, labels, hashes, opts)
    dup_group = np.full(n, -1, dtype=np.int64)
    dup_group[ok_idx] = labels
    grouped = dup_group >= 0
    g0 = np.maximum(dup_group, 0)
    all_hash = np.zeros(n, np.uint64)
    all_hash[ok_idx] = hashes
    keep = np.where(grouped, kept_row == np.arange(n), True)
    ok_mask = np.zeros(n, bool)
    ok_mask[ok_idx] = True
    # A group is exact when every member has the kept file's content hash.
    content = frame["content_hash"].to_numpy() if "content_hash" in frame.columns else np.full(n, None, object)
    differs = np.zeros(len(maxd), bool)
    gi = np.flatnonzero(grouped)
    other = np.array([a is None or a != b for a, b in zip(content[gi], content[kept_row[gi]], strict=True)], bool)
    differs[dup_group[gi][other]] = True
    has = len(maxd) > 0
    cols = [
        _nullable("dup_group", np.where(grouped, dup_group, 0), pl.Int64, ~grouped),
        _nullable("dup_distance", np.where(grouped, popcount64(all_hash ^ kept_hash), 0), pl.Int32, ~grouped),
        _nullable("dup_max_distance", np.where(grouped, maxd[g0] if has else 0, 0), pl.Int32, ~grouped),
        _nullable("dup_exact", np.where(grouped, ~differs[g0] if has else False, False), pl.Boolean, ~grouped),
        _nullable("keep", keep, pl.Boolean, ~ok_mask),
    ]
    if opts.method == "clip" and embeddings is not None:
        s = np.where(grouped, np.einsum("ij,ij->i", embeddings, embeddings[np.maximum(kept_row, 0)]), np.nan)
        cols.append(_nullable("dup_similarity", s, pl.Float32, ~grouped))
    _summarise(rep, opts, grouped, keep, dup_group, maxd, differs)
    return frame.with_columns(cols)


def _summarise(rep: DedupReport, opts: DedupOptions, grouped: np.ndarray, keep: np.ndarray, dup_group: np.ndarray,
               maxd: np.ndarray, differs: np.ndarray) -> None:  # fmt: skip
    sizes = np.bincount(dup_group[grouped], minlength=len(maxd)) if len(maxd) else np.zeros(0, np.int64)
    rep.groups = int(len(maxd))
    rep.near_groups = int(differs.sum())
    rep.in_groups = int(grouped.sum())
    rep.marked_for_removal = int((grouped & ~keep).sum())
    rep.largest_group = int(sizes.max()) if len(sizes) else 0
    big = np.flatnonzero(sizes > opts.max_group_size)
    rep.oversized_groups = [{"group": int(g), "size": int(sizes[g]), "max_distance": int(maxd[g])} for g in big]
    rep.method = opts.method
    rep.hash_mode = opts.hash_mode


def check_keep_by(frame: pl.DataFrame, column: str) -> None:
    """--keep-by must name a numeric (or boolean) column other than the ones dedup sorts by itself."""
    if column not in frame.columns:
        raise HwError(f"--keep-by column {column!r} is not in the manifest (numeric columns: "
                      f"{', '.join(c for c, t in frame.schema.items() if t.is_numeric()) or 'none'})")  # fmt: skip
    t = frame.schema[column]
    if not t.is_numeric() and t != pl.Boolean:
        raise HwError(f"--keep-by column {column!r} is not numeric ({t}); pick a number column such as q_sharpness")
