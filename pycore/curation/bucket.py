"""`hw bucket` as a Python function: scan a folder (or re-bucket a manifest), assign buckets,
write the manifest and the optional kohya JSON and histogram.

    from pycore.curation.bucket import BucketRequest, bucket
    result = bucket(BucketRequest("images/", "manifest.parquet", table="sdxl"))
    print(result.report.ok, result.report.buckets[0])

The request is checked in full (ranges with their bounds, outputs writable and not an input)
before any work starts. Progress goes to an optional :class:`pycore.progress.Progress`;
problems the user should know about are :class:`pycore.errors.HwWarning`s.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pycore.checks import check_float, check_int, check_output, resolve_threads
from pycore.errors import HwError, HwWarning, NothingDone
from pycore.limits import MAX_PIXELS

if TYPE_CHECKING:
    import polars as pl

    from pycore.curation.assign import BucketOptions, BucketReport
    from pycore.curation.shards import SourceOptions
    from pycore.curation.scan import ScanResult
    from pycore.curation.tables import BucketTable
    from pycore.progress import Progress

#: Largest bucket side anywhere (tables, generated, --snap, --step).
MAX_SIDE = 16384
#: ``--max-pixels`` above this is refused: 2^40 pixels is a terapixel, far past any real image.
MAX_PIXELS_CAP = 1 << 40
#: SDXL wants bucket sides that are multiples of this.
SDXL_MULTIPLE = 32


@dataclass
class BucketRequest:
    """Everything ``hw bucket`` needs; checked on construction."""

    #: A folder of images (searched recursively), a manifest (.parquet or a folder of parts) to
    #: re-bucket, tar shards (a .tar, a folder of them, ``shards/{00000..00099}.tar``, a list file
    #: or ``@list.txt``), or with ``image_column`` Parquet tables of image bytes.
    source: str | Path
    #: The output manifest (.parquet).
    out: str | Path
    #: helloworld, sdxl, generated, or a .csv/.toml file of width,height.
    table: str = "helloworld"
    #: With table "generated": largest bucket area, smallest and largest side, side step.
    max_area: int = 1024 * 1024
    step: int = 64
    #: Reject images whose shorter side is below this (with "generated": also the smallest
    #: bucket side, 256 when 0).
    min_side: int = 0
    max_side: int = 2048
    #: Round table sizes to the nearest multiple of this (0 = off).
    snap: int = 0
    #: Never upscale: a small image gets its own bucket, or is rejected with ``reject_small``.
    no_upscale: bool = False
    reject_small: bool = False
    #: Reject (or with ``flag_crop`` flag) images losing more than this share to the crop.
    max_crop: float | None = None
    flag_crop: bool = False
    #: Seeded per-image random crops instead of centred ones.
    random_crop: bool = False
    seed: int = 0
    #: Hash every file's bytes (xxh3-128).
    hash: bool = True
    #: Images declaring more pixels get status too_large.
    max_pixels: int = MAX_PIXELS
    #: Worker threads (None: $HW_THREADS or one per core); capped with a warning.
    threads: int | None = None
    plot: str | Path | None = None
    export_kohya: str | Path | None = None
    overwrite: bool = False
    #: Where the images are stored beyond loose files (Parquet image column, tar sidecars) and
    #: whether the scan runs on Ray (:class:`pycore.curation.shards.SourceOptions`).
    sources: SourceOptions | None = None

    def __post_init__(self) -> None:
        from pycore.curation.shards import SourceOptions
        from pycore.curation.shards import LIST_SUFFIXES, SHARD_SUFFIXES, is_pattern

        self.sources = self.sources or SourceOptions()
        named = str(self.source)
        self.source = Path(self.source)
        if not self.source.exists() and not (is_pattern(named) or named.startswith("@")):
            raise HwError(f"{self.source} does not exist")
        if (self.source.is_file() and not self.sources.image_column
                and not named.lower().endswith((".parquet", *SHARD_SUFFIXES, *LIST_SUFFIXES))):  # fmt: skip
            raise HwError(f"{self.source} is a file but not a manifest (.parquet), a tar shard or a list file; "
                          "give a folder of images, shards or a manifest")  # fmt: skip
        check_int("--max-area", self.max_area, 1, MAX_SIDE * MAX_SIDE)
        check_int("--step", self.step, 1, MAX_SIDE)
        check_int("--min-side", self.min_side, 0, MAX_SIDE)
        check_int("--max-side", self.max_side, 1, MAX_SIDE)
        check_int("--snap", self.snap, 0, MAX_SIDE)
        check_int("--seed", self.seed, 0, 2**64 - 1)
        check_int("--max-pixels", self.max_pixels, 1, MAX_PIXELS_CAP)
        if self.max_crop is not None:
            self.max_crop = check_float("--max-crop", self.max_crop, 0.0, 1.0, hi_open=True)
        if self.reject_small and not self.no_upscale:
            raise HwError("--reject-small only applies with --no-upscale")
        if self.flag_crop and self.max_crop is None:
            raise HwError("--flag-crop needs --max-crop")
        inputs = [self.source]
        from pycore.manifest_parts import check_manifest_out

        self.out = check_manifest_out(self.out, inputs=inputs, overwrite=self.overwrite)
        self.plot = check_output(self.plot, inputs=inputs, overwrite=self.overwrite, option="--plot")
        self.export_kohya = check_output(self.export_kohya, inputs=inputs, overwrite=self.overwrite, option="--export-kohya")
        outs = [p for p in (self.out, self.plot, self.export_kohya) if p is not None]
        if len({Path(p).resolve() for p in outs}) != len(outs):  # type: ignore[arg-type]
            raise HwError("--out, --plot and --export-kohya must be different files")
        self.threads = resolve_threads(self.threads)

    def options(self) -> BucketOptions:
        from pycore.curation.assign import BucketOptions

        small = ("reject" if self.reject_small else "own") if self.no_upscale else "upscale"
        return BucketOptions(small=small, step=self.step, min_side=self.min_side, max_crop=self.max_crop,
                             flag_only=self.flag_crop, seed=self.seed if self.random_crop else None,
                             threads=self.threads or 0)  # fmt: skip

    def bucket_table(self) -> BucketTable:
        from pycore.curation import tables

        if self.table == "generated":
            tab = tables.generate_table(max_area=self.max_area, step=self.step,
                                        min_side=self.min_side or 256, max_side=self.max_side)  # fmt: skip
        else:
            tab = tables.load_table(self.table)
        return tables.snap(tab, self.snap) if self.snap else tab


@dataclass
class BucketResult:
    """What ``hw bucket`` did."""

    report: BucketReport
    out: Path
    #: True when a folder was scanned, False when a manifest was re-bucketed.
    rescanned: bool
    seconds: float
    plot: Path | None = None
    kohya: Path | None = None
    #: Images written to the kohya JSON (None without export_kohya).
    kohya_images: int | None = None
    _frame: pl.DataFrame | None = field(default=None, repr=False)

    @property
    def frame(self) -> pl.DataFrame:
        """The manifest rows, for callers that go on in Python (read from ``out`` when the
        folder path wrote them straight from Rust, or when it is a folder of parts)."""
        if self._frame is None:
            from pycore.manifest import Manifest

            self._frame = Manifest.read(self.out).frame
        return self._frame

    def to_dict(self) -> dict:
        d = self.report.to_dict()
        d.update(out=str(self.out), seconds=round(self.seconds, 3), plot=str(self.plot) if self.plot else None,
                 kohya=str(self.kohya) if self.kohya else None, kohya_images=self.kohya_images)  # fmt: skip
        return d


def bucket(req: BucketRequest, progress: Progress | None = None) -> BucketResult:
    """Run ``hw bucket``: see the module docstring."""
    from pycore.curation.tables import off_grid

    t0 = time.perf_counter()
    table, opts = req.bucket_table(), req.options()
    src = Path(req.source)
    meta: dict[str, object] = {"table": table.name, "table_sizes": [list(s) for s in table.sizes],
            "options": {k: v for k, v in vars(opts).items() if k != "threads"}, "source": str(src)}  # fmt: skip
    grid = off_grid(table, SDXL_MULTIPLE)
    if _plain_folder(req, src):
        rep = _bucket_folder(req, src, table, opts, meta, grid, progress)
        frame, rescanned, warned_before = None, True, False
    else:
        if _streams_scan(req, src):
            return _scan_parts(req, table, opts, meta, progress, t0)
        scan = _scan(req, src, opts.threads, progress)
        if scan is None and _streams(req, src):
            return _rebucket_parts(req, table, opts, meta, progress, t0)
        rep, frame, rescanned, warned_before = _bucket_frame(req, src, scan, table, opts, meta, grid)
    _warn_off_grid(table, grid, warned_before)
    return _finish(req, BucketResult(rep, Path(req.out), rescanned, 0.0, _frame=frame), t0)


def _finish(req: BucketRequest, result: BucketResult, t0: float) -> BucketResult:
    """The outputs after the manifest (histogram, kohya JSON) and the run's time."""
    rep = result.report
    if req.plot is not None:
        plot(rep, req.plot, overwrite=req.overwrite)
        result.plot = Path(req.plot)
    if req.export_kohya is not None:
        result.kohya_images = export_kohya(result.frame, req.export_kohya, overwrite=req.overwrite)
        result.kohya = Path(req.export_kohya)
        if rep.rotated:
            warnings.warn(f"{rep.rotated} image(s) carry an EXIF rotation; kohya loads pixels without applying it, so "
                          "their train_resolution matches the displayed (rotated) image, not kohya's view", HwWarning,
                          stacklevel=3)  # fmt: skip
    result.seconds = time.perf_counter() - t0
    return result


