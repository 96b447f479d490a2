"""Exact and near-duplicate detection over a manifest (`hw dedup`).

Steps, each a function that can be used on its own:

1. :func:`compute_hashes` — perceptual hashes (``phash``, ``dhash``) of every "ok" row, in Rust
   and in parallel. ``exact`` mode is bit-identical to the ``imagehash`` package (JPEG via
   libjpeg-turbo, PNG via the ``png`` crate, Pillow's luma and LANCZOS reproduced); files Rust
   does not decode (GIF, WebP, BMP, TIFF, unusual CMYK JPEGs) go through Pillow + ``imagehash``
   themselves, so every row's hash is imagehash's. ``fast`` mode decodes JPEGs at reduced scale
   in the DCT domain. Hashes already in the input manifest are reused, keyed by content hash.
2. :func:`near_pairs` — all pairs within a Hamming distance (multi-index hashing in Rust, exact).
3. :func:`assign_groups` — connected components of exact (content hash) and near pairs, the
   kept image of each group, each row's distance to it, each group's largest internal distance.
4. :func:`apply_moves`, :func:`write_review` — optional actions and the HTML review page.

Hashes are stored as 16 lower-case hex digits, exactly ``str(imagehash.phash(img))``.
"""

from __future__ import annotations

import base64
import html
import io
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pycore.errors import HwError

#: Default Hamming threshold on the 64-bit phash (chosen from bench/bench_dedup.py's quality
#: run: the best F1 on re-encodes, resizes, small crops and brightness shifts of real photos).
DEFAULT_THRESHOLD = 10
#: Cosine similarity threshold for --method clip.
DEFAULT_CLIP_THRESHOLD = 0.95
#: In fast mode, JPEGs are decoded at the smallest 1/2, 1/4, 1/8 scale keeping both sides ≥ this.
FAST_MIN_SIDE = 128
HASH_MODES = ("exact", "fast")
METHODS = ("phash", "clip")
KEEP_POLICY = "highest resolution, then largest file, then path order"


@dataclass
class DedupOptions:
    """Settings of one dedup run (validated on construction)."""

    threshold: int = DEFAULT_THRESHOLD  #: largest phash Hamming distance of a near duplicate
    hash_mode: str = "exact"  #: exact (imagehash bit-identical) or fast (reduced-scale JPEG decode)
    fast_min_side: int = FAST_MIN_SIDE  #: fast mode: smallest decoded side
    method: str = "phash"  #: phash, or clip (open_clip embeddings, cosine threshold)
    clip_threshold: float = DEFAULT_CLIP_THRESHOLD  #: --method clip: smallest cosine similarity
    keep_by: str | None = None  #: keep the row with the highest value of this column
    keep_ascending: bool = False  #: with keep_by: keep the lowest value instead
    max_group_size: int = 1000  #: warn about groups larger than this
    threads: int = 0  #: worker threads (0 = one per core)

    def __post_init__(self) -> None:
        if not 0 <= self.threshold <= 32:
            raise HwError(f"--threshold must be 0..32 bits, got {self.threshold}")
        if self.hash_mode not in HASH_MODES:
            raise HwError(f"--hash-mode must be one of {', '.join(HASH_MODES)}, got {self.hash_mode!r}")
        if self.method not in METHODS:
            raise HwError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.fast_min_side < 32:
            raise HwError("fast_min_side must be at least 32 (the hash's input size)")
        if not -1.0 <= self.clip_threshold <= 1.0:
            raise HwError(f"--clip-threshold must be a cosine similarity in -1..1, got {self.clip_threshold}")
        if self.max_group_size < 2:
            raise HwError("--max-group-size must be at least 2")
        if self.threads < 0:
            raise HwError("--threads must be 0 (all cores) or more")


@dataclass
class DedupReport:
    rows: int = 0
    hashed: int = 0
    reused: int = 0
    pillow_fallback: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    exact_groups: int = 0
    near_groups: int = 0
    groups: int = 0
    in_groups: int = 0
    marked_for_removal: int = 0
    largest_group: int = 0
    oversized_groups: list[dict[str, int]] = field(default_factory=list)
    pairs: int = 0
    threshold: int | float = 0
    method: str = "phash"
    hash_mode: str = "exact"

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def hex64(values: np.ndarray) -> list[str]:
    return [f"{int(v):016x}" for v in values]


