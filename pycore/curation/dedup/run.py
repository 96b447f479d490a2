"""`hw dedup` as one function: :func:`run_dedup` takes a :class:`DedupRequest` and returns a
:class:`DedupResult` (the CLI only parses options into the request and renders the result).

Pipeline: read the manifest → hash (+ quality statistics, same decode) → embed (``--method
clip``) → group and choose the kept image → quality flags and outliers → plan (and apply) moves →
write the manifest (derived from the input: rows, columns and metadata carried forward), the
review page and the histograms.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pycore.checks import check_float, check_int, check_output, parse_device, resolve_threads
from pycore.curation.dedup import groups, hashing, moves, outliers, quality
from pycore.curation.dedup.options import DEFAULT_THRESHOLD, KEEP_POLICY, DedupOptions, DedupReport
from pycore.errors import HwError, HwWarning, NothingDone
from pycore.progress import NO_PROGRESS, Progress
from pycore.manifest_parts import check_manifest_out

#: Largest --review-max-groups / --review-gallery (a page with more would not open in a browser).
MAX_REVIEW_ITEMS = 100_000


@dataclass
class DedupRequest:
    """Everything one ``hw dedup`` run needs (validated on construction)."""

    manifest: Path  #: input manifest (.parquet from `hw bucket`)
    out: Path  #: output manifest
    threshold: int | None = None  #: phash Hamming threshold (None: the default, 10)
    hash_mode: str = "exact"
    method: str = "phash"
    clip_model: str = "ViT-B-32"
    clip_pretrained: str = "laion2b_s34b_b79k"
    clip_threshold: float = 0.95
    device: str = ""  #: --method clip: torch device ("" = cuda when available, else cpu)
    batch_size: int = 32
    keep_by: str | None = None
    keep_ascending: bool = False
    max_group_size: int = 1000
    stats: bool = True  #: quality statistics (q_* columns) from the same decode
    quality: bool = False  #: flag rows (q_flags) from the statistics
    quality_z: float = 3.5  #: robust z bound of the default thresholds
    quality_thresholds: dict[str, float] = field(default_factory=dict)  #: reason → fixed threshold
    review: Path | None = None
    review_max_groups: int = 500
    review_gallery: int = 48  #: thumbnails per quality gallery on the review page
    plot: Path | None = None  #: SVG histograms of each statistic
    apply: str | None = None  #: "move:DIR" or "symlink:DIR"
    dry_run: bool = False
    threads: int | None = None
    overwrite: bool = False
    ray: str | None = None  #: hash on Ray at this address ("local", "auto", HOST:PORT); grouping stays global
    ray_workers: int | None = None  #: with ray: at most this many concurrent tasks

    def __post_init__(self) -> None:
        from pycore.distributed import address_from

        self.manifest, self.out = Path(self.manifest), Path(self.out)
        self.ray = address_from(self.ray)
        if self.ray_workers is not None:
            check_int("--ray-workers", self.ray_workers, 1, 4096)
        self.batch_size = check_int("--batch-size", self.batch_size, 1, 4096)
        self.review_max_groups = check_int("--review-max-groups", self.review_max_groups, 1, MAX_REVIEW_ITEMS)
        self.review_gallery = check_int("--review-gallery", self.review_gallery, 0, MAX_REVIEW_ITEMS)
        self.quality_z = check_float("--quality-z", self.quality_z, 0.5, 50.0)
        if self.dry_run and self.apply is None:
            raise HwError("--dry-run only applies with --apply")
        if (self.quality or self.quality_thresholds) and not self.stats:
            raise HwError("--quality needs the statistics; drop --no-stats")
        if self.plot is not None and not self.stats:
            raise HwError("--plot needs the statistics; drop --no-stats")
        if self.keep_by == "sharpness":
            self.keep_by = "q_sharpness"
        if self.keep_by in quality.STAT_COLUMNS and not self.stats:
            raise HwError(f"--keep-by {self.keep_by} needs the statistics; drop --no-stats")
        self.options()  # validates the algorithm settings
        quality.QualityThresholds(self.quality_z, dict(self.quality_thresholds))

    def options(self, threads: int = 0) -> DedupOptions:
        return DedupOptions(threshold=DEFAULT_THRESHOLD if self.threshold is None else self.threshold,
                            hash_mode=self.hash_mode, method=self.method, clip_threshold=self.clip_threshold,
                            keep_by=self.keep_by, keep_ascending=self.keep_ascending,
                            max_group_size=self.max_group_size, threads=threads, stats=self.stats,
                            ray=self.ray, ray_workers=self.ray_workers)  # fmt: skip


@dataclass
class DedupResult:
    """What a run did; ``report`` holds the counts, the rest what was written and decided."""

    report: DedupReport
    out: Path
    review: Path | None = None
    plot: Path | None = None
    apply: dict[str, Any] | None = None  #: action, dir, dry_run, files, moved, problems, plan (first 1,000)
    quality: dict[str, Any] | None = None  #: thresholds and counts per reason (with --quality)
    outlier_method: str | None = None
    keep_policy: str = KEEP_POLICY
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = self.report.to_dict()
        d.update({k: v for k, v in asdict(self).items() if k != "report"})
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


def check_apply_target(action: str, folder: Path) -> None:
    """The --apply folder can be created or written (checked before any work)."""
    p = folder
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    if p.exists() and not p.is_dir():
        raise HwError(f"--apply {action}:{folder}: {p} is a file, not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise HwError(f"--apply {action}:{folder}: cannot write into {p} (permission denied)")


def _check_outputs(req: DedupRequest) -> tuple[str, Path] | None:
    inputs = [req.manifest]
    check_manifest_out(req.out, inputs=inputs, overwrite=req.overwrite)
    check_output(req.review, inputs=inputs, overwrite=req.overwrite, option="--review")
    check_output(req.plot, inputs=inputs, overwrite=req.overwrite, option="--plot")
    outs = [p.resolve() for p in (req.out, req.review, req.plot) if p is not None]
    if len(set(outs)) < len(outs):
        raise HwError("--out, --review and --plot must be different files")
    action = moves.parse_apply(req.apply) if req.apply is not None else None
    if action is not None and not req.dry_run:
        check_apply_target(*action)
    return action


def _embed(frame: Any, req: DedupRequest, progress: Progress) -> np.ndarray:
    from pycore.curation.dedup import clip
    from pycore.manifest import fs_paths

    dev = parse_device(req.device or None, "--device")
    model, preprocess = clip.load_clip(req.clip_model, req.clip_pretrained, dev)
    ok_rows = np.flatnonzero((frame["status"] == "ok").to_numpy())
    paths = fs_paths(frame)
    progress.stage("embedding", len(ok_rows), "img")
    e_ok, _errors = clip.clip_embeddings([paths[i] for i in ok_rows], model, preprocess, dev, req.batch_size,
                                         progress.advance)  # fmt: skip
    emb = np.zeros((frame.height, e_ok.shape[1]), np.float32)
    emb[ok_rows] = e_ok
    return emb


def run_dedup(req: DedupRequest, progress: Progress = NO_PROGRESS) -> DedupResult:
    """Find exact and near duplicates (and measure and flag image quality) in a manifest.

    Raises :class:`~pycore.errors.HwError` for bad input (before any work) and
    :class:`~pycore.errors.NothingDone` when ``--apply`` was asked and no file could be moved.
    """
    from pycore.manifest import Manifest

    t0 = time.perf_counter()
    action = _check_outputs(req)
    src = Manifest.read(req.manifest, required=("path", "status"))
    frame = src.frame
    if req.keep_by is not None and req.keep_by not in quality.STAT_COLUMNS:
        groups.check_keep_by(frame, req.keep_by)
    opts = req.options(resolve_threads(req.threads))
    rep = DedupReport(rows=frame.height)
    frame = hashing.compute_hashes(frame, opts, previous_mode=src.get("dedup_hash_mode"), progress=progress, report=rep)
    emb = _embed(frame, req, progress) if req.method == "clip" else None
    progress.stage("grouping", None)
    frame = groups.assign_groups(frame, opts, rep, embeddings=emb)
    res = DedupResult(rep, req.out)
    meta: dict[str, object] = {"dedup_hash_mode": opts.hash_mode, "dedup_method": opts.method,
                               "dedup_threshold": rep.threshold, "dedup_keep_policy": KEEP_POLICY,
                               "dedup_hash": "imagehash-4.3.2 phash/dhash, 16 hex digits"}  # fmt: skip
    if req.stats:
        frame, res.outlier_method = outliers.add_outliers(frame, emb)
        meta["dedup_outlier_method"] = res.outlier_method
    if req.quality:
        frame, res.quality = quality.quality_flags(frame, quality.QualityThresholds(req.quality_z, dict(req.quality_thresholds)))
        meta["dedup_quality_thresholds"] = res.quality["thresholds"]
    if action is not None:
        frame, res.apply = _apply(frame, action, req.dry_run)
    src.derive(frame, "dedup", meta).write(req.out, overwrite=req.overwrite)
    _write_pages(frame, req, res)
    for g in rep.oversized_groups[:5]:
        warnings.warn(f"group {g['group']} has {g['size']} images (max internal distance {g['max_distance']}): near-"
                      "duplicates chained together; check it in --review or lower --threshold", HwWarning, stacklevel=2)  # fmt: skip
    res.seconds = round(time.perf_counter() - t0, 3)
    if res.apply is not None and not req.dry_run and res.apply["files"] and res.apply["moved"] == 0:
        raise NothingDone(f"--apply {res.apply['action']}: none of {res.apply['files']:,} file(s) could be "
                          f"{res.apply['action']}d ({res.apply['problems'][0]}); the manifest was written to {req.out}")  # fmt: skip
    return res


def _apply(frame: Any, action: tuple[str, Path], dry_run: bool) -> tuple[Any, dict[str, Any]]:
    plan = moves.plan_moves(frame, action[1])
    problems: list[str] = []
    if not dry_run:
        frame, problems = moves.apply_moves(frame, action[0], plan)
        for p in problems[:20]:
            warnings.warn(p, HwWarning, stacklevel=3)
        if len(problems) > 20:
            warnings.warn(f"… and {len(problems) - 20:,} more file(s) not moved", HwWarning, stacklevel=3)
    info = {"action": action[0], "dir": str(action[1]), "dry_run": dry_run, "files": len(plan),
            "moved": 0 if dry_run else len(plan) - len(problems), "problems": problems,
            "plan": [(src, str(dst)) for _, src, dst in plan[:1000]]}  # fmt: skip
    return frame, info


def _write_pages(frame: Any, req: DedupRequest, res: DedupResult) -> None:
    from pycore.curation.dedup import review
    from pycore.io import write_text_atomic

    if req.review is not None:
        page = review.render_review(frame, max_groups=req.review_max_groups, gallery=req.review_gallery,
                                    title=f"hw dedup review: {req.manifest.name}", quality=res.quality)  # fmt: skip
        write_text_atomic(req.review, page, overwrite=req.overwrite)
        res.review = req.review
    if req.plot is not None:
        write_text_atomic(req.plot, review.histograms_svg(frame, res.quality), overwrite=req.overwrite)
        res.plot = req.plot
