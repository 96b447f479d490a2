"""Durable, append-only result shards keyed by content hash, and merging them into a manifest.

Every finished request (a caption or a failure with its reason) is one JSON line appended to a
shard file, flushed and fsync'd before the next result is counted as done, so a crash or
``kill -9`` loses at most the line being written. Each run appends to a new shard file
(``shard-<time>-<pid>.jsonl``) in the store folder, so a torn last line of a killed run is never
glued to new data; unreadable lines are skipped on load.

Records carry a *job* fingerprint (backend, model, prompt, image settings …). Re-running the
same command reuses the records of its job and requests only what is missing; changing the
model or prompt starts a new job in the same folder without mixing results. Output-only options
(--prefix, --keep-tokens, sidecars) are not part of the job: they are applied when merging.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from pycore.errors import HwError

RECORD_VERSION = 1


def job_fingerprint(options: dict[str, Any]) -> str:
    """A short stable id of everything that determines a request's result."""
    blob = json.dumps(options, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def default_store_dir(out: str | os.PathLike[str]) -> Path:
    """The store folder beside the output manifest: ``OUT.parquet`` → ``OUT.parquet.captions/``."""
    out = Path(out)
    return out.with_name(out.name + ".captions")


def ok_record(key: str, job: str, caption: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    return {"v": RECORD_VERSION, "key": key, "job": job, "status": "ok", "caption": caption, "error": None, **extra}


def failed_record(key: str, job: str, error: str, **extra: Any) -> dict[str, Any]:
    return {"v": RECORD_VERSION, "key": key, "job": job, "status": "failed", "caption": None, "error": error, **extra}


def pending_record(key: str, job: str, error: str, **extra: Any) -> dict[str, Any]:
    """A request that got no answer (server unreachable, time-outs): reported, never stored."""
    return {"v": RECORD_VERSION, "key": key, "job": job, "status": "pending", "caption": None, "error": error, **extra}


#: The outcomes a store keeps: an image's caption or an answer about it. Transport failures
#: (status "pending") say nothing about the image and are never stored.
STORED_STATUSES = ("ok", "failed")


def _check_storable(records: Iterable[dict[str, Any]]) -> None:
    for r in records:
        if r.get("status") not in STORED_STATUSES:
            raise ValueError(f"record of {r.get('key')} has status {r.get('status')!r}; only ok/failed are stored")


@dataclass
class LoadReport:
    files: int = 0
    records: int = 0
    bad_lines: int = 0
    other_jobs: int = 0


class ResultStore:
    """Append-only JSONL shards in one folder. Thread-safe appends; each one fsync'd."""

    def __init__(self, folder: str | os.PathLike[str], job: str, *, tag: str = ""):
        """``tag`` (``[A-Za-z0-9_]``): this writer's shard names end in ``-TAG.jsonl`` and
        :meth:`load_tagged` reads only those (a Ray unit retried after its worker died reads back
        what it already finished without reading the whole store)."""
        if tag and not tag.replace("_", "").isalnum():
            raise ValueError(f"store tag {tag!r} must be letters, digits and _")
        self.folder = Path(folder)
        self.job = job
        self.tag = tag
        self._fd: int | None = None
        self._lock = threading.Lock()
        self.appended = 0
        self.report = LoadReport()

    # -- reading ---------------------------------------------------------------------------
    def shard_files(self, tag: str | None = None) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(self.folder.glob(f"shard-*-{tag}.jsonl" if tag else "shard-*.jsonl"))

    def iter_records(self, tag: str | None = None) -> Iterator[dict[str, Any]]:
        """Every readable record of every job (of the shards written with ``tag`` when given),
        oldest shard first."""
        rep = LoadReport()
        for f in self.shard_files(tag):
            rep.files += 1
            with open(f, "rb") as fh:
                for raw in fh:
                    try:
                        rec = json.loads(raw)
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        rep.bad_lines += 1  # e.g. the torn last line of a killed run
                        continue
                    if not isinstance(rec, dict) or "key" not in rec or rec.get("status") not in STORED_STATUSES:
                        rep.bad_lines += 1
                        continue
                    rep.records += 1
                    yield rec
        self.report = rep

    def load_tagged(self) -> dict[str, dict[str, Any]]:
        """:meth:`load` of the shards this store's ``tag`` wrote (in this or an earlier attempt)."""
        return self.load(tag=self.tag or None)

    def load(self, tag: str | None = None) -> dict[str, dict[str, Any]]:
        """This job's latest record per key; a success is never replaced by a later failure."""
        best: dict[str, dict[str, Any]] = {}
        other = 0
        for rec in self.iter_records(tag):
            if rec.get("job") != self.job:
                other += 1
                continue
            prev = best.get(rec["key"])
            if prev is None or rec["status"] == "ok" or prev["status"] == "failed":
                best[rec["key"]] = rec
        self.report.other_jobs = other
        return best

    # -- writing ---------------------------------------------------------------------------
    def _open(self) -> int:
        if self._fd is None:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise HwError(f"cannot create the caption store {self.folder}: {e.strerror or e}") from None
            name = f"shard-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{time.time_ns() % 1_000_000_000:09d}-{os.getpid()}"
            name += f"-{self.tag}.jsonl" if self.tag else ".jsonl"
            self._fd = os.open(self.folder / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o644)
            dfd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(dfd)  # the new file's name is durable too
            finally:
                os.close(dfd)
        return self._fd

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as one line and fsync it before returning."""
        _check_storable((record,))
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        with self._lock:
            fd = self._open()
            view = memoryview(line)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
            self.appended += 1

    def append_many(self, records: Iterable[dict[str, Any]]) -> None:
        """Several records with one fsync (for batched backends)."""
        records = list(records)
        _check_storable(records)
        data = b"".join((json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8") for r in records)
        if not data:
            return
        with self._lock:
            fd = self._open()
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
            self.appended += data.count(b"\n")

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------
# Merging into the manifest

#: Columns `hw caption` writes (their types are in pycore.manifest.COLUMNS).
CAPTION_COLUMNS = (
    "caption", "summary", "elements", "inspired_by", "quality", "caption_status", "caption_error",
    "caption_tokens", "caption_too_long", "caption_model", "aesthetic",
)  # fmt: skip


@dataclass
class MergeReport:
    rows: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    pending: int = 0
    kept: int = 0
    too_long: int = 0
    max_tokens: int = 0
    failures: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def failure_kind(error: str) -> str:
    """A short category of a failure reason, for the report ("refused", "HTTP 429", …)."""
    return error.split(":", 1)[0].split(" after ", 1)[0].strip()[:60]


def merge(
    frame: pl.DataFrame,
    keys: list[str | None],
    results: dict[str, dict[str, Any]],
    *,
    todo: set[int],
    keep: set[int],
    skip_reasons: dict[int, str] | None = None,
    prefix: str | None = None,
    keep_tokens: bool = False,
    quality_words: dict[str, str] | None = None,
    scores: dict[str, float] | None = None,
    max_tokens: int = 75,
    pending_reasons: dict[str, str] | None = None,
) -> tuple[pl.DataFrame, MergeReport]:
    """Add the caption columns to ``frame``.

    ``keys[i]`` is row i's content hash; ``todo`` the rows this run captions, ``keep`` the rows
    whose existing caption columns are kept as they are. Every other row is ``skipped`` (its
    ``status`` is not ok or it has no readable file). ``quality_words`` (key → word) replaces the
    model's quality word (aesthetic percentiles); ``scores`` fills the ``aesthetic`` column.
    """
    n = frame.height
    rep = MergeReport(rows=n)
    old = {c: (frame[c].to_list() if c in frame.columns else [None] * n) for c in CAPTION_COLUMNS}
    cols: dict[str, list[Any]] = {c: [None] * n for c in CAPTION_COLUMNS}
    statuses = frame["status"].to_list()
    for i in range(n):
        key = keys[i]
        if i in keep:
            for c in CAPTION_COLUMNS:
                cols[c][i] = old[c][i]
            rep.kept += 1
            rep.ok += 1
            if old["caption_too_long"][i]:
                rep.too_long += 1
            continue
        if i not in todo:
            cols["caption_status"][i] = "skipped"
            why = (skip_reasons or {}).get(i)
            cols["caption_error"][i] = why or f"image status {statuses[i]}"
            rep.skipped += 1
            continue
        rec = results.get(key) if key is not None else None
        if scores is not None and key in scores:
            cols["aesthetic"][i] = float(scores[key])
        if rec is None:
            cols["caption_status"][i] = "pending"
            why = (pending_reasons or {}).get(key)  # type: ignore[arg-type]
            cols["caption_error"][i] = (f"not captioned: {why}; run the command again" if why else
                                        "not captioned yet (interrupted run or --limit); run the command again")  # fmt: skip
            rep.pending += 1
            continue
        cols["caption_model"][i] = rec.get("model")
        if rec.get("score") is not None:
            cols["aesthetic"][i] = float(rec["score"])
        if rec["status"] != "ok":
            cols["caption_status"][i] = "failed"
            cols["caption_error"][i] = rec.get("error") or "failed"
            rep.failed += 1
            kind = failure_kind(cols["caption_error"][i])
            rep.failures[kind] = rep.failures.get(kind, 0) + 1
            continue
        cap = dict(rec["caption"])
        if quality_words is not None and key in quality_words:
            cap["quality"] = quality_words[key]
        _put_caption(cols, i, cap, rep, prefix=prefix, keep_tokens=keep_tokens, max_tokens=max_tokens)
    from pycore.manifest import COLUMNS

    series = [pl.Series(c, cols[c], dtype=COLUMNS.get(c)) for c in CAPTION_COLUMNS]
    out = frame.drop([c for c in CAPTION_COLUMNS if c in frame.columns]).with_columns(series)
    return out, rep


def _put_caption(cols: dict[str, list[Any]], i: int, cap: dict[str, Any], rep: MergeReport, *,
                 prefix: str | None, keep_tokens: bool, max_tokens: int) -> None:  # fmt: skip
    """Row i's caption columns from a structured caption."""
    from pycore.caption.schema import assemble, clip_token_count

    text = assemble(cap, prefix=prefix, keep_tokens=keep_tokens)
    ntok = clip_token_count(text)
    cols["caption"][i] = text
    cols["summary"][i] = cap["summary"]
    cols["elements"][i] = list(cap.get("elements") or [])
    cols["inspired_by"][i] = cap.get("inspired_by")
    cols["quality"][i] = cap.get("quality")
    cols["caption_status"][i] = "ok"
    cols["caption_tokens"][i] = ntok
    cols["caption_too_long"][i] = ntok > max_tokens
    rep.ok += 1
    rep.too_long += ntok > max_tokens
    rep.max_tokens = max(rep.max_tokens, ntok)
