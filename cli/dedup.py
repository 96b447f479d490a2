"""`hw dedup`: parse options into a DedupRequest, call pycore's run_dedup, render the result."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cli.common import BarProgress, Json, Out, Overwrite, Threads, console, print_json
from cli.scale_options import Ray, RayWorkers

HELP = """Find exact and near-duplicate images in a manifest (from `hw bucket`), mark which to keep,
and measure each image's quality in the same pass.

Exact duplicates share the content hash; near duplicates have 64-bit perceptual hashes (phash,
bit-identical to the `imagehash` package) within --threshold bits, found exactly by multi-index
hashing. Groups are connected components; in each group one image is kept: --keep-by COLUMN if
given, then the highest resolution, then the least processed encoding (camera format before a
re-saved PNG/WebP/…, higher JPEG quality, older file), then path order. The same decode gives
quality statistics (sharpness, brightness, contrast, colourfulness, clipped shares, JPEG quality,
grayscale) and an outlier score and rank; --quality flags rows with reasons. Files are never moved
unless --apply is given (and --dry-run shows what would happen).

Example:  hw dedup manifest.parquet -o deduped.parquet --quality --review review.html --keep-by q_sharpness
"""

_DUP = "Duplicates"
_QUAL = "Quality and outliers"
_CLIP = "CLIP method"
_OUT = "Output and actions"


def register(app: typer.Typer) -> None:
    app.command("dedup", help=HELP, no_args_is_help=True)(dedup)


def _threshold_pairs(values: list[str]) -> dict[str, float]:
    from pycore.errors import HwError

    out = {}
    for v in values:
        reason, sep, num = v.partition("=")
        try:
            out[reason.strip()] = float(num)
        except ValueError:
            raise HwError(f"--flag-threshold must be REASON=NUMBER (e.g. blurry=40), not {v!r}") from None
        if not sep:
            raise HwError(f"--flag-threshold must be REASON=NUMBER (e.g. blurry=40), not {v!r}")
    return out


def dedup(
    manifest: Annotated[Path, typer.Argument(help="A manifest .parquet written by `hw bucket` (rows with status ok are used).", show_default=False)],
    out: Out,
    threshold: Annotated[int | None, typer.Option("--threshold", "-t", help="Largest phash Hamming distance (0–32 bits of 64) for near duplicates. Default 10 (see README); with --method clip: --clip-threshold.", rich_help_panel=_DUP)] = None,
    hash_mode: Annotated[str, typer.Option("--hash-mode", help="exact: bit-identical to imagehash (full-size decode). fast: JPEGs decoded at 1/2–1/8 scale in the DCT domain.", rich_help_panel=_DUP)] = "exact",
    method: Annotated[str, typer.Option("--method", help="phash (perceptual hash) or clip (open_clip image embeddings, cosine similarity).", rich_help_panel=_DUP)] = "phash",
    keep_by: Annotated[str | None, typer.Option("--keep-by", help="Keep the image with the highest value of this numeric column (e.g. q_sharpness for the sharpest, or an aesthetic score).", rich_help_panel=_DUP)] = None,
    keep_ascending: Annotated[bool, typer.Option("--keep-ascending", help="With --keep-by: keep the lowest value instead.", rich_help_panel=_DUP)] = False,
    max_group_size: Annotated[int, typer.Option("--max-group-size", help="Warn about groups larger than this (chained near-duplicates; try a lower threshold).", rich_help_panel=_DUP)] = 1000,
    stats: Annotated[bool, typer.Option("--stats/--no-stats", help="Quality statistics (q_* columns) and outlier scores from the same decode.", rich_help_panel=_QUAL)] = True,
    quality: Annotated[bool, typer.Option("--quality", help="Flag rows (column q_flags) as blurry, underexposed, overexposed, crushed_shadows, blown_highlights, low_contrast, low_jpeg_quality, grayscale. Thresholds come from the set (robust z-scores) unless set; they are printed. Nothing is moved.", rich_help_panel=_QUAL)] = False,
    quality_z: Annotated[float, typer.Option("--quality-z", help="With --quality: how unusual (robust z-score) a value must be to be flagged by default.", rich_help_panel=_QUAL)] = 3.5,
    flag_threshold: Annotated[list[str] | None, typer.Option("--flag-threshold", help="With --quality: a fixed threshold REASON=NUMBER in the column's units (repeatable), e.g. blurry=40, low_jpeg_quality=70.", rich_help_panel=_QUAL)] = None,
    clip_model: Annotated[str, typer.Option("--clip-model", help="With --method clip: open_clip model name.", rich_help_panel=_CLIP)] = "ViT-B-32",
    clip_pretrained: Annotated[str, typer.Option("--clip-pretrained", help="With --method clip: open_clip pretrained tag or a local weights file.", rich_help_panel=_CLIP)] = "laion2b_s34b_b79k",
    clip_threshold: Annotated[float, typer.Option("--clip-threshold", help="With --method clip: smallest cosine similarity (−1..1) of a duplicate.", rich_help_panel=_CLIP)] = 0.95,
    device: Annotated[str, typer.Option("--device", help="With --method clip: torch device (cpu, cuda, cuda:1). Default: cuda if available.", rich_help_panel=_CLIP)] = "",
    batch_size: Annotated[int, typer.Option("--batch-size", help="With --method clip: images per batch.", rich_help_panel=_CLIP)] = 32,
    review: Annotated[Path | None, typer.Option("--review", help="Write a self-contained HTML page: every group's thumbnails, galleries of the least sharp, darkest, brightest, outlier and flagged images (sortable), histograms.", rich_help_panel=_OUT)] = None,
    review_max_groups: Annotated[int, typer.Option("--review-max-groups", help="At most this many groups (largest first) on the review page.", rich_help_panel=_OUT)] = 500,
    review_gallery: Annotated[int, typer.Option("--review-gallery", help="Thumbnails per quality gallery on the review page (0 = none).", rich_help_panel=_OUT)] = 48,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write histograms of each statistic as one SVG file.", rich_help_panel=_OUT)] = None,
    apply: Annotated[str | None, typer.Option("--apply", help="move:DIR or symlink:DIR — move (or symlink) every image not kept into DIR/group-NNNNNN/. Never overwrites.", rich_help_panel=_OUT)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="With --apply: print what would be moved, touch nothing (the manifest is still written).", rich_help_panel=_OUT)] = False,
    ray: Ray = None,
    ray_workers: RayWorkers = None,
    threads: Threads = None,
    json_out: Json = False,
    overwrite: Overwrite = False,
) -> None:
    from pycore.curation.dedup.run import DedupRequest, run_dedup

    req = DedupRequest(
        manifest=manifest, out=out, threshold=threshold, hash_mode=hash_mode, method=method, clip_model=clip_model,
        clip_pretrained=clip_pretrained, clip_threshold=clip_threshold, device=device, batch_size=batch_size,
        keep_by=keep_by, keep_ascending=keep_ascending, max_group_size=max_group_size, stats=stats, quality=quality,
        quality_z=quality_z, quality_thresholds=_threshold_pairs(flag_threshold or []), review=review,
        review_max_groups=review_max_groups, review_gallery=review_gallery, plot=plot, apply=apply, dry_run=dry_run,
        threads=threads, overwrite=overwrite, ray=ray, ray_workers=ray_workers,
    )  # fmt: skip
    with BarProgress(disable=json_out) as bar:
        res = run_dedup(req, bar)
    if json_out:
        print_json(res.to_dict())
        return
    _render(res)


def _render(res: Any) -> None:
    from rich.table import Table

    rep = res.report
    t = Table(title="dedup", title_justify="left")
    t.add_column("")
    t.add_column("count", justify="right")
    for k, v in (("images (rows)", rep.rows), ("hashed", rep.hashed), ("reused hashes", rep.reused),
                 ("exact duplicate groups", rep.exact_groups), ("near-duplicate groups", rep.near_groups),
                 ("images in groups", rep.in_groups), ("marked for removal", rep.marked_for_removal),
                 ("largest group", rep.largest_group)):  # fmt: skip
        t.add_row(k, f"{v:,}")
    console.print(t)
    console.print(f"kept in each group: {res.keep_policy}")
    if rep.failed:
        console.print("not decoded: " + ", ".join(f"{k} {v:,}" for k, v in rep.failed.items()) + " (see status/error)")
    if res.quality is not None:
        q = Table(title=f"quality flags ({res.quality['flagged']:,} image(s) flagged; nothing moved)", title_justify="left")
        for c in ("flag", "images", "threshold", "chosen by"):
            q.add_column(c, justify="right" if c == "images" else "left")
        for reason, n in res.quality["counts"].items():
            th = res.quality["thresholds"].get(reason)
            q.add_row(reason, f"{n:,}", f"{th['column']} {th['direction']} {th['threshold']:.4g}" if th else "q_grayscale",
                      th["source"] if th else "mean channel spread ≤ 2")  # fmt: skip
        console.print(q)
    if res.outlier_method:
        console.print(f"outliers: q_outlier_score / q_outlier_rank by {res.outlier_method}")
    if res.apply is not None:
        a = res.apply
        if a["dry_run"]:
            for src, dst in a["plan"][:20]:
                console.print(f"would {a['action']} {src} → {dst}")
            if a["files"] > 20:
                console.print(f"… and {a['files'] - 20:,} more")
        else:
            console.print(f"{a['action']}d {a['moved']:,} of {a['files']:,} file(s) into {a['dir']}")
    extra = "".join(f"; {k} → {v}" for k, v in (("review", res.review), ("plot", res.plot)) if v)
    console.print(f"{rep.method} threshold {rep.threshold}, {res.seconds:.2f}s; manifest → {res.out}{extra}")