def parse_hex64(values: Sequence[str | None]) -> np.ndarray:
    return np.array([int(v, 16) if v else 0 for v in values], dtype=np.uint64)


def popcount64(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x.astype(np.uint64)).astype(np.int32)


def _pillow_hashes(path: str) -> tuple[int, int]:
    """imagehash itself (the reference), for files the Rust decoders do not handle."""
    import imagehash
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return int(str(imagehash.phash(im)), 16), int(str(imagehash.dhash(im)), 16)


def hash_paths(
    paths: Sequence[str], opts: DedupOptions, progress: Callable[[int], None] | None = None, chunk: int = 2048
) -> tuple[np.ndarray, np.ndarray, list[str | None], list[str | None], int]:
    """(phash, dhash, status or None, error or None, pillow fallbacks) for each path."""
    from pycore import _rust

    n = len(paths)
    ph = np.zeros(n, dtype=np.uint64)
    dh = np.zeros(n, dtype=np.uint64)
    status: list[str | None] = [None] * n
    errors: list[str | None] = [None] * n
    fallback = 0
    fast = opts.fast_min_side if opts.hash_mode == "fast" else None
    for start in range(0, n, chunk):
        part = list(paths[start : start + chunk])
        r = _rust.perceptual_hashes(part, fast_min_side=fast, threads=opts.threads)
        ph[start : start + len(part)] = r["phash"]
        dh[start : start + len(part)] = r["dhash"]
        for k in np.flatnonzero(~r["ok"]):
            i = start + int(k)
            kind, msg = r["error_kind"][k], r["error"][k]
            if kind in ("not_found", "permission_denied", "is_directory", "empty"):
                status[i], errors[i] = kind, msg
                continue
            try:  # Pillow as the decoder of last resort (and the reference for these formats)
                ph[i], dh[i] = _pillow_hashes(paths[i])
                fallback += 1
            except Exception as e:  # noqa: BLE001 - any decoder failure becomes the row's reason
                status[i] = "decode_error"
                errors[i] = f"cannot decode image: {type(e).__name__}: {e}".strip()
        if progress:
            progress(len(part))
    return ph, dh, status, errors, fallback


def compute_hashes(
    frame: pl.DataFrame,
    opts: DedupOptions,
    previous_mode: str | None = None,
    progress: Callable[[int], None] | None = None,
    report: DedupReport | None = None,
) -> pl.DataFrame:
    """Add/refresh ``phash`` and ``dhash`` for the "ok" rows; failed decodes get a status.

    Hashes present in ``frame`` from an earlier run in the same mode (``previous_mode``) are
    reused for every row with the same ``content_hash``.
    """
    from pycore.manifest import fs_paths

    rep = report if report is not None else DedupReport()
    n = frame.height
    ok = (frame["status"] == "ok").to_numpy()
    paths = fs_paths(frame)
    content = frame["content_hash"].to_list() if "content_hash" in frame.columns else [None] * n
    cache: dict[str, tuple[str, str]] = {}
    if previous_mode == opts.hash_mode and "phash" in frame.columns and "dhash" in frame.columns:
        for c, p, d in zip(content, frame["phash"].to_list(), frame["dhash"].to_list(), strict=True):
            if c and p and d:
                cache[c] = (p, d)
    phash: list[str | None] = [None] * n
    dhash: list[str | None] = [None] * n
    todo: list[int] = []
    first_of: dict[str, int] = {}
    same_as: dict[int, int] = {}
    for i in range(n):
        if not ok[i]:
            continue
        c = content[i]
        if c and c in cache:
            phash[i], dhash[i] = cache[c]
            rep.reused += 1
        elif c and c in first_of:  # byte-identical file hashed in this run: hash once
            same_as[i] = first_of[c]
        else:
            if c:
                first_of[c] = i
            todo.append(i)
    ph, dh, st, er, fb = hash_paths([paths[i] for i in todo], opts, progress)
    rep.hashed += len(todo)
    rep.pillow_fallback += fb
    status = frame["status"].to_list()
    error = frame["error"].to_list() if "error" in frame.columns else [None] * n
    for k, i in enumerate(todo):
        if st[k] is None:
            phash[i], dhash[i] = f"{int(ph[k]):016x}", f"{int(dh[k]):016x}"
        else:
            kind = st[k] or "decode_error"
            status[i], error[i] = kind, er[k]
            rep.failed[kind] = rep.failed.get(kind, 0) + 1
    for i, j in same_as.items():
        phash[i], dhash[i] = phash[j], dhash[j]
        if status[j] != "ok":
            status[i], error[i] = status[j], error[j]
            rep.failed[status[j]] = rep.failed.get(status[j], 0) + 1
    return frame.with_columns(
        pl.Series("status", status, dtype=pl.String),
        pl.Series("error", error, dtype=pl.String),
        pl.Series("phash", phash, dtype=pl.String),
        pl.Series("dhash", dhash, dtype=pl.String),
    )


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