def _plain_folder(req: BucketRequest, src: Path) -> bool:
    """A folder of loose images scanned locally into one manifest file: the fast path, with the
    rows kept in Rust (no Polars, no NumPy). Shards, Parquet tables, manifest folders, Ray and
    parts outputs go through the frame path."""
    from pycore.curation.shards import names_shards

    s = req.sources
    assert s is not None
    return (src.is_dir() and not (s.image_column or s.sidecars or s.ray) and not names_shards(src)
            and not any(src.glob("*.parquet")) and not os.fspath(req.out).endswith(("/", os.sep)))  # fmt: skip


def _bucket_frame(req, src, scan, table, opts, meta, grid):  # noqa: ANN001, ANN202
    """Bucket a scan's frame or re-bucket a manifest with Polars, and write it: (report, frame,
    whether it was scanned, whether its table was warned about before)."""
    from pycore.curation.assign import assign, report
    from pycore.manifest import Manifest, new_manifest

    if scan is None:  # a manifest (file or folder of parts) to re-bucket
        prev = Manifest.read(src, required=("path", "status", "width", "height"))
        frame, skipped, problems, rescanned = prev.frame, {}, [], False
        warned_before = prev.get("table") == table.name
    else:
        frame, skipped, problems, rescanned, warned_before = scan.frame, scan.skipped, scan.problems, True, False
        meta.update(root=scan.root, content_hash="xxh3-128" if req.hash else "none")
    if frame.height == 0:
        extra = f" ({sum(skipped.values()):,} non-image file(s) skipped)" if skipped else ""
        raise NothingDone(f"no image files in {src}{extra}; nothing to bucket, no manifest written")
    frame = assign(frame, table, opts)
    rep = report(frame, table, skipped=skipped, problems=problems, off_grid=grid)
    manifest = prev.derive(frame, "bucket", meta) if not rescanned else new_manifest(frame, "bucket", meta)
    manifest.write(req.out, overwrite=req.overwrite)
    return rep, frame, rescanned, warned_before


