"""``hw spm-score`` as a Python function: score every image of a manifest against its prompt.

    from pycore.spm.score import ScoreRequest, score_manifest
    result = score_manifest(ScoreRequest("captioned.parquet", "scored.parquet", prompt_column="caption", model="spo-sdxl"))

The manifest is read with :meth:`pycore.manifest.Manifest.read` and written through
:meth:`~pycore.manifest.Manifest.derive`, so every earlier column and metadata key is kept and
``spm-score`` is appended to the history. Two columns are added: the score (``logit_scale.exp() ·
cos(image, text)``, PickScore's scale) and ``<column>_error``, the reason a row was not scored.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pycore.checks import check_int, dtype_name, parse_device
from pycore.errors import HwError, HwWarning, NothingDone, first_line
from pycore.progress import NO_PROGRESS, Progress
from pycore.spm.model import DEFAULT_BASE

#: Manifest statuses from reading the file: nothing to decode (too_large: a decompression bomb).
UNREADABLE_STATUSES = frozenset({"empty", "truncated", "not_image", "corrupt", "unsupported", "too_large", "permission_denied",
                                 "not_found", "broken_symlink", "symlink_loop", "not_a_file", "io_error"})  # fmt: skip
#: Largest --batch-size (images per forward pass): beyond it memory, not speed, grows.
MAX_SCORE_BATCH = 4096


@dataclass
class ScoreRequest:
    """What to score, with which model, and where the scored manifest goes."""

    manifest: str | Path  #: input manifest (.parquet) from hw bucket or any later command
    out: str | Path  #: output manifest (.parquet), written atomically
    prompt_column: str | None = None  #: column holding each image's prompt (text)
    prompt: str | None = None  #: one prompt for every image (instead of prompt_column)
    model: str = DEFAULT_BASE  #: spo-sdxl, spo-sd15, a checkpoint file, an hw spm-train folder or a CLIP/PickScore model
    base: str | None = None  #: CLIP config a released .bin was trained from
    processor: str | None = None  #: tokenizer source
    timestep: int = 0  #: diffusion timestep to score at (0 = clean images)
    column: str = "spm_score"  #: name of the score column
    dtype: str = "float32"
    device: str = "auto"  #: auto, cpu, cuda, cuda:N, mps
    batch_size: int = 16
    overwrite: bool = False  #: replace an existing output file and existing score columns
    ray: str | None = None  #: score on Ray at this address (pycore.distributed); the model loads once per worker
    ray_workers: int | None = None  #: with ray: at most this many concurrent tasks

    def __post_init__(self) -> None:
        from pycore.distributed import address_from
        from pycore.manifest_parts import check_manifest_out

        if (self.prompt_column is None) == (self.prompt is None):
            raise HwError("pass exactly one of --prompt-column and --prompt")
        if self.prompt is not None and not self.prompt.strip():
            raise HwError("--prompt is empty")
        check_int("--timestep", self.timestep, 0, 999, "the diffusion models' 1000 training steps")
        check_int("--batch-size", self.batch_size, 1, MAX_SCORE_BATCH)
        if not self.column.strip():
            raise HwError("--column must not be empty")
        self.dtype = dtype_name(self.dtype)
        self.device = parse_device(self.device)
        self.manifest, self.out = Path(self.manifest), Path(self.out)
        check_manifest_out(self.out, inputs=[self.manifest], overwrite=self.overwrite)
        self.ray = address_from(self.ray)
        if self.ray_workers is not None:
            check_int("--ray-workers", self.ray_workers, 1, 4096)

    @property
    def error_column(self) -> str:
        return f"{self.column}_error"


@dataclass
class ScoreResult:
    """What score_manifest did (the CLI prints it; --json prints it as is)."""

    out: str
    rows: int
    scored: int
    mean: float | None
    min: float | None
    max: float | None
    model: str
    timestep: int
    seconds: float
    error_column: str
    not_scored_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def not_scored(self) -> int:
        return self.rows - self.scored

    def to_dict(self) -> dict[str, Any]:
        return {"out": self.out, "rows": self.rows, "scored": self.scored, "not_scored": self.not_scored, "mean": self.mean,
                "min": self.min, "max": self.max, "model": self.model, "timestep": self.timestep, "seconds": self.seconds,
                "error_column": self.error_column, "not_scored_reasons": self.not_scored_reasons}  # fmt: skip


def _prompts(frame: Any, req: ScoreRequest) -> list[str | None]:
    import polars as pl

    if req.prompt is not None:
        return [req.prompt] * frame.height
    col = req.prompt_column
    if col not in frame.columns:
        raise HwError(f"manifest {req.manifest} has no column {col!r} (columns: {', '.join(frame.columns)})")
    dt = frame.schema[col]
    if dt not in (pl.String, pl.Categorical) and not isinstance(dt, pl.Enum):
        raise HwError(f"--prompt-column {col}: the column holds {dt} values; the prompt column must be text (e.g. caption)")
    return frame[col].cast(pl.String).to_list()


def read_image_tensor(path: str) -> Any:
    """An image reference → [3, H, W] fp32 tensor in [-1, 1] (EXIF orientation applied, RGB)."""
    import numpy as np
    import torch
    from PIL import ImageOps

    from pycore.sources import open_image
    from pycore.spm.data import ImageDecodeError

    try:
        with open_image(path) as im:  # a file, tar member or Parquet cell (pycore.sources)
            im = ImageOps.exif_transpose(im).convert("RGB")
    except Exception as e:  # PIL raises many types for corrupt data
        raise ImageDecodeError(f"cannot decode image: {type(e).__name__}: {first_line(e)}") from None
    arr = np.asarray(im, dtype=np.float32)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1) / 127.5 - 1.0


def score_files(model: Any, paths: list[str], prompts: list[str | None], *, timestep: int = 0, batch_size: int = 16,
                progress: Progress = NO_PROGRESS) -> tuple[list[float | None], list[str | None]]:  # fmt: skip
    """Score image files against prompts with an SPM at ``timestep``; per row a score or a reason."""
    import torch

    from pycore.spm.data import ImageDecodeError

    scores: list[float | None] = [None] * len(paths)
    errors: list[str | None] = [None] * len(paths)
    todo = [i for i, p in enumerate(prompts) if isinstance(p, str) and p.strip()]
    for i in set(range(len(paths))) - set(todo):
        errors[i] = "no prompt"
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        imgs, keep = [], []
        for i in chunk:
            try:
                imgs.append(read_image_tensor(paths[i]))
                keep.append(i)
            except (ImageDecodeError, OSError) as e:
                errors[i] = str(e)
        if keep:
            with torch.inference_mode():
                s = model.score(imgs, [prompts[i] for i in keep], timestep)
            for i, v in zip(keep, s.float().cpu().tolist(), strict=True):
                scores[i] = float(v)
        progress.advance(len(chunk))
    return scores, errors


class _Scorer:
    """Scores (paths, prompts) chunks: locally with the model loaded once, or as Ray Data jobs in
    one Ray session (the model loaded once per worker process)."""

    def __init__(self, req: ScoreRequest, dt: Any, progress: Progress) -> None:
        self.req, self.dt, self.progress = req, dt, progress
        self.spm: Any = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> _Scorer:
        if self.req.ray:
            from pycore import distributed

            self._stack.enter_context(distributed.session(self.req.ray, num_cpus=self.req.ray_workers))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def __call__(self, paths: list[str], prompts: list[str | None]) -> tuple[list[float | None], list[str | None]]:
        req = self.req
        if req.ray:
            from pycore import distributed

            unit = distributed.ScoreUnit(req.model, req.base, req.processor, req.dtype, req.device, req.timestep,
                                         req.batch_size)  # fmt: skip
            return distributed.score(paths, prompts, unit, address=req.ray, workers=req.ray_workers,
                                     progress=self.progress.advance)  # fmt: skip
        if self.spm is None:
            from pycore.spm.checkpoints import load_spm

            self.spm = load_spm(req.model, base=req.base, processor=req.processor, dtype=self.dt, device=req.device)
            self.spm.requires_grad_(False)
        return score_files(self.spm, paths, prompts, timestep=req.timestep, batch_size=req.batch_size, progress=self.progress)


@dataclass
class _Tally:
    """Running totals over parts (nothing per row is kept)."""

    rows: int = 0
    scored: int = 0
    total: float = 0.0
    lo: float | None = None
    hi: float | None = None
    reasons: Counter = field(default_factory=Counter)

    def add(self, scores: list[float | None], errors: list[str | None]) -> None:
        self.rows += len(scores)
        for v, r in zip(scores, errors, strict=True):
            if v is None:
                self.reasons[(r or "unknown").split(":")[0]] += 1
                continue
            self.scored += 1
            self.total += v
            self.lo = v if self.lo is None else min(self.lo, v)
            self.hi = v if self.hi is None else max(self.hi, v)


def _score_part(m: Any, req: ScoreRequest, scorer: _Scorer, tally: _Tally) -> Any:
    """One manifest (or one part of a folder) scored: the derived manifest to write."""
    import polars as pl

    from pycore.manifest import fs_paths

    frame = m.frame
    for c in (req.column, req.error_column):
        if c in frame.columns and not req.overwrite:
            raise HwError(f"manifest already has a column {c!r}; pass --column NAME or --overwrite to replace it")
    prompts = _prompts(frame, req)
    paths, statuses = fs_paths(frame), frame["status"].to_list()
    idx = [i for i, s in enumerate(statuses) if s not in UNREADABLE_STATUSES]
    scores: list[float | None] = [None] * frame.height
    errors: list[str | None] = [f"status {s}" if s in UNREADABLE_STATUSES else None for s in statuses]
    s, e = scorer([paths[i] for i in idx], [prompts[i] for i in idx]) if idx else ([], [])
    scorer.progress.advance(frame.height - len(idx))
    for k, i in enumerate(idx):
        scores[i], errors[i] = s[k], e[k]
    tally.add(scores, errors)
    frame = frame.with_columns(pl.Series(req.column, scores, dtype=pl.Float32), pl.Series(req.error_column, errors, dtype=pl.String))
    meta = {"spm_score": {"model": req.model, "timestep": req.timestep, "dtype": req.dtype, "column": req.column,
                          "prompt_column": req.prompt_column, "prompt": req.prompt}}  # fmt: skip
    return m.derive(frame, "spm-score", meta)


def score_manifest(req: ScoreRequest, progress: Progress = NO_PROGRESS) -> ScoreResult:
    """Score ``req.manifest`` and write ``req.out``; raises NothingDone when no image could be scored.

    A folder of parts written to a folder is scored part by part (one part's rows in memory,
    the model loaded once); otherwise the manifest is read whole."""
    from pycore.checks import parse_dtype
    from pycore.manifest import Manifest
    from pycore.manifest_parts import PartsWriter, part_files, wants_parts

    t0 = time.perf_counter()
    rows = _row_count(req.manifest)
    if rows == 0:
        raise NothingDone(f"manifest {req.manifest} has no rows; nothing to score")
    dt = parse_dtype(req.dtype)
    if req.device == "cpu" and req.dtype == "float16":
        warnings.warn("fp16 on CPU is slow and not supported by every op; use fp32 or bf16 on CPU", HwWarning, stacklevel=2)
    tally = _Tally()
    progress.stage("scoring on Ray" if req.ray else "scoring", rows, "img")
    with _Scorer(req, dt, progress) as scorer:
        if Path(req.manifest).is_dir() and wants_parts(req.out):
            with PartsWriter(req.out, len(part_files(req.manifest)), overwrite=req.overwrite) as w:
                for m in Manifest.parts(req.manifest):
                    w.write(_score_part(m, req, scorer, tally))
        else:
            _score_part(Manifest.read(req.manifest), req, scorer, tally).write(req.out, overwrite=req.overwrite)
    result = ScoreResult(out=str(req.out), rows=tally.rows, scored=tally.scored,
                         mean=tally.total / tally.scored if tally.scored else None, min=tally.lo, max=tally.hi,
                         model=req.model, timestep=req.timestep, seconds=round(time.perf_counter() - t0, 3),
                         error_column=req.error_column, not_scored_reasons=dict(tally.reasons))  # fmt: skip
    if not tally.scored:
        why = ", ".join(f"{k} {v:,}" for k, v in tally.reasons.items())
        raise NothingDone(f"none of the {tally.rows:,} images could be scored ({why}); the reasons are in column "
                          f"{req.error_column} of {req.out}")  # fmt: skip
    return result


def _row_count(path: Path) -> int:
    """Rows of a manifest file or folder from the Parquet footers (no rows read)."""
    import polars as pl

    from pycore.errors import ManifestError
    from pycore.manifest_parts import part_files

    files = part_files(path) if Path(path).is_dir() else [Path(path)]
    if not files[0].is_file():
        raise ManifestError(f"manifest {path} does not exist")
    try:
        return int(pl.scan_parquet(files).select(pl.len()).collect().item())
    except (pl.exceptions.PolarsError, OSError) as e:
        raise ManifestError(f"cannot read manifest {path}: {first_line(e)}") from None