def _keep_order(frame: pl.DataFrame, opts: DedupOptions) -> pl.DataFrame:
    """Rows sorted so the first of each group is the one to keep."""
    if opts.keep_by is not None:
        if opts.keep_by not in frame.columns:
            raise HwError(f"--keep-by column {opts.keep_by!r} is not in the manifest")
        if not frame.schema[opts.keep_by].is_numeric() and frame.schema[opts.keep_by] != pl.Boolean:
            raise HwError(f"--keep-by column {opts.keep_by!r} is not numeric ({frame.schema[opts.keep_by]})")
        keys = [pl.col(opts.keep_by)]
        desc = [not opts.keep_ascending]
    else:
        keys, desc = [], []
    area = (pl.col("width").cast(pl.Int64) * pl.col("height").cast(pl.Int64)) if "width" in frame.columns else pl.lit(0)
    size = pl.col("file_size") if "file_size" in frame.columns else pl.lit(0)
    keys += [area.alias("_area"), size.alias("_size"), pl.col("path")]
    desc += [True, True, False]
    return frame.sort(keys, descending=desc, nulls_last=True)


def assign_groups(
    frame: pl.DataFrame,
    opts: DedupOptions,
    report: DedupReport | None = None,
    embeddings: np.ndarray | None = None,
) -> pl.DataFrame:
    """Add ``dup_group``, ``dup_distance``, ``dup_max_distance``, ``dup_exact``, ``keep``
    (and ``dup_similarity`` with embeddings) from content hashes and near pairs."""
    from pycore import _rust

    rep = report if report is not None else DedupReport()
    n = frame.height
    ok_idx = np.flatnonzero(((frame["status"] == "ok") & frame["phash"].is_not_null()).to_numpy())
    hashes = parse_hex64(frame["phash"].gather(ok_idx).to_list()) if len(ok_idx) else np.zeros(0, np.uint64)
    m = len(ok_idx)
    edges_i: list[np.ndarray] = []
    edges_j: list[np.ndarray] = []
    # Exact duplicates: same content hash.
    if "content_hash" in frame.columns and m:
        ch = frame["content_hash"].gather(ok_idx)
        codes = ch.cast(pl.Categorical).to_physical().to_numpy() if ch.null_count() < m else None
        if codes is not None:
            valid = ch.is_not_null().to_numpy()
            loc = np.flatnonzero(valid)
            order = loc[np.argsort(codes[loc], kind="stable")]
            same = codes[order[1:]] == codes[order[:-1]]
            edges_i.append(order[:-1][same].astype(np.uint32))
            edges_j.append(order[1:][same].astype(np.uint32))
            _, counts = np.unique(codes[loc], return_counts=True)
            rep.exact_groups = int((counts > 1).sum())
    sims = None
    if opts.method == "phash":
        uniq, first, inv = np.unique(hashes, return_index=True, return_inverse=True)
        pi, pj, _ = near_pairs(uniq, opts.threshold, opts.threads)
        rep.pairs = int(len(pi))
        edges_i += [first[pi].astype(np.uint32), np.arange(m, dtype=np.uint32)]
        edges_j += [first[pj].astype(np.uint32), first[inv].astype(np.uint32)]
        rep.threshold = opts.threshold
    else:
        if embeddings is None:
            raise HwError("--method clip needs embeddings")
        pi, pj, ps = cosine_pairs(embeddings[ok_idx], opts.clip_threshold)
        rep.pairs = int(len(pi))
        edges_i.append(pi)
        edges_j.append(pj)
        rep.threshold = opts.clip_threshold
        sims = embeddings[ok_idx]
    ei = np.concatenate(edges_i) if edges_i else np.zeros(0, np.uint32)
    ej = np.concatenate(edges_j) if edges_j else np.zeros(0, np.uint32)
    labels = _rust.connected_components(m, np.ascontiguousarray(ei, np.uint32), np.ascontiguousarray(ej, np.uint32))
    maxd, _exact = _rust.group_max_distances(hashes, labels, threads=opts.threads)

    sub = pl.DataFrame({"_row": ok_idx, "_g": labels, "_h": hashes}).hstack(frame[ok_idx.tolist()].select(
        [c for c in ("path", "width", "height", "file_size", "content_hash", opts.keep_by) if c and c in frame.columns]
    ))  # fmt: skip
    grouped = _keep_order(sub.filter(pl.col("_g") >= 0), opts)
    kept = grouped.group_by("_g", maintain_order=True).first().select("_g", pl.col("_row").alias("_kept"), pl.col("_h").alias("_kh"))
    dup_group = np.full(n, -1, dtype=np.int64)
    dup_group[ok_idx] = labels
    kept_row = np.full(n, -1, dtype=np.int64)
    kept_hash = np.zeros(n, dtype=np.uint64)
    if kept.height:
        kg = kept["_g"].to_numpy()
        krow = np.full(int(kg.max()) + 1, -1, np.int64)
        khash = np.zeros(int(kg.max()) + 1, np.uint64)
        krow[kg] = kept["_kept"].to_numpy()
        khash[kg] = kept["_kh"].to_numpy()
        in_g = ok_idx[labels >= 0]
        kept_row[in_g] = krow[dup_group[in_g]]
        kept_hash[in_g] = khash[dup_group[in_g]]
    all_hash = np.zeros(n, np.uint64)
    all_hash[ok_idx] = hashes
    grouped_mask = dup_group >= 0
    dist = np.where(grouped_mask, popcount64(all_hash ^ kept_hash), 0)
    keep = np.where(grouped_mask, kept_row == np.arange(n), True)
    ok_mask = np.zeros(n, bool)
    ok_mask[ok_idx] = True
    gmax = np.where(grouped_mask, maxd[np.maximum(dup_group, 0)] if len(maxd) else 0, 0)
    # Exact-only groups: every member has the kept file's content hash.
    content = frame["content_hash"].to_numpy() if "content_hash" in frame.columns else np.full(n, None, object)
    sizes = np.bincount(dup_group[grouped_mask], minlength=len(maxd)) if len(maxd) else np.zeros(0, np.int64)
    differs = np.zeros(len(maxd), bool)
    gi = np.flatnonzero(grouped_mask)
    mine, theirs = content[gi], content[kept_row[gi]]
    other = np.array([a is None or a != b for a, b in zip(mine, theirs, strict=True)], bool)
    differs[dup_group[gi][other]] = True
    exact_group = ~differs
    cols = [
        pl.Series("dup_group", np.where(grouped_mask, dup_group, 0), dtype=pl.Int64).set(pl.Series(~grouped_mask), None),
        pl.Series("dup_distance", dist, dtype=pl.Int32).set(pl.Series(~grouped_mask), None),
        pl.Series("dup_max_distance", gmax, dtype=pl.Int32).set(pl.Series(~grouped_mask), None),
        pl.Series("dup_exact", np.where(grouped_mask, exact_group[np.maximum(dup_group, 0)] if len(maxd) else False, False),
                  dtype=pl.Boolean).set(pl.Series(~grouped_mask), None),
        pl.Series("keep", keep, dtype=pl.Boolean).set(pl.Series(~ok_mask), None),
    ]  # fmt: skip
    if sims is not None:
        e = np.zeros((n, sims.shape[1]), np.float32)
        e[ok_idx] = sims
        s = np.where(grouped_mask, np.einsum("ij,ij->i", e, e[np.maximum(kept_row, 0)]), np.nan)
        cols.append(pl.Series("dup_similarity", s, dtype=pl.Float32).set(pl.Series(~grouped_mask), None))
    rep.groups = int(len(maxd))
    rep.near_groups = int(differs.sum())
    rep.in_groups = int(grouped_mask.sum())
    rep.marked_for_removal = int((grouped_mask & ~keep).sum())
    rep.largest_group = int(sizes.max()) if len(sizes) else 0
    big = np.flatnonzero(sizes > opts.max_group_size)
    rep.oversized_groups = [{"group": int(g), "size": int(sizes[g]), "max_distance": int(maxd[g])} for g in big]
    rep.method = opts.method
    rep.hash_mode = opts.hash_mode
    return frame.with_columns(cols)