def _bucket_folder(req, src, table, opts, meta, grid, progress):  # noqa: ANN001, ANN202
    """Scan, bucket and write a folder's manifest with the rows kept in Rust (no Polars, no
    NumPy: most of a small folder's time would be their import). Returns the report."""
    from pycore import _rust
    from pycore.curation.assign import report_from_summary
    from pycore.curation.scan import scan_folder_rows
    from pycore.io import atomic_path
    from pycore.manifest_meta import first, footer

    if progress is not None:
        progress.stage("walking", None, "files")
    res = scan_folder_rows(str(src), hash=req.hash, max_pixels=req.max_pixels, threads=opts.threads,
                           progress=progress.advance if progress else None,
                           on_listed=(lambda n: progress.stage("reading headers", n, "files")) if progress else None)  # fmt: skip
    if len(res.rows) == 0:
        extra = f" ({sum(res.skipped.values()):,} non-image file(s) skipped)" if res.skipped else ""
        raise NothingDone(f"no image files in {src}{extra}; nothing to bucket, no manifest written")
    try:
        res.rows.assign(list(table.sizes), opts.small, opts.step, opts.min_side, opts.max_crop, opts.flag_only,
                        opts.seed, opts.threads)  # fmt: skip
    except ValueError as e:
        raise HwError(str(e)) from None
    rep = report_from_summary(res.rows.summary(), table, skipped=res.skipped, problems=res.problems, off_grid=grid)
    meta.update(root=res.root, content_hash="xxh3-128" if req.hash else "none")
    with atomic_path(req.out, overwrite=req.overwrite) as tmp:
        res.rows.write(str(tmp), list(footer(first("bucket", meta)).items()))
    return rep


