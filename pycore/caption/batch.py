"""OpenAI Batch API: export requests as JSONL files, import the result files back.

Export writes ``batch-0001.jsonl``, ``batch-0002.jsonl`` … in a folder, each at most 50,000
requests and 200 MB (the Batch API's limits), one line per unique image::

    {"custom_id": "hw-<job>-<content_hash>", "method": "POST", "url": "/v1/chat/completions", "body": {…}}

The body is exactly what the online backend sends. Upload them with ``completion_window`` 24h;
the output (and error) files you download are read back with ``--batch-import`` into the same
result store as online results, then merged into the manifest. The job id in ``custom_id``
makes sure results only land in the job (model, prompt, image settings) that asked for them.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pycore.caption.openai_backend import OpenAIConfig, ReplyError, parse_reply, request_body
from pycore.caption.store import ResultStore, failed_record, ok_record
from pycore.errors import HwError

MAX_REQUESTS = 50_000
MAX_BYTES = 200 * 1024 * 1024
CUSTOM_PREFIX = "hw-"


def custom_id(job: str, key: str) -> str:
    return f"{CUSTOM_PREFIX}{job}-{key}"


def parse_custom_id(cid: str) -> tuple[str, str] | None:
    if not isinstance(cid, str) or not cid.startswith(CUSTOM_PREFIX):
        return None
    job, sep, key = cid[len(CUSTOM_PREFIX) :].partition("-")
    return (job, key) if sep and job and key else None


@dataclass
class ExportReport:
    files: list[str] = field(default_factory=list)
    requests: int = 0
    bytes: int = 0
    failed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class _Splitter:
    """Write lines into numbered files, starting a new one before a limit would be crossed."""

    def __init__(self, folder: Path, max_requests: int, max_bytes: int):
        self.folder, self.max_requests, self.max_bytes = folder, max_requests, max_bytes
        self.n = 0
        self.count = 0
        self.size = 0
        self.fh = None
        self.tmp: Path | None = None
        self.done: list[Path] = []

    def _target(self) -> Path:
        return self.folder / f"batch-{self.n:04d}.jsonl"

    def _close(self) -> None:
        if self.fh is not None:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
            os.replace(self.tmp, self._target())
            self.done.append(self._target())
            self.fh = None

    def write(self, line: bytes) -> None:
        if len(line) > self.max_bytes:
            raise HwError(f"one request is {len(line):,} bytes, more than the {self.max_bytes:,}-byte file limit")
        if self.fh is None or self.count >= self.max_requests or self.size + len(line) > self.max_bytes:
            self._close()
            self.n += 1
            self.tmp = self.folder / f".batch-{self.n:04d}.jsonl.tmp"
            self.fh = open(self.tmp, "wb")
            self.count = self.size = 0
        self.fh.write(line)
        self.count += 1
        self.size += len(line)

    def finish(self) -> list[Path]:
        self._close()
        return self.done

    def abort(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.tmp.unlink(missing_ok=True)
            self.fh = None


def export_batch(
    items: Sequence[tuple[str, str]],
    cfg: OpenAIConfig,
    folder: str | os.PathLike[str],
    *,
    job: str,
    store: ResultStore | None = None,
    overwrite: bool = False,
    max_requests: int = MAX_REQUESTS,
    max_bytes: int = MAX_BYTES,
    threads: int = 0,
    progress: Callable[[int], None] | None = None,
) -> ExportReport:
    """Write Batch API request files for ``items`` ((key, path)); unreadable images go to ``store`` as failures."""
    from pycore.caption.images import ImageLoadError, data_url

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    existing = sorted(folder.glob("batch-*.jsonl"))
    if existing and not overwrite:
        raise HwError(f"{folder} already holds batch files ({existing[0].name} …); pass --overwrite to replace them")
    for f in existing:
        f.unlink()
    rep = ExportReport()
    split = _Splitter(folder, max_requests, max_bytes)

    def encode(item: tuple[str, str]) -> tuple[str, str | None, str | None]:
        key, path = item
        try:
            return key, data_url(path, cfg.max_side, cfg.jpeg_quality), None
        except ImageLoadError as e:
            return key, None, str(e)

    try:
        with ThreadPoolExecutor(max_workers=threads or (os.cpu_count() or 1)) as pool:
            for key, url, err in pool.map(encode, items):
                if url is None:
                    rep.failed += 1
                    if store is not None:
                        store.append(failed_record(key, job, err or "cannot read image", model=cfg.model, attempts=0))
                else:
                    line = {"custom_id": custom_id(job, key), "method": "POST", "url": "/v1/chat/completions", "body": request_body(cfg, url)}
                    data = (json.dumps(line, separators=(",", ":")) + "\n").encode("utf-8")
                    split.write(data)
                    rep.requests += 1
                    rep.bytes += len(data)
                if progress:
                    progress(1)
    except BaseException:
        split.abort()
        raise
    rep.files = [str(p) for p in split.finish()]
    return rep


@dataclass
class ImportReport:
    lines: int = 0
    ok: int = 0
    failed: int = 0
    other_job: int = 0
    unknown: int = 0
    bad_lines: int = 0
    usage: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {"lines": self.lines, "ok": self.ok, "failed": self.failed, "other_job": self.other_job,
                "unknown": self.unknown, "bad_lines": self.bad_lines, "usage": dict(self.usage),
                "failures": dict(self.failures)}  # fmt: skip


def _lines(files: Iterable[str | os.PathLike[str]]) -> Iterable[bytes]:
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise HwError(f"batch result file {p} does not exist")
        with open(p, "rb") as fh:
            yield from fh


def import_batch(files: Iterable[str | os.PathLike[str]], store: ResultStore, *, model: str, wanted: set[str] | None = None) -> ImportReport:
    """Read Batch API output/error files into ``store`` (this job's lines only)."""
    rep = ImportReport()
    records = []
    for raw in _lines(files):
        if not raw.strip():
            continue
        rep.lines += 1
        try:
            line = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            rep.bad_lines += 1
            continue
        parsed = parse_custom_id(line.get("custom_id")) if isinstance(line, dict) else None
        if parsed is None:
            rep.unknown += 1
            continue
        job, key = parsed
        if job != store.job:
            rep.other_job += 1
            continue
        if wanted is not None and key not in wanted:
            rep.unknown += 1
            continue
        resp = line.get("response") or {}
        err = line.get("error")
        status = resp.get("status_code") if isinstance(resp, dict) else None
        body = resp.get("body") if isinstance(resp, dict) else None
        if err or status != 200:
            msg = ""
            if isinstance(err, dict):
                msg = f"{err.get('code') or ''}: {err.get('message') or ''}".strip(": ")
            elif isinstance(body, dict) and isinstance(body.get("error"), dict):
                msg = str(body["error"].get("message") or "")
            reason = f"batch error HTTP {status}" if status else "batch error"
            rec = failed_record(key, store.job, f"{reason}: {' '.join(msg.split())[:200]}" if msg else reason, model=model)
        else:
            try:
                caption, usage = parse_reply(body)
                for k, v in usage.items():
                    rep.usage[k] += v
                rec = ok_record(key, store.job, caption, model=model)
            except ReplyError as e:
                rec = failed_record(key, store.job, str(e), model=model)
        if rec["status"] == "ok":
            rep.ok += 1
        else:
            rep.failed += 1
            rep.failures[rec["error"].split(":", 1)[0]] += 1
        records.append(rec)
    store.append_many(records)
    return rep