def clip_embeddings(
    paths: Sequence[str],
    model: Any,
    preprocess: Callable[[Any], Any],
    device: str = "cpu",
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, list[str | None]]:
    """L2-normalised open_clip image embeddings (rows of zeros and an error where a file fails)."""
    import torch
    from PIL import Image

    embs: list[np.ndarray | None] = [None] * len(paths)
    errors: list[str | None] = [None] * len(paths)
    dim = None
    dev = torch.device(device)
    use_amp = dev.type == "cuda"
    model = model.to(dev).eval()
    for start in range(0, len(paths), batch_size):
        idx, tensors = [], []
        for i in range(start, min(start + batch_size, len(paths))):
            try:
                with Image.open(paths[i]) as im:
                    tensors.append(preprocess(im.convert("RGB")))
                idx.append(i)
            except Exception as e:  # noqa: BLE001 - a bad file is a row with a reason
                errors[i] = f"cannot decode image: {type(e).__name__}: {e}"
        if tensors:
            x = torch.stack(tensors).to(dev)
            with torch.inference_mode(), torch.autocast(dev.type, enabled=use_amp):
                f = model.encode_image(x).float()
            f = torch.nn.functional.normalize(f, dim=-1).cpu().numpy()
            dim = f.shape[1]
            for k, i in enumerate(idx):
                embs[i] = f[k]
        if progress:
            progress(min(batch_size, len(paths) - start))
    out = np.zeros((len(paths), dim or 1), np.float32)
    for i, vec in enumerate(embs):
        if vec is not None:
            out[i] = vec
    return out, errors


