"""Assigning aspect-ratio buckets to a manifest frame and summarising the result.

Assignment runs in Rust (:func:`pycore._rust.assign_buckets`): the nearest bucket by
log-ratio distance (ties: nearest area, then table order), scale to cover, crop centred or at a
seeded random offset. Rows already failed for another reason (unreadable, not an image, ...)
keep their status and get no bucket; rows rejected by an earlier bucketing are re-evaluated.
The counts of the report come from Rust too (:func:`pycore._rust.bucket_summary`), the same
code that counts a folder's rows in ``hw bucket DIR``'s fast path (:class:`pycore._rust.BucketRows`),
so this module imports Polars and NumPy only inside :func:`assign` and :func:`report`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from pycore import _rust
from pycore.curation.tables import BucketTable
from pycore.errors import HwError

if TYPE_CHECKING:
    import polars as pl

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
    import numpy as np
    import polars as pl

    from pycore.manifest import fs_paths, status_code, status_names

    if "width" not in frame.columns or "height" not in frame.columns:
        raise HwError("manifest has no width/height columns; bucket the image folder instead")
    # Which rows are bucketed is Rust's decision (status ok or an earlier bucketing's, size known).
    codes = status_codes(frame["status"])
    w = frame["width"].fill_null(0).clip(0).cast(pl.UInt32).to_numpy()
    h = frame["height"].fill_null(0).clip(0).cast(pl.UInt32).to_numpy()
    if opts.seed is not None:
        keys = _rust.path_keys(fs_paths(frame))
    else:
        keys = np.zeros(len(frame), dtype=np.uint64)
    try:
        out = _rust.assign_buckets(
            list(table.sizes), w, h, keys, opts.small, opts.step, opts.min_side,
            opts.max_crop, opts.flag_only, opts.seed, opts.threads, status_codes=codes,
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
        .then(pl.lit(_rust.REJECTED_BY_BUCKETING) + pl.col("status"))
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


def status_codes(status: pl.Series):  # noqa: ANN201 (a NumPy uint8 array)
    """Rust status codes of a ``status`` column (the manifest was validated: every name is known)."""
    import polars as pl

    from pycore.manifest import STATUSES

    return status.replace_strict(list(STATUSES), list(range(len(STATUSES))), return_dtype=pl.UInt8).to_numpy()


def report(
    frame: pl.DataFrame,
    table: BucketTable,
    *,
    skipped: dict[str, int] | None = None,
    problems: list[tuple[str, str]] | None = None,
    off_grid: list[tuple[int, int]] | None = None,
) -> BucketReport:
    """Counts per bucket (every table size, empty ones too), rejections by reason, extras."""
    import polars as pl

    ok = pl.col("status") == "ok"

    def col(name: str, dtype: pl.DataType, fill: object):  # noqa: ANN202
        if name not in frame.columns:
            return pl.Series([fill] * len(frame), dtype=dtype).to_numpy()
        return frame.select(pl.when(ok).then(pl.col(name)).fill_null(fill).cast(dtype)).to_series().to_numpy()

    summary = _rust.bucket_summary(
        status_codes(frame["status"]), col("bucket_width", pl.UInt32, 0), col("bucket_height", pl.UInt32, 0),
        col("upscaled", pl.Boolean, False), col("crop_flagged", pl.Boolean, False),
        col("orientation", pl.UInt8, 0), col("crop_fraction", pl.Float64, 0.0),
    )  # fmt: skip
    return report_from_summary(summary, table, skipped=skipped, problems=problems, off_grid=off_grid)


def report_from_summary(
    summary: dict,
    table: BucketTable,
    *,
    skipped: dict[str, int] | None = None,
    problems: list[tuple[str, str]] | None = None,
    off_grid: list[tuple[int, int]] | None = None,
) -> BucketReport:
    """The report from Rust's counts (``bucket_summary`` / ``BucketRows.summary``)."""
    counts = {tuple(size): n for size, n in summary["buckets"]}
    n_ok = summary["ok"]
    sizes = list(table.sizes) + sorted(s for s in counts if s not in table.sizes)
    buckets = []
    for bw, bh in sizes:
        c = counts.get((bw, bh), 0)
        buckets.append({
            "width": bw, "height": bh, "aspect": round(bw / bh, 4), "count": c,
            "share": c / n_ok if n_ok else 0.0, "in_table": (bw, bh) in table.sizes,
        })  # fmt: skip
    buckets.sort(key=lambda b: (-b["count"], b["aspect"]))
    return BucketReport(
        table=table.name,
        total_rows=summary["rows"],
        ok=n_ok,
        rejected=dict(summary["not_ok"]),
        buckets=buckets,
        upscaled=summary["upscaled"],
        flagged=summary["flagged"],
        rotated=summary["rotated"],
        mean_crop_fraction=summary["mean_crop"],
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
