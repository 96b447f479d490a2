"""`hw bucket`: parse the options into a BucketRequest, run pycore.curation.bucket.bucket, render."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import Json, Out, Overwrite, Threads
from cli.scale_options import SCALE, Ray, RayWorkers

HELP = """Scan a folder of images (or re-bucket an existing manifest) and assign aspect-ratio buckets.

Reads only image headers (JPEG, PNG, WebP, GIF, BMP, TIFF, AVIF, HEIC, JPEG XL), in parallel, with
sizes after EXIF orientation. Every image file found becomes a row of the output manifest — the
ones that cannot be used too, with a status and a reason. An empty folder exits with code 3.

Example: hw bucket photos/ --out manifest.parquet --table sdxl --export-kohya meta.json

Shards: hw bucket 'laion/{00000..00099}.tar' --out manifest/ --sidecars   (img2dataset output, read in place)
"""

_T, _F, _O = "Bucket table", "Fitting images to buckets", "Outputs"
_S = "Scanning"


def register(app: typer.Typer) -> None:
    app.command("bucket", help=HELP, no_args_is_help=True)(bucket)


def bucket(
    src: Annotated[Path, typer.Argument(metavar="SRC", help="A folder of images (searched recursively), a manifest (.parquet or a folder of parts) to re-bucket, tar shards (a .tar, a folder of them, 'shards/{00000..00099}.tar', a list file or @list.txt), or with --image-column Parquet tables of image bytes.", show_default=False)],
    out: Out,
    table: Annotated[str, typer.Option("--table", "-t", help="Bucket table: helloworld, sdxl, generated, or a .csv/.toml file (width,height). HelloWorld's 1360×768 is off SDXL's 32-grid: --snap 32 rounds it (warned once per manifest).", rich_help_panel=_T)] = "helloworld",
    max_area: Annotated[int, typer.Option("--max-area", help="With --table generated: largest bucket area in pixels (≤ 16384²).", rich_help_panel=_T)] = 1024 * 1024,
    step: Annotated[int, typer.Option("--step", help="With --table generated (and --no-upscale): bucket sides are multiples of this.", rich_help_panel=_T)] = 64,
    max_side: Annotated[int, typer.Option("--max-side", help="With --table generated: the largest bucket side.", rich_help_panel=_T)] = 2048,
    snap: Annotated[int, typer.Option("--snap", help="Round table sizes to the nearest multiple of this (e.g. 32). 0 = off.", rich_help_panel=_T)] = 0,
    min_side: Annotated[int, typer.Option("--min-side", help="Reject images whose shorter side is below this. With --table generated also the smallest bucket side (default 256 there).", rich_help_panel=_F)] = 0,
    no_upscale: Annotated[bool, typer.Option("--no-upscale", help="Never upscale: an image smaller than its bucket gets its own bucket (its size floored to --step, like kohya's bucket_no_upscale), or is rejected with --reject-small.", rich_help_panel=_F)] = False,
    reject_small: Annotated[bool, typer.Option("--reject-small", help="With --no-upscale: reject images that would need upscaling (status needs_upscale) instead of giving them their own bucket.", rich_help_panel=_F)] = False,
    max_crop: Annotated[float | None, typer.Option("--max-crop", help="Reject images that lose more than this share of pixels to the crop (status crop_too_large), e.g. 0.3.", rich_help_panel=_F)] = None,
    flag_crop: Annotated[bool, typer.Option("--flag-crop", help="With --max-crop: keep such images but set crop_flagged instead of rejecting.", rich_help_panel=_F)] = False,
    random_crop: Annotated[bool, typer.Option("--random-crop", help="Random crop offsets (seeded, per image) instead of centred crops.", rich_help_panel=_F)] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed for --random-crop.", rich_help_panel=_F)] = 0,
    no_hash: Annotated[bool, typer.Option("--no-hash", help="Skip the content hash (xxh3-128 of the bytes); read headers only.", rich_help_panel=_S)] = False,
    max_pixels: Annotated[int | None, typer.Option("--max-pixels", help="Images declaring more pixels get status too_large. Default: Pillow's bomb limit, 178,956,970.", show_default=False, rich_help_panel=_S)] = None,
    threads: Threads = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG histogram of images per bucket.", rich_help_panel=_O)] = None,
    export_kohya: Annotated[Path | None, typer.Option("--export-kohya", help="Write kohya sd-scripts metadata JSON ({image: {image_size, train_resolution}}; use kohya's --full_path). Non-UTF-8 names are written as \\udcXX escapes.", rich_help_panel=_O)] = None,
    image_column: Annotated[str | None, typer.Option("--image-column", help="SRC is Parquet tables (a file, folder, {a..b} pattern or list) with image bytes in this column (binary, or HF datasets' {bytes, path}).", rich_help_panel=SCALE)] = None,
    caption_column: Annotated[str | None, typer.Option("--caption-column", help="With --image-column: carry this text column as source_caption.", rich_help_panel=SCALE)] = None,
    sidecars: Annotated[bool, typer.Option("--sidecars", help="Tar shards: carry KEY.txt as source_caption and KEY.json as source_json.", rich_help_panel=SCALE)] = False,
    ray: Ray = None,
    ray_workers: RayWorkers = None,
    json_out: Json = False,
    overwrite: Overwrite = False,
) -> None:
    from cli.common import BarProgress, print_json
    from pycore.curation.bucket import BucketRequest, bucket as run_bucket
    from pycore.curation.shards import SourceOptions
    from pycore.limits import MAX_PIXELS

    req = BucketRequest(
        src, out, table=table, max_area=max_area, step=step, min_side=min_side, max_side=max_side, snap=snap,
        no_upscale=no_upscale, reject_small=reject_small, max_crop=max_crop, flag_crop=flag_crop,
        random_crop=random_crop, seed=seed, hash=not no_hash, max_pixels=MAX_PIXELS if max_pixels is None else max_pixels,
        threads=threads, plot=plot, export_kohya=export_kohya, overwrite=overwrite,
        sources=SourceOptions(image_column=image_column, caption_column=caption_column, sidecars=sidecars,
                              ray=ray, ray_workers=ray_workers),
    )  # fmt: skip
    if json_out:  # machine output: no bar, and no Rich to import
        print_json(run_bucket(req).to_dict())
        return
    with BarProgress() as bar:
        result = run_bucket(req, progress=bar)
    _print_result(result)


def _print_result(result) -> None:  # noqa: ANN001 (pycore.curation.bucket.BucketResult)
    from rich.table import Table

    from cli.common import console, warn

    rep = result.report
    t = Table(title=f"buckets ({rep.table})", title_justify="left")
    for col, just in (("bucket", "left"), ("aspect", "right"), ("images", "right"), ("share", "right")):
        t.add_column(col, justify=just)
    for b in rep.buckets:
        if b["count"] or b["in_table"]:
            name = f"{b['width']}×{b['height']}" + ("" if b["in_table"] else " (own)")
            t.add_row(name, f"{b['aspect']:.2f}", f"{b['count']:,}", f"{b['share']:.1%}")
    console.print(t)
    what = "scanned" if result.rescanned else "re-bucketed"
    console.print(f"{rep.total_rows:,} image files {what} in {result.seconds:.2f}s: {rep.ok:,} bucketed, "
                  f"{sum(rep.rejected.values()):,} not ({rep.upscaled:,} upscaled, mean crop {rep.mean_crop_fraction:.1%}).")  # fmt: skip
    if rep.rejected:
        console.print("not bucketed: " + ", ".join(f"{k} {v:,}" for k, v in rep.rejected.items())
                      + "  (see the status and error columns)")  # fmt: skip
    if rep.flagged:
        console.print(f"{rep.flagged:,} image(s) flagged for a large crop (crop_flagged)")
    if rep.skipped_files:
        total = sum(rep.skipped_files.values())
        top = ", ".join(f".{k or '(none)'} {v:,}" for k, v in sorted(rep.skipped_files.items(), key=lambda kv: -kv[1])[:6])
        console.print(f"skipped {total:,} non-image file(s): {top}")
    for path, why in rep.problems[:5]:
        warn(f"{path}: {why}")
    if len(rep.problems) > 5:
        warn(f"… and {len(rep.problems) - 5} more folder problem(s) (--json lists all)")
    console.print(f"manifest → {result.out}")
    if result.kohya is not None:
        console.print(f"kohya metadata: {result.kohya_images} images → {result.kohya}")
    if result.plot is not None:
        console.print(f"histogram → {result.plot}")