def load_clip(name: str, pretrained: str | None, device: str) -> tuple[Any, Callable[[Any], Any]]:
    """An open_clip model and its image transform, by model name and pretrained tag or path."""
    import open_clip  # type: ignore[import-untyped]

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    except Exception as e:  # noqa: BLE001 - unknown names, missing weights, no network
        raise HwError(f"cannot load open_clip model {name!r} (pretrained={pretrained!r}): {e}") from None
    return model, preprocess


def parse_apply(spec: str) -> tuple[str, Path]:
    """'move:DIR' or 'symlink:DIR' → (action, folder)."""
    action, sep, folder = spec.partition(":")
    if not sep or action not in ("move", "symlink") or not folder:
        raise HwError(f"--apply must be move:DIR or symlink:DIR, got {spec!r}")
    return action, Path(folder)


def _free_name(folder: Path, name: str, taken: set[Path]) -> Path:
    stem, suffix = os.path.splitext(name)
    cand = folder / name
    k = 1
    while cand in taken or os.path.lexists(cand):
        cand = folder / f"{stem}-{k}{suffix}"
        k += 1
    taken.add(cand)
    return cand


def plan_moves(frame: pl.DataFrame, folder: Path) -> list[tuple[int, str, Path]]:
    """(row, source path, target) for every row marked keep == False; targets never exist yet
    (a numbered name is chosen instead): DIR/group-NNNNNN/name."""
    from pycore.manifest import fs_paths

    paths = fs_paths(frame)
    rows = np.flatnonzero((frame["keep"] == False).fill_null(False).to_numpy())  # noqa: E712
    groups = frame["dup_group"].to_list()
    taken: set[Path] = set()
    return [(int(r), paths[r], _free_name(folder / f"group-{groups[r]:06d}", os.path.basename(paths[r]), taken))
            for r in rows]  # fmt: skip