def _streams(req: BucketRequest, src: Path) -> bool:
    """Re-bucket a folder of parts part by part (memory of one part) when the output is a folder
    too and nothing needs every row at once (the kohya JSON does)."""
    from pycore.manifest_parts import is_manifest_folder, wants_parts

    return is_manifest_folder(src) and wants_parts(req.out) and req.export_kohya is None


def _streams_scan(req: BucketRequest, src: Path) -> bool:
    """Scan tar shards or Parquet image tables into a folder of parts as they are read (memory of
    one part) when nothing needs every row at once; on Ray the workers' parts are gathered."""
    from pycore.curation.scan_sources import containers
    from pycore.manifest_parts import wants_parts

    assert req.sources is not None
    return (not req.sources.ray and wants_parts(req.out) and req.export_kohya is None
            and containers(str(src), req.sources) is not None)  # fmt: skip


def _scan_parts(req: BucketRequest, table: BucketTable, opts: BucketOptions, meta: dict[str, object],
                progress: Progress | None, t0: float) -> BucketResult:  # fmt: skip
    """``bucket`` of shards/tables into a folder: scan whole containers until a part's worth of
    rows, bucket them, write the part, go on. The report is the merge of the parts'."""
    from pycore import manifest_parts
    from pycore.curation.assign import assign, merge_reports, report
    from pycore.curation.scan_sources import containers, iter_scans
    from pycore.curation.tables import off_grid
    from pycore.manifest import new_manifest

    assert req.sources is not None
    named = containers(str(req.source), req.sources)
    assert named is not None
    kind, files = named
    grid = off_grid(table, SDXL_MULTIPLE)
    meta.update(root=os.path.commonpath(files), content_hash="xxh3-128" if req.hash else "none")
    reports, skipped, problems = [], {}, []  # type: ignore[var-annotated]
    if progress is not None:
        progress.stage("reading shards" if kind == "shard" else "reading tables", len(files), kind + "s")
    with manifest_parts.PartsWriter(req.out, None, overwrite=req.overwrite) as w:
        for scan in iter_scans(kind, files, req.sources, hash=req.hash, max_pixels=req.max_pixels, threads=opts.threads,
                               progress=progress.advance if progress else None,
                               rows_per_part=manifest_parts.PART_ROWS):  # fmt: skip
            for k, v in scan.skipped.items():
                skipped[k] = skipped.get(k, 0) + v
            problems += scan.problems
            if scan.frame.height == 0:
                continue
            frame = assign(scan.frame, table, opts)
            reports.append(report(frame, table, off_grid=grid))
            w.write(new_manifest(frame, "bucket", meta))
        if not reports:  # raised inside the writer: no folder is left behind
            extra = f" ({sum(skipped.values()):,} non-image member(s) skipped)" if skipped else ""
            raise NothingDone(f"no images in {req.source}{extra}; nothing to bucket, no manifest written")
    rep = merge_reports(reports, table)
    rep.skipped_files, rep.problems = skipped, problems
    _warn_off_grid(table, grid, False)
    return _finish(req, BucketResult(rep, Path(req.out), True, 0.0), t0)


def _rebucket_parts(req: BucketRequest, table: BucketTable, opts: BucketOptions, meta: dict[str, object],
                    progress: Progress | None, t0: float) -> BucketResult:  # fmt: skip
    """``bucket`` for a manifest folder written to a folder: one part in memory at a time."""
    from pycore.curation.assign import assign, merge_reports, report
    from pycore.curation.tables import off_grid
    from pycore.manifest import Manifest
    from pycore.manifest_parts import PartsWriter, part_files

    n = len(part_files(req.source))
    grid = off_grid(table, SDXL_MULTIPLE)
    reports, warned_before = [], True
    if progress is not None:
        progress.stage("re-bucketing parts", n, "parts")
    with PartsWriter(req.out, n, overwrite=req.overwrite) as w:
        for m in Manifest.parts(req.source, required=("path", "status", "width", "height")):
            warned_before = m.get("table") == table.name
            frame = assign(m.frame, table, opts)
            reports.append(report(frame, table, off_grid=grid))
            w.write(m.derive(frame, "bucket", meta))
            if progress is not None:
                progress.advance(1)
    rep = merge_reports(reports, table)
    _warn_off_grid(table, grid, warned_before)
    return _finish(req, BucketResult(rep, Path(req.out), False, 0.0), t0)


