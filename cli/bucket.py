"""`hw bucket`: scan images (or re-bucket a manifest) into aspect-ratio buckets."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.common import Json, Out, Overwrite, Threads, console, print_json, progress, warn
from pycore.errors import HwError

HELP = """Scan a folder of images (or re-bucket an existing manifest) and assign aspect-ratio buckets.

Reads only image headers (JPEG, PNG, WebP, GIF, BMP, TIFF, AVIF, HEIC, JPEG XL), in parallel, with
sizes after EXIF orientation. Every image file found becomes a row of the output manifest — the
ones that cannot be used too, with a status and a reason.
"""


def register(app: typer.Typer) -> None:
    app.command("bucket", help=HELP, no_args_is_help=True)(bucket)


def bucket(
    src: Annotated[Path, typer.Argument(help="A folder of images (searched recursively) or a manifest .parquet to re-bucket.", show_default=False)],
    out: Out,
    table: Annotated[str, typer.Option("--table", "-t", help="Bucket table: helloworld, sdxl, generated, or a .csv/.toml file (width,height).")] = "helloworld",
    max_area: Annotated[int, typer.Option("--max-area", help="With --table generated: largest bucket area in pixels.", min=1)] = 1024 * 1024,
    step: Annotated[int, typer.Option("--step", help="With --table generated (and --no-upscale): bucket sides are multiples of this.", min=1)] = 64,
    min_side: Annotated[int, typer.Option("--min-side", help="Reject images whose shorter side is below this. With --table generated also the smallest bucket side (default 256 there).", min=0)] = 0,
    max_side: Annotated[int, typer.Option("--max-side", help="With --table generated: the largest bucket side.", min=1)] = 2048,
    snap: Annotated[int, typer.Option("--snap", help="Round table sizes to the nearest multiple of this (e.g. 32). 0 = off.", min=0)] = 0,
    no_upscale: Annotated[bool, typer.Option("--no-upscale", help="Never upscale: an image smaller than its bucket gets its own bucket (its size floored to --step, like kohya's bucket_no_upscale), or is rejected with --reject-small.")] = False,
    reject_small: Annotated[bool, typer.Option("--reject-small", help="With --no-upscale: reject images that would need upscaling (status needs_upscale) instead of giving them their own bucket.")] = False,
    max_crop: Annotated[float | None, typer.Option("--max-crop", help="Reject images that lose more than this share of pixels to the crop (status crop_too_large), e.g. 0.3.", min=0.0, max=0.999)] = None,
    flag_crop: Annotated[bool, typer.Option("--flag-crop", help="With --max-crop: keep such images but set crop_flagged instead of rejecting.")] = False,
    random_crop: Annotated[bool, typer.Option("--random-crop", help="Random crop offsets (seeded, per image) instead of centred crops.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed for --random-crop.", min=0)] = 0,
    no_hash: Annotated[bool, typer.Option("--no-hash", help="Skip the content hash (xxh3-128 of the bytes); read headers only.")] = False,
    max_pixels: Annotated[int, typer.Option("--max-pixels", help="Images declaring more pixels get status too_large (Pillow's bomb limit by default).", min=1)] = 178_956_970,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG histogram of images per bucket.")] = None,
    export_kohya: Annotated[Path | None, typer.Option("--export-kohya", help="Write kohya sd-scripts metadata JSON ({image: {image_size, train_resolution}}; use kohya's --full_path).")] = None,
    threads: Threads = None,
    json_out: Json = False,
    overwrite: Overwrite = False,
) -> None:
    from pycore.curation import tables as bt
    from pycore.curation.assign import BucketOptions, bucket_source, export_kohya as write_kohya, plot as write_plot
    from pycore.manifest import write_manifest
    from pycore.checks import resolve_threads as threads_from_env

    t0 = time.perf_counter()
    for p in (out, plot, export_kohya):
        if p is not None and p.exists() and not overwrite:
            raise HwError(f"{p} exists; pass --overwrite to replace it")
    if reject_small and not no_upscale:
        raise HwError("--reject-small only applies with --no-upscale")
    if flag_crop and max_crop is None:
        raise HwError("--flag-crop needs --max-crop")
    if not src.exists():
        raise HwError(f"{src} does not exist")

    if table == "generated":
        tab = bt.generate_table(max_area=max_area, step=step, min_side=min_side or 256, max_side=max_side)
    else:
        tab = bt.load_table(table)
    if snap:
        tab = bt.snap(tab, snap)
    opts = BucketOptions(
        small=("reject" if reject_small else "own") if no_upscale else "upscale",
        step=step, min_side=min_side, max_crop=max_crop, flag_only=flag_crop,
        seed=seed if random_crop else None, threads=threads_from_env(threads),
    )  # fmt: skip
    with progress(disable=json_out) as bar:
        task = bar.add_task("walking", total=None, rate="")
        started = time.perf_counter()
        done = [0]

        def on_listed(total: int) -> None:
            bar.update(task, description="reading headers", total=total)

        def on_progress(n: int) -> None:
            done[0] += n
            rate = done[0] / max(time.perf_counter() - started, 1e-9)
            bar.update(task, advance=n, rate=f"{rate:,.0f} files/s")

        run = bucket_source(src, tab, opts, hash=not no_hash, max_pixels=max_pixels,
                            progress=on_progress, on_listed=on_listed)  # fmt: skip
    meta = {"root": run.root or "", "table": tab.name, "table_sizes": [list(s) for s in tab.sizes],
            "options": {k: v for k, v in vars(opts).items() if k != "threads"},
            "content_hash": "xxh3-128" if not no_hash else "none", "source": str(src)}  # fmt: skip
    write_manifest(run.frame, out, metadata=meta, overwrite=overwrite)
    rep = run.report
    if plot is not None:
        write_plot(rep, plot, overwrite=overwrite)
    n_kohya = write_kohya(run.frame, export_kohya, overwrite=overwrite) if export_kohya is not None else None
    elapsed = time.perf_counter() - t0

    off = bt.off_grid(tab, 32)
    if off and not json_out:
        names = ", ".join(f"{w}x{h}" for w, h in off)
        fix = ", ".join(f"{w}x{h}→{bt.snap_side(w, 32)}x{bt.snap_side(h, 32)}" for w, h in off)
        warn(f"bucket table {tab.name} has sizes that are not multiples of 32 (SDXL wants them): {names}. "
             f"Use --snap 32 to round them ({fix}).")  # fmt: skip
    if json_out:
        d = rep.to_dict()
        d.update(out=str(out), seconds=round(elapsed, 3), plot=str(plot) if plot else None,
                 kohya=str(export_kohya) if export_kohya else None)  # fmt: skip
        print_json(d)
        return
    _print_report(rep, out, elapsed, run.rescanned)
    if n_kohya is not None:
        console.print(f"kohya metadata: {n_kohya} images → {export_kohya}")
        if rep.rotated:
            warn(f"{rep.rotated} image(s) carry an EXIF rotation; kohya loads pixels without applying it, "
                 "so their train_resolution here matches the displayed (rotated) image, not kohya's view.")  # fmt: skip
    if plot is not None:
        console.print(f"histogram → {plot}")


def _print_report(rep, out: Path, elapsed: float, rescanned: bool) -> None:
    t = Table(title=f"buckets ({rep.table})", title_justify="left")
    for col, just in (("bucket", "left"), ("aspect", "right"), ("images", "right"), ("share", "right")):
        t.add_column(col, justify=just)
    for b in rep.buckets:
        if b["count"] or b["in_table"]:
            name = f"{b['width']}×{b['height']}" + ("" if b["in_table"] else " (own)")
            t.add_row(name, f"{b['aspect']:.2f}", f"{b['count']:,}", f"{b['share']:.1%}")
    console.print(t)
    what = "scanned" if rescanned else "re-bucketed"
    console.print(f"{rep.total_rows:,} image files {what} in {elapsed:.2f}s: {rep.ok:,} bucketed, "
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
    console.print(f"manifest → {out}")
