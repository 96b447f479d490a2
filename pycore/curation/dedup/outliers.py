"""Outliers: the images least like the rest of the set, scored and ranked.

- With CLIP embeddings (``--method clip``): the score is 1 − the mean cosine similarity to the
  image's ``k`` nearest neighbours (exhaustive, block by block; against a fixed random sample of
  at most :data:`MAX_REFERENCE` images on larger sets).
- Otherwise, from the quality statistics and the hash space: each feature — log(1 + sharpness),
  luma mean, luma spread, colourfulness, clipped shares, and the phash's bit surprisal (−Σ log of
  the set's frequency of each of the row's 64 bit values: unusual global structure) — becomes a
  robust z-score (median, 1.4826 · MAD); the score is the root mean square of those z-scores.

Rank 1 is the most unusual image. Rows that are not ok get neither.
"""

from __future__ import annotations

import numpy as np
import polars as pl

#: Neighbours in the CLIP score.
K_NEIGHBOURS = 10
#: Largest reference set for the CLIP k-NN score (memory and time stay O(n · this)).
MAX_REFERENCE = 20_000
STAT_FEATURES = ("q_sharpness", "q_luma_mean", "q_luma_std", "q_colorfulness", "q_clip_low", "q_clip_high")


def knn_scores(emb: np.ndarray, k: int = K_NEIGHBOURS, block: int = 2048, seed: int = 0) -> np.ndarray:
    """1 − mean cosine similarity to the k nearest other rows (rows L2-normalised)."""
    n = emb.shape[0]
    if n < 2:
        return np.zeros(n, np.float32)
    e = np.ascontiguousarray(emb, np.float32)
    ref_idx = np.arange(n) if n <= MAX_REFERENCE else np.sort(np.random.default_rng(seed).choice(n, MAX_REFERENCE, replace=False))
    ref = e[ref_idx]
    kk = min(k, len(ref_idx) - 1)
    out = np.empty(n, np.float32)
    for a in range(0, n, block):
        sim = e[a : a + block] @ ref.T
        # a row never counts as its own neighbour
        rows, cols = np.nonzero(ref_idx[None, :] == np.arange(a, min(a + block, n))[:, None])
        sim[rows, cols] = -np.inf
        top = np.partition(sim, sim.shape[1] - kk, axis=1)[:, -kk:]
        out[a : a + block] = 1.0 - top.mean(axis=1)
    return out


def robust_z(x: np.ndarray) -> np.ndarray:
    """(x − median) / (1.4826 · MAD), falling back to the standard deviation when MAD is 0;
    zeros when the feature does not vary."""
    med = np.median(x)
    s = 1.4826 * np.median(np.abs(x - med))
    if s == 0:
        s = float(x.std())
    return np.zeros_like(x) if s == 0 else (x - med) / s


def hash_surprisal(hashes: np.ndarray) -> np.ndarray:
    """−Σ_b log p_b(bit value) over the 64 phash bits, p_b the set's frequency (Laplace-smoothed)."""
    bits = ((hashes[:, None] >> np.arange(64, dtype=np.uint64)[None, :]) & np.uint64(1)).astype(np.float64)
    p1 = (bits.sum(axis=0) + 1) / (len(hashes) + 2)
    return -(bits * np.log(p1) + (1 - bits) * np.log(1 - p1)).sum(axis=1)


def stats_scores(frame: pl.DataFrame) -> np.ndarray:
    """RMS robust z over the statistics and the hash surprisal, for the frame's rows (all ok)."""
    from pycore.curation.dedup.hashing import parse_hex64

    feats = []
    for c in STAT_FEATURES:
        if c in frame.columns:
            v = frame[c].cast(pl.Float64).fill_null(np.nan).to_numpy()
            v = np.where(np.isfinite(v), v, np.nanmedian(v) if np.isfinite(v).any() else 0.0)
            feats.append(robust_z(np.log1p(np.maximum(v, 0)) if c == "q_sharpness" else v))
    if "phash" in frame.columns and frame.height:
        feats.append(robust_z(hash_surprisal(parse_hex64(frame["phash"].to_list()))))
    if not feats:
        return np.zeros(frame.height, np.float32)
    return np.sqrt(np.mean(np.square(np.stack(feats, axis=1)), axis=1)).astype(np.float32)


def add_outliers(frame: pl.DataFrame, embeddings: np.ndarray | None = None) -> tuple[pl.DataFrame, str]:
    """Add ``q_outlier_score`` and ``q_outlier_rank``; returns the method used."""
    n = frame.height
    ok = ((frame["status"] == "ok") & frame["phash"].is_not_null()).to_numpy()
    idx = np.flatnonzero(ok)
    score = np.full(n, np.nan, np.float32)
    if embeddings is not None:
        method = f"clip-knn (k={K_NEIGHBOURS})"
        score[idx] = knn_scores(embeddings[idx])
    else:
        method = "stats+hash (rms robust z)"
        score[idx] = stats_scores(frame[idx.tolist()])
    rank = np.zeros(n, np.int32)
    order = idx[np.argsort(-score[idx], kind="stable")]
    rank[order] = np.arange(1, len(order) + 1, dtype=np.int32)
    return frame.with_columns(
        pl.Series("q_outlier_score", score, dtype=pl.Float32).set(pl.Series(~ok), None),
        pl.Series("q_outlier_rank", rank, dtype=pl.Int32).set(pl.Series(~ok), None),
    ), method
