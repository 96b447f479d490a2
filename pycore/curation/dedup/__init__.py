"""Exact and near-duplicate detection, image quality statistics and outliers (`hw dedup`).

The entry point is :func:`run_dedup` (a :class:`DedupRequest` in, a :class:`DedupResult` out).
Each step is also a function of its own module:

- :mod:`.hashing` — perceptual hashes (bit-identical to ``imagehash``) and, from the same decode,
  quality statistics (:mod:`.quality` defines them), in Rust and in parallel;
- :mod:`.groups` — near pairs (multi-index hashing, exact), connected groups, the kept image;
- :mod:`.quality` — flags with reasons from thresholds chosen from the set (robust z-scores);
- :mod:`.outliers` — the images least like the rest, scored and ranked;
- :mod:`.moves` — ``--apply move:DIR`` / ``symlink:DIR``; :mod:`.review` — the HTML page and histograms;
- :mod:`.clip` — open_clip embeddings for ``--method clip``.

Hashes are stored as 16 lower-case hex digits, exactly ``str(imagehash.phash(img))``.
"""

from pycore.curation.dedup.groups import assign_groups, cosine_pairs, near_pairs
from pycore.curation.dedup.hashing import compute_hashes, hash_paths, hex64, parse_hex64, popcount64
from pycore.curation.dedup.moves import apply_moves, parse_apply, plan_moves
from pycore.curation.dedup.options import (
    DEFAULT_CLIP_THRESHOLD,
    DEFAULT_THRESHOLD,
    FAST_MIN_SIDE,
    HASH_MODES,
    KEEP_POLICY,
    METHODS,
    DedupOptions,
    DedupReport,
)
from pycore.curation.dedup.quality import QualityThresholds, image_stats, quality_flags
from pycore.curation.dedup.review import histograms_svg, render_review
from pycore.curation.dedup.run import DedupRequest, DedupResult, run_dedup


def clip_embeddings(*args, **kwargs):  # type: ignore[no-untyped-def]
    """:func:`pycore.curation.dedup.clip.clip_embeddings` (imported on use: torch is heavy)."""
    from pycore.curation.dedup.clip import clip_embeddings as f

    return f(*args, **kwargs)


def load_clip(*args, **kwargs):  # type: ignore[no-untyped-def]
    """:func:`pycore.curation.dedup.clip.load_clip` (imported on use)."""
    from pycore.curation.dedup.clip import load_clip as f

    return f(*args, **kwargs)


__all__ = [
    "DEFAULT_CLIP_THRESHOLD", "DEFAULT_THRESHOLD", "FAST_MIN_SIDE", "HASH_MODES", "KEEP_POLICY", "METHODS",
    "DedupOptions", "DedupReport", "DedupRequest", "DedupResult", "QualityThresholds", "apply_moves",
    "assign_groups", "clip_embeddings", "compute_hashes", "cosine_pairs", "hash_paths", "hex64", "histograms_svg",
    "image_stats", "load_clip", "near_pairs", "parse_apply", "parse_hex64", "plan_moves", "popcount64",
    "quality_flags", "render_review", "run_dedup",
]  # fmt: skip
