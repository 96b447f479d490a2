"""Image quality statistics and the flags drawn from them (``hw dedup``, on by default).

The statistics are computed in Rust in the same decode as the perceptual hash
(``rust_ext/src/quality.rs``). :func:`image_stats` is the same definition written with NumPy: it
serves the files the Rust decoders do not read (GIF, WebP, … via Pillow) and is the reference the
tests check the Rust numbers against. Definitions: data_manifests/manifest_schema.md.

:func:`quality_flags` marks rows with reasons (``blurry``, ``overexposed``, …). Every threshold
can be set; by default each comes from the set itself — a robust z-score bound (median ± k · 1.4826
· MAD) — combined with an absolute guard so a tight, healthy set does not get half its rows
flagged. Flags never move or delete anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from pycore.checks import check_float

#: Shorter side of the working image for sharpness (never upscaled) — rust_ext/src/quality.rs.
WORK_SIDE = 128
#: The statistics grid (every k-th row and column, k = max(1, shorter side // GRID_ROWS)) on which
#: the luma and colour statistics are taken.
GRID_ROWS = 64
CLIP_LOW = 5
CLIP_HIGH = 250
GRAY_CHROMA = 2.0

#: The columns the statistics add, with their Polars types.
STAT_COLUMNS: dict[str, Any] = {
    "q_sharpness": pl.Float32, "q_luma_mean": pl.Float32, "q_luma_std": pl.Float32, "q_clip_low": pl.Float32,
    "q_clip_high": pl.Float32, "q_colorfulness": pl.Float32, "q_grayscale": pl.Boolean, "q_jpeg_quality": pl.Int16,
}  # fmt: skip
#: Rust result key → column.
RUST_KEYS = {"sharpness": "q_sharpness", "luma_mean": "q_luma_mean", "luma_std": "q_luma_std",
             "clip_low": "q_clip_low", "clip_high": "q_clip_high", "colorfulness": "q_colorfulness",
             "grayscale": "q_grayscale", "jpeg_quality": "q_jpeg_quality"}  # fmt: skip


def pillow_luma(rgb: np.ndarray) -> np.ndarray:
    """Pillow's ``convert("L")`` of an RGB uint8 array: (19595 R + 38470 G + 7471 B + 2^15) >> 16."""
    r, g, b = (rgb[..., k].astype(np.uint32) for k in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def work_size(w: int, h: int) -> tuple[int, int]:
    short = min(w, h)
    if short <= WORK_SIDE:
        return w, h
    return max(1, (w * WORK_SIDE + short // 2) // short), max(1, (h * WORK_SIDE + short // 2) // short)


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights: output i averages the input interval [i·s, (i+1)·s), s = n_in/n_out."""
    s = n_in / n_out
    a = np.arange(n_out)[:, None] * s
    j = np.arange(n_in)[None, :]
    return np.clip(np.minimum(j + 1, a + s) - np.maximum(j, a), 0, None) / s


def working_image(luma: np.ndarray) -> np.ndarray:
    h, w = luma.shape
    ow, oh = work_size(w, h)
    x = luma.astype(np.float64)
    if (ow, oh) == (w, h):
        return x
    return _area_matrix(h, oh) @ x @ _area_matrix(w, ow).T


def sharpness(luma: np.ndarray) -> float:
    """Population variance of the 4-neighbour Laplacian over the working image's interior."""
    x = working_image(luma)
    if x.shape[0] < 3 or x.shape[1] < 3:
        return 0.0
    lap = x[:-2, 1:-1] + x[2:, 1:-1] + x[1:-1, :-2] + x[1:-1, 2:] - 4 * x[1:-1, 1:-1]
    return float(lap.var())


def colorfulness(rgb: np.ndarray) -> float:
    """Hasler & Süsstrunk (2003): sqrt(σ_rg² + σ_yb²) + 0.3 · sqrt(μ_rg² + μ_yb²)."""
    x = rgb.reshape(-1, 3).astype(np.float64)
    rg = x[:, 0] - x[:, 1]
    yb = 0.5 * (x[:, 0] + x[:, 1]) - x[:, 2]
    return float(math.hypot(rg.std(), yb.std()) + 0.3 * math.hypot(rg.mean(), yb.mean()))


def grid_step(h: int, w: int) -> int:
    return max(1, min(h, w) // GRID_ROWS)


def image_stats(rgb: np.ndarray, jpeg_quality: int | None = None) -> dict[str, Any]:
    """Every statistic of an RGB (H×W×3) or gray (H×W) uint8 image, keyed by column name:
    sharpness on the whole luma, the others on the statistics grid."""
    k = grid_step(*rgb.shape[:2])
    if rgb.ndim == 2:
        luma, chroma, cf = rgb, 0.0, 0.0
    else:
        rgb = rgb[..., :3]
        luma = pillow_luma(rgb)
        g = rgb[::k, ::k]
        chroma = float((g.max(axis=-1).astype(np.int16) - g.min(axis=-1)).mean())
        cf = colorfulness(g)
    grid = luma[::k, ::k]
    lf = grid.astype(np.float64)
    return {"q_sharpness": sharpness(luma), "q_luma_mean": float(lf.mean()), "q_luma_std": float(lf.std()),
            "q_clip_low": float((grid <= CLIP_LOW).mean()), "q_clip_high": float((grid >= CLIP_HIGH).mean()),
            "q_colorfulness": cf, "q_grayscale": chroma <= GRAY_CHROMA, "q_jpeg_quality": jpeg_quality}  # fmt: skip


_STD_LUMA = np.array([16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
                      14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113,
                      92, 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99])  # fmt: skip


def estimate_jpeg_quality(luma_table: np.ndarray) -> int:
    """The IJG quality whose scaled standard luminance table is nearest (natural order, 64 values)."""
    best = (math.inf, 0)
    for q in range(1, 101):
        scale = 5000 // q if q < 50 else 200 - 2 * q
        t = np.clip((_STD_LUMA * scale + 50) // 100, 1, 255)
        d = float(np.abs(t - luma_table).sum())
        if d <= best[0]:
            best = (d, q)
    return best[1]


def pillow_stats(path: str) -> dict[str, Any]:
    """:func:`image_stats` of a file Pillow opens (the fallback for formats Rust does not decode)."""
    from pycore.sources import open_image

    with open_image(path) as im:
        im.load()
        q = None
        tables = getattr(im, "quantization", None)
        if im.format == "JPEG" and tables:
            q = estimate_jpeg_quality(np.array(tables[0]))  # Pillow gives natural order
        rgb = np.asarray(im.convert("L") if im.mode in ("L", "I;16", "1") else im.convert("RGB"))
    return image_stats(rgb, q)


# ---- flags ----


@dataclass(frozen=True)
class FlagRule:
    """A flag: ``column`` below (``low``) or above the threshold. The default threshold is the
    set's robust bound clamped between ``never`` (a value not past it is never flagged: keeps a
    tight, healthy set from being half flagged) and ``always`` (a value past it is always flagged:
    keeps a very mixed set from flagging nothing); None = unclamped on that side."""

    reason: str
    column: str
    low: bool
    never: float | None
    always: float | None
    log: bool = False  #: robust statistics on log1p(value)


RULES = (
    FlagRule("blurry", "q_sharpness", True, None, None, log=True),
    FlagRule("underexposed", "q_luma_mean", True, 60.0, 30.0),
    FlagRule("overexposed", "q_luma_mean", False, 195.0, 225.0),
    FlagRule("crushed_shadows", "q_clip_low", False, 0.25, 0.5),
    FlagRule("blown_highlights", "q_clip_high", False, 0.25, 0.5),
    FlagRule("low_contrast", "q_luma_std", True, 30.0, 12.0),
    FlagRule("low_jpeg_quality", "q_jpeg_quality", True, 50.0, 30.0),
)
REASONS = tuple(r.reason for r in RULES) + ("grayscale",)


@dataclass
class QualityThresholds:
    """Flag thresholds. ``overrides`` maps a reason to a fixed threshold in the column's units;
    the others are chosen from the set: the robust bound at ``z`` MADs, made no stricter than the
    rule's absolute guard."""

    z: float = 3.5
    overrides: dict[str, float] = field(default_factory=dict)
    flag_grayscale: bool = True

    def __post_init__(self) -> None:
        self.z = check_float("--quality-z", self.z, 0.5, 50.0)
        for k, v in self.overrides.items():
            if k not in REASONS or k == "grayscale":
                raise_unknown(k)
            check_float(f"threshold for {k}", v, -1e12, 1e12)


def raise_unknown(reason: str) -> None:
    from pycore.errors import HwError

    raise HwError(f"unknown quality flag {reason!r}; one of {', '.join(r.reason for r in RULES)}")


def robust_bound(values: np.ndarray, z: float, low: bool, log: bool) -> float | None:
    """median ∓ z · 1.4826 · MAD (on log1p when ``log``), in the column's units; None when the
    spread is 0 or there are fewer than 8 values (no basis for "unusual")."""
    v = values[np.isfinite(values)]
    if len(v) < 8:
        return None
    x = np.log1p(np.maximum(v, 0)) if log else v
    med = float(np.median(x))
    sigma = 1.4826 * float(np.median(np.abs(x - med)))
    if sigma == 0:
        return None
    b = med - z * sigma if low else med + z * sigma
    return float(np.expm1(b)) if log else b


def thresholds_for(frame: pl.DataFrame, th: QualityThresholds) -> dict[str, dict[str, Any]]:
    """Each rule's threshold and how it was chosen: {reason: {threshold, source, column, direction}}."""
    out: dict[str, dict[str, Any]] = {}
    for r in RULES:
        if r.column not in frame.columns:
            continue
        direction = "below" if r.low else "above"
        if r.reason in th.overrides:
            out[r.reason] = {"threshold": th.overrides[r.reason], "source": "set by user", "column": r.column,
                             "direction": direction}  # fmt: skip
            continue
        ok = (frame["status"] == "ok") & frame[r.column].is_not_null()
        vals = frame.filter(ok)[r.column].cast(pl.Float64).to_numpy()
        b = robust_bound(vals, th.z, r.low, r.log)
        t, src = _clamp(r, b, th.z)
        if t is None:
            continue
        out[r.reason] = {"threshold": float(t), "source": src, "column": r.column, "direction": direction}  # type: ignore[arg-type]
    return out


def _clamp(r: FlagRule, b: float | None, z: float) -> tuple[float | None, str]:
    """The default threshold of rule ``r`` from the robust bound ``b`` and how it was chosen."""
    if b is None:
        return r.never, "fixed limit (no spread in the set)"
    lo, hi = (r.always, r.never) if r.low else (r.never, r.always)
    if lo is not None and b < lo:
        return lo, f"fixed limit ({'always' if r.low else 'never'} flag past {lo:g})"
    if hi is not None and b > hi:
        return hi, f"fixed limit ({'never' if r.low else 'always'} flag past {hi:g})"
    return b, f"median {'−' if r.low else '+'} {z:g} robust σ"


def quality_flags(frame: pl.DataFrame, th: QualityThresholds) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Add ``q_flags`` (list of reasons; empty when none; null for rows that are not ok) and
    return the thresholds used and the count per reason."""
    chosen = thresholds_for(frame, th)
    n = frame.height
    ok = (frame["status"] == "ok").to_numpy()
    reasons: list[list[str]] = [[] for _ in range(n)]
    counts: dict[str, int] = {}
    for r in RULES:
        if r.reason not in chosen:
            continue
        t = chosen[r.reason]["threshold"]
        v = frame[r.column].cast(pl.Float64).fill_null(np.nan).to_numpy()
        with np.errstate(invalid="ignore"):
            hit = ok & np.isfinite(v) & ((v < t) if r.low else (v > t))
        for i in np.flatnonzero(hit):
            reasons[i].append(r.reason)
        counts[r.reason] = int(hit.sum())
    if th.flag_grayscale and "q_grayscale" in frame.columns:
        g = ok & frame["q_grayscale"].fill_null(False).to_numpy()
        for i in np.flatnonzero(g):
            reasons[i].append("grayscale")
        counts["grayscale"] = int(g.sum())
    col = pl.Series("q_flags", [reasons[i] if ok[i] else None for i in range(n)], dtype=pl.List(pl.String))
    return frame.with_columns(col), {"thresholds": chosen, "counts": counts,
                                     "flagged": int(sum(1 for i in range(n) if ok[i] and reasons[i]))}  # fmt: skip
