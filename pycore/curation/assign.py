"""Assigning aspect-ratio buckets to a manifest frame and summarising the result.

Assignment runs in Rust (:func:`pycore._rust.assign_buckets`): the nearest bucket by
log-ratio distance (ties: nearest area, then table order), scale to cover, crop centred or at a
seeded random offset. Rows already failed for another reason (unreadable, not an image, ...)
keep their status and get no bucket; rows rejected by an earlier bucketing are re-evaluated.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import polars as pl

from pycore import _rust
from pycore.curation.tables import BucketTable
from pycore.errors import HwError
from pycore.manifest import BUCKET_STATUSES, fs_paths, status_code, status_names

SMALL_POLICIES = ("upscale", "own", "reject")


@dataclass(frozen=True)
class BucketOptions:
    """How images are fitted to buckets."""

    #: Images smaller than their bucket: "upscale" them, give them their "own" bucket (their
    #: size floored to `step`, like kohya's bucket_no_upscale), or "reject" them.
    small: str = "upscale"
    #: Side multiple of "own" buckets.
    step: int = 64
    #: Reject images whose shorter side is below this (status "too_small").
    min_side: int = 0
    #: Reject (or flag, with flag_only) images losing more than this share of pixels to the crop.
    max_crop: float | None = None
    flag_only: bool = False
    #: Random crop offsets from this seed; centred crops when None.
    seed: int | None = None
    threads: int = 0

    def __post_init__(self) -> None:
        if self.small not in SMALL_POLICIES:
            raise HwError(f"small-image policy must be one of {', '.join(SMALL_POLICIES)}, not {self.small!r}")
        if self.step < 1:
            raise HwError("--step must be at least 1")
        if self.min_side < 0:
            raise HwError("--min-side must be 0 or more")
        if self.max_crop is not None and not 0.0 <= self.max_crop < 1.0:
            raise HwError("--max-crop must be a fraction in [0, 1)")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise HwError("--seed must be in [0, 2^64)")


BUCKET_COLUMNS = ("bucket_width", "bucket_height", "scale", "scaled_width", "scaled_height",
                  "crop_left", "crop_top", "crop_fraction", "upscaled", "crop_flagged")  # fmt: skip


def assign(frame: pl.DataFrame, table: BucketTable, opts: BucketOptions) -> pl.DataFrame:
    """Return the frame with bucket columns (re)computed and bucketing statuses updated."""
    if "width" not in frame.columns or "height" not in frame.columns:
        raise HwError("manifest has no width/height columns; bucket the image folder instead")
    eligible = (
        pl.col("status").is_in(["ok", *BUCKET_STATUSES])
        & pl.col("width").is_not_null()
        & pl.col("height").is_not_null()
        & (pl.col("width") > 0)
        & (pl.col("height") > 0)
    )
    mask = frame.select(eligible.fill_null(False)).to_series().to_numpy()
    w = np.where(mask, frame["width"].fill_null(0).to_numpy(), 0).astype(np.uint32)
    h = np.where(mask, frame["height"].fill_null(0).to_numpy(), 0).astype(np.uint32)
    if opts.seed is not None:
        keys = _rust.path_keys(fs_paths(frame))
    else:
        keys = np.zeros(len(frame), dtype=np.uint64)
    try:
        out = _rust.assign_buckets(
            list(table.sizes), w, h, keys, opts.small, opts.step, opts.min_side,
            opts.max_crop, opts.flag_only, opts.seed, opts.threads,
        )  # fmt: skip
    except ValueError as e:
        raise HwError(str(e)) from None
    assigned = out["assigned"]  # False: size unknown, the row keeps its status
    new_status = status_names(out["status_code"])
    status = pl.select(pl.when(pl.Series(assigned)).then(new_status).otherwise(frame["status"]).alias("status")).to_series()
    ok = assigned & (out["status_code"] == status_code("ok"))
    rejected = assigned & ~ok
    cols = [status]
    for name in BUCKET_COLUMNS[:-1]:
        series = pl.Series(name, out[name])
        cols.append(series)
    cols.append(pl.Series("crop_flagged", out["flagged"]))
    frame = frame.with_columns(cols)
    okm = pl.Series(ok)
    int_cols = ("bucket_width", "bucket_height", "scaled_width", "scaled_height", "crop_left", "crop_top")
    return frame.with_columns(
        *[pl.when(okm).then(pl.col(c).cast(pl.Int32)).alias(c) for c in int_cols],
        *[pl.when(okm).then(pl.col(c)).alias(c) for c in ("scale", "crop_fraction", "upscaled", "crop_flagged")],
        # A bucketing rejection explains itself in `error`; an ok row has none from bucketing.
        pl.when(pl.Series(rejected))
        .then(pl.lit("rejected by bucketing: ") + pl.col("status"))
        .when(pl.Series(ok))
        .then(pl.lit(None, dtype=pl.String))
        .otherwise(pl.col("error") if "error" in frame.columns else pl.lit(None, dtype=pl.String))
        .alias("error"),
    )


@dataclass
class BucketReport:
    table: str
    total_rows: int
    ok: int
    rejected: dict[str, int]
    buckets: list[dict]
    upscaled: int
    flagged: int
    rotated: int
    mean_crop_fraction: float
    skipped_files: dict[str, int]
    problems: list[tuple[str, str]]
    off_grid: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def report(
    frame: pl.DataFrame,
    table: BucketTable,
    *,
    skipped: dict[str, int] | None = None,
    problems: list[tuple[str, str]] | None = None,
    off_grid: list[tuple[int, int]] | None = None,
) -> BucketReport:
    """Counts per bucket (every table size, empty ones too), rejections by reason, extras."""
    ok = frame.filter(pl.col("status") == "ok")
    counts = {
        (r["bucket_width"], r["bucket_height"]): r["len"]
        for r in ok.group_by("bucket_width", "bucket_height").len().iter_rows(named=True)
    }
    n_ok = len(ok)
    sizes = list(table.sizes) + sorted(s for s in counts if s not in table.sizes)
    buckets = []
    for bw, bh in sizes:
        c = counts.get((bw, bh), 0)
        buckets.append({
            "width": bw, "height": bh, "aspect": round(bw / bh, 4), "count": c,
            "share": c / n_ok if n_ok else 0.0, "in_table": (bw, bh) in table.sizes,
        })  # fmt: skip
    buckets.sort(key=lambda b: (-b["count"], b["aspect"]))
    rejected = {
        r["status"]: r["len"]
        for r in frame.filter(pl.col("status") != "ok").group_by("status").len().sort("len", descending=True).iter_rows(named=True)
    }
    rotated = 0
    if "orientation" in frame.columns:
        rotated = ok.filter(pl.col("orientation").is_not_null() & (pl.col("orientation") != 1)).height
    mean_crop = ok["crop_fraction"].mean() if n_ok else 0.0
    return BucketReport(
        table=table.name,
        total_rows=len(frame),
        ok=n_ok,
        rejected=rejected,
        buckets=buckets,
        upscaled=int(ok["upscaled"].sum()) if n_ok else 0,
        flagged=int(ok["crop_flagged"].sum()) if n_ok else 0,
        rotated=rotated,
        mean_crop_fraction=float(mean_crop) if mean_crop is not None and not math.isnan(mean_crop) else 0.0,
        skipped_files=dict(skipped or {}),
        problems=list(problems or []),
        off_grid=[f"{w}x{h}" for w, h in (off_grid or [])],
    )


def merge_reports(reports: list[BucketReport], table: BucketTable) -> BucketReport:
    """One report for a manifest bucketed part by part (the same counts :func:`report` gives for
    the whole table at once)."""
    if len(reports) == 1:
        return reports[0]
    counts: dict[tuple[int, int], int] = {}
    rejected: dict[str, int] = {}
    for r in reports:
        for b in r.buckets:
            counts[(b["width"], b["height"])] = counts.get((b["width"], b["height"]), 0) + b["count"]
        for k, v in r.rejected.items():
            rejected[k] = rejected.get(k, 0) + v
    n_ok = sum(r.ok for r in reports)
    sizes = list(table.sizes) + sorted(s for s in counts if s not in table.sizes)
    buckets = [{"width": w, "height": h, "aspect": round(w / h, 4), "count": counts.get((w, h), 0),
                "share": counts.get((w, h), 0) / n_ok if n_ok else 0.0, "in_table": (w, h) in table.sizes}
               for w, h in sizes]  # fmt: skip
    buckets.sort(key=lambda b: (-b["count"], b["aspect"]))
    crop = sum(r.mean_crop_fraction * r.ok for r in reports) / n_ok if n_ok else 0.0
    first = reports[0]
    return BucketReport(
        table=table.name, total_rows=sum(r.total_rows for r in reports), ok=n_ok,
        rejected=dict(sorted(rejected.items(), key=lambda kv: -kv[1])), buckets=buckets,
        upscaled=sum(r.upscaled for r in reports), flagged=sum(r.flagged for r in reports),
        rotated=sum(r.rotated for r in reports), mean_crop_fraction=crop, skipped_files=first.skipped_files,
        problems=first.problems, off_grid=first.off_grid,
    )  # fmt: skip