def _warn_off_grid(table: BucketTable, grid: list[tuple[int, int]], warned_before: bool) -> None:
    if grid and not warned_before:  # once per manifest: a re-bucket with the same table stays quiet
        names = ", ".join(f"{w}x{h}" for w, h in grid)
        warnings.warn(f"bucket table {table.name} has sizes that are not multiples of {SDXL_MULTIPLE} (SDXL wants "
                      f"them): {names}; --snap {SDXL_MULTIPLE} rounds them", HwWarning, stacklevel=3)  # fmt: skip


def _scan(req: BucketRequest, src: Path, threads: int, progress: Progress | None) -> ScanResult | None:
    """Scan a folder, tar shards or Parquet image tables (None for a manifest to re-bucket)."""
    from pycore.curation.scan import scan_folder
    from pycore.curation.scan_sources import scan_source
    from pycore.manifest_parts import is_manifest_folder

    assert req.sources is not None
    named = str(src)
    advance = progress.advance if progress else None
    if progress is not None:
        progress.stage("walking", None, "files")
    got = scan_source(named, req.sources, hash=req.hash, max_pixels=req.max_pixels, threads=threads,
                      progress=advance, on_listed=(lambda n: progress.stage("reading shards", n, "shards")) if progress else None)  # fmt: skip
    if got is not None:
        return got
    if src.is_file() or is_manifest_folder(src):
        return None
    return scan_folder(str(src), hash=req.hash, max_pixels=req.max_pixels, threads=threads, progress=advance,
                       on_listed=(lambda n: progress.stage("reading headers", n, "files")) if progress else None)  # fmt: skip


def export_kohya(frame: pl.DataFrame, path: str | Path, *, overwrite: bool = False) -> int:
    """Write kohya sd-scripts' metadata JSON: {image_key: {image_size, train_resolution}}.

    Keys are full paths (use kohya's ``--full_path``); ``image_size`` is the displayed size after
    EXIF orientation. Returns the number of images written (status "ok" only).

    The file is always valid UTF-8 JSON. A path whose bytes are not UTF-8 is written with each
    undecodable byte 0xXY as the JSON escape ``\\udcXY`` (Python's surrogateescape): ``json.load``
    gives back a str that ``open()`` resolves to the exact file, so nothing is lost; a warning
    names how many such paths there are.
    """
    import polars as pl

    from pycore.io import write_atomic
    from pycore.manifest import fs_paths

    ok = frame.filter(pl.col("status") == "ok")
    meta = {
        p: {"image_size": [w, h], "train_resolution": [bw, bh]}
        for p, w, h, bw, bh in zip(
            fs_paths(ok), ok["width"], ok["height"], ok["bucket_width"], ok["bucket_height"], strict=True
        )
    }
    text = json.dumps(meta, indent=1, ensure_ascii=False) + "\n"
    # Lone surrogates (undecodable path bytes) become \udcXY escapes: valid JSON, valid UTF-8.
    data = text.encode("utf-8", errors="backslashreplace")
    n_raw = sum(1 for p in meta if not p.isascii() and _has_surrogate(p))
    if n_raw:
        warnings.warn(f"{n_raw} path(s) in --export-kohya are not valid UTF-8; their undecodable bytes are written "
                      "as \\udcXX escapes (Python's json.load + open() find the files)", HwWarning, stacklevel=2)  # fmt: skip
    def write(p: Path) -> None:
        p.write_bytes(data)

    write_atomic(path, write, overwrite=overwrite)
    return len(meta)


def _has_surrogate(s: str) -> bool:
    return any("\udc80" <= c <= "\udcff" for c in s)


def plot(rep: BucketReport, path: str | Path, *, overwrite: bool = False) -> None:
    """A bar chart of images per bucket (sorted by aspect ratio) as PNG."""
    from pycore.io import write_atomic

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise HwError("--plot needs matplotlib: pip install 'hw[plot]'") from None
    rows = sorted(rep.buckets, key=lambda b: b["aspect"])
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(rows)), 4), dpi=120)
    labels = [f"{b['width']}×{b['height']}" for b in rows]
    bars = ax.bar(range(len(rows)), [b["count"] for b in rows], color="#4c72b0")
    for bar, b in zip(bars, rows, strict=True):
        if b["count"]:
            ax.annotate(f"{b['share']:.1%}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)  # fmt: skip
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("images")
    rej = sum(rep.rejected.values())
    ax.set_title(f"{rep.ok} images in {sum(1 for b in rows if b['count'])} buckets ({rep.table}); {rej} not bucketed")
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, format="png"), overwrite=overwrite)
    plt.close(fig)
