"""Which rows to caption, which requests are still missing, and the quality-word mapping."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from pycore.caption.schema import QUALITY_WORDS
from pycore.errors import HwError


@dataclass
class Plan:
    """Row i's key (content hash), the rows to caption, the rows kept, and why others are skipped."""

    keys: list[str | None]
    todo: set[int]
    keep: set[int]
    skip_reasons: dict[int, str]
    unique: dict[str, str] = field(default_factory=dict)  # key → first path with that content
    hashed: int = 0  # hashes computed here (manifest written with --no-hash)

    @property
    def duplicates(self) -> int:
        return len(self.todo) - len(self.unique)


def plan_rows(frame: pl.DataFrame, *, overwrite: bool = False, threads: int = 0) -> Plan:
    """Decide per row: caption it (status ok), keep its existing caption, or skip it with a reason.

    Byte-identical files share one request (same content hash). Rows without a hash (a manifest
    from ``hw bucket --no-hash``) are hashed here with the same xxh3-128.
    """
    from pycore.manifest import fs_paths

    n = frame.height
    paths = fs_paths(frame)
    status = frame["status"].to_list()
    keys: list[str | None] = frame["content_hash"].to_list() if "content_hash" in frame.columns else [None] * n
    old_status = frame["caption_status"].to_list() if "caption_status" in frame.columns else [None] * n
    old_caption = frame["caption"].to_list() if "caption" in frame.columns else [None] * n
    keep: set[int] = set()
    todo: set[int] = set()
    skip: dict[int, str] = {}
    need_hash = [i for i in range(n) if status[i] == "ok" and not keys[i]]
    hashed = 0
    if need_hash:
        from pycore.sources import content_hashes  # files, tar members, Parquet cells

        got = content_hashes([paths[i] for i in need_hash], threads=threads)
        for j, i in enumerate(need_hash):
            h = got[j]
            if h:
                keys[i] = h
                hashed += 1
    for i in range(n):
        if status[i] != "ok":
            skip[i] = f"image status {status[i]}"
        elif not keys[i]:
            skip[i] = "cannot read the file to hash it"
        elif not overwrite and old_status[i] == "ok" and old_caption[i]:
            keep.add(i)
        else:
            todo.add(i)
    unique: dict[str, str] = {}
    for i in sorted(todo):
        unique.setdefault(keys[i], paths[i])  # type: ignore[arg-type]
    return Plan(keys=keys, todo=todo, keep=keep, skip_reasons=skip, unique=unique, hashed=hashed)


def missing(plan: Plan, records: dict[str, dict[str, Any]], *, retry_failed: bool = False) -> list[tuple[str, str]]:
    """(key, path) of unique images without a finished record (failed ones too with retry_failed)."""
    out = []
    for key, path in plan.unique.items():
        rec = records.get(key)
        if rec is None or (retry_failed and rec["status"] != "ok"):
            out.append((key, path))
    return out


# ------------------------------------------------------------------------------------------
# Quality words from scores

#: Default percentile cuts: ≤10 % worst, ≤25 % low, ≤75 % average, ≤95 % best, above masterpiece.
DEFAULT_PERCENTILES: tuple[float, float, float, float] = (10.0, 25.0, 75.0, 95.0)


@dataclass
class QualityMapping:
    """Map aesthetic scores to the five quality words.

    By dataset percentile (default; ``percentiles`` are the four upper bounds, in %, of worst,
    low, average and best quality) or, with ``scores``, by four absolute score thresholds (e.g.
    on the LAION predictor's 1–10 scale: 4,5,6,6.5).
    """

    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    scores: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for name, cuts in (("quality percentiles", self.percentiles), ("quality scores", self.scores)):
            if cuts is None:
                continue
            cuts = tuple(float(c) for c in cuts)
            if len(cuts) != 4:
                raise HwError(f"{name} need exactly 4 increasing values (got {len(cuts)})")
            if any(b <= a for a, b in zip(cuts, cuts[1:], strict=False)):
                raise HwError(f"{name} must be strictly increasing (got {', '.join(f'{c:g}' for c in cuts)})")
            if name == "quality percentiles" and not (0 < cuts[0] and cuts[-1] < 100):
                raise HwError(f"quality percentiles must lie strictly between 0 and 100 (got {', '.join(f'{c:g}' for c in cuts)})")
        self.percentiles = tuple(float(c) for c in self.percentiles)
        if self.scores is not None:
            self.scores = tuple(float(c) for c in self.scores)

    def words(self, scores: dict[str, float]) -> dict[str, str]:
        """key → quality word for every scored key."""
        if not scores:
            return {}
        if self.scores is not None:
            return {k: QUALITY_WORDS[bisect.bisect_right(self.scores, s)] for k, s in scores.items()}
        vals = sorted(scores.values())
        n = len(vals)
        out = {}
        for k, s in scores.items():
            below = bisect.bisect_left(vals, s)
            equal = bisect.bisect_right(vals, s) - below
            pct = 100.0 * (below + 0.5 * equal) / n  # mid-rank percentile: ties share a word
            out[k] = QUALITY_WORDS[bisect.bisect_left(self.percentiles, pct)]
        return out


def distribution(words: Sequence[str | None]) -> dict[str, int]:
    return {w: sum(1 for x in words if x == w) for w in QUALITY_WORDS}