def apply_moves(frame: pl.DataFrame, action: str, plan: list[tuple[int, str, Path]]) -> tuple[pl.DataFrame, list[str]]:
    """Move or symlink the planned files (never overwriting). Returns the frame with
    ``dup_moved_to`` (and status "duplicate_moved" for moved rows) and a list of problems."""
    moved_to: list[str | None] = frame["dup_moved_to"].to_list() if "dup_moved_to" in frame.columns else [None] * frame.height
    status = frame["status"].to_list()
    problems = []
    for row, src, dst in plan:
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            if os.path.lexists(dst):
                raise FileExistsError(f"{dst} exists")
            if action == "symlink":
                os.symlink(os.path.abspath(src), dst)
            else:
                # link + unlink is atomic and refuses to overwrite on one file system
                try:
                    os.link(src, dst)
                    os.unlink(src)
                except OSError as e:
                    if e.errno != 18:  # EXDEV: another file system, copy instead
                        raise
                    shutil.copy2(src, dst)
                    os.unlink(src)
                status[row] = "duplicate_moved"
            moved_to[row] = str(dst)
        except OSError as e:
            problems.append(f"{src}: {e}")
    return frame.with_columns(pl.Series("dup_moved_to", moved_to, dtype=pl.String),
                              pl.Series("status", status, dtype=pl.String)), problems  # fmt: skip


def _thumb(path: str, size: int) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as src:
            src.draft("RGB", (size, size))
            im = src.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=80)
        return base64.b64encode(buf.getvalue()).decode("ascii")
    except Exception:  # noqa: BLE001 - a missing thumbnail is shown as such
        return None


_CSS = """body{font-family:system-ui,sans-serif;margin:1em;background:#fafafa}
.group{background:#fff;border:1px solid #ccc;border-radius:6px;margin:0 0 1em;padding:.5em}
.group h2{font-size:1em;margin:.2em 0 .5em}.items{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0;width:180px;border:3px solid #d33;border-radius:4px;padding:4px;background:#fff}
figure.keep{border-color:#2a2}figcaption{font-size:12px;word-break:break-all}
.badge{font-weight:bold}.keep .badge{color:#2a2}.remove .badge{color:#d33}
img{max-width:170px;max-height:170px;display:block;margin:auto}.missing{height:60px;color:#888}"""


def render_review(frame: pl.DataFrame, thumb_size: int = 170, max_groups: int = 500, title: str = "hw dedup review") -> str:
    """A self-contained HTML page: every group's thumbnails side by side (largest groups first)."""
    from pycore.manifest import fs_paths

    g = frame.with_row_index("_row").filter(pl.col("dup_group").is_not_null())
    paths = fs_paths(frame)
    sizes = g.group_by("dup_group").len().sort(["len", "dup_group"], descending=[True, False])
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
           f"<p id='summary'>{sizes.height} group(s), {g.height} image(s), "
           f"{int((g['keep'] == False).sum())} marked for removal. Green = kept.</p>"]  # noqa: E712  # fmt: skip
    has_sim = "dup_similarity" in frame.columns
    for gid, size in sizes.head(max_groups).iter_rows():
        rows = g.filter(pl.col("dup_group") == gid).sort(["keep", "dup_distance"], descending=[True, False])
        first = rows.row(0, named=True)
        out.append(f"<section class='group' id='group-{gid}'><h2>group {gid}: {size} images, "
                   f"max internal distance {first['dup_max_distance']}"
                   f"{' (identical files)' if first['dup_exact'] else ''}</h2><div class='items'>")  # fmt: skip
        for r in rows.iter_rows(named=True):
            p = paths[r["_row"]]
            b64 = _thumb(p, thumb_size)
            cls = "keep" if r["keep"] else "remove"
            img = (f"<img src='data:image/jpeg;base64,{b64}' alt='{html.escape(os.path.basename(p), quote=True)}'>"
                   if b64 else "<div class='missing'>no preview</div>")  # fmt: skip
            extra = f", similarity {r['dup_similarity']:.3f}" if has_sim and r.get("dup_similarity") is not None else ""
            size_txt = f"{r['width']}×{r['height']}" if r.get("width") is not None else ""
            out.append(f"<figure class='{cls}'>{img}<figcaption><span class='badge'>{'KEEP' if r['keep'] else 'remove'}"
                       f"</span> distance {r['dup_distance']}{extra} {size_txt}<br>"
                       f"<span class='name' title='{html.escape(r['path'], quote=True)}'>{html.escape(r['path'])}</span>"
                       f"</figcaption></figure>")  # fmt: skip
        out.append("</div></section>")
    if sizes.height > max_groups:
        out.append(f"<p>… {sizes.height - max_groups} more group(s) not shown.</p>")
    out.append("</body></html>")
    return "\n".join(out)
