"""`hw caption` as one function: :func:`caption_manifest` (a :class:`CaptionRequest` in, a
:class:`CaptionResult` out). The CLI parses options into the request and renders the result;
notebooks and training scripts call it directly::

    from pycore.caption.request import CaptionRequest
    from pycore.caption.run import caption_manifest

    res = caption_manifest(CaptionRequest("m.parquet", "captioned.parquet",
                                          base_url="http://localhost:8000/v1", model="Qwen2-VL-7B"))
    print(res.merge.ok, "captioned;", res.merge.pending, "left for the next run")

Steps: plan the rows (byte-identical files share one request), get every missing result (the
OpenAI-compatible server, open_clip, or Batch API files) into the durable store, score
aesthetics when quality words come from them, merge into the manifest (derived from the input's,
so every earlier column and metadata key is kept), then the optional sidecars and kohya metadata.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pycore.caption.outputs import SidecarReport
from pycore.caption.pipeline import DEFAULT_PERCENTILES, Plan, QualityMapping, distribution, missing, plan_rows
from pycore.caption.request import CaptionRequest
from pycore.caption.store import MergeReport, ResultStore, job_fingerprint, merge
from pycore.checks import check_output, resolve_threads
from pycore.errors import HwError, NothingDone
from pycore.manifest import Manifest
from pycore.progress import NO_PROGRESS, Progress

__all__ = ["CaptionRequest", "CaptionResult", "NothingCaptioned", "caption_manifest"]


@dataclass
class CaptionResult:
    """What a run did. ``to_dict()`` is the CLI's ``--json`` report."""

    manifest: str
    out: str
    backend: str
    model: str
    store: str
    job: str
    rows: int
    unique_images: int
    duplicates: int
    reused_from_store: int
    asked: int = 0  #: images requested from the backend (or read from batch files) this run
    captioned_now: int = 0  #: of those, captioned
    merge: MergeReport | None = None
    api: dict[str, Any] | None = None
    openclip: dict[str, Any] | None = None
    aesthetic: dict[str, Any] | None = None
    batch_import: dict[str, Any] | None = None
    batch_export: dict[str, Any] | None = None
    store_bad_lines: int = 0
    quality_distribution: dict[str, int] | None = None
    sidecars: SidecarReport | None = None
    metadata: dict[str, Any] | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: getattr(self, k) for k in ("manifest", "out", "backend", "model", "store", "job", "rows",
                                                          "unique_images", "duplicates", "reused_from_store", "asked",
                                                          "captioned_now")}  # fmt: skip
        if self.store_bad_lines:
            d["store_bad_lines"] = self.store_bad_lines
        if self.merge is not None:
            d.update(self.merge.to_dict())
        for k in ("api", "openclip", "aesthetic", "batch_import", "batch_export", "quality_distribution", "metadata"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        if self.sidecars is not None:
            d["sidecars"] = self.sidecars.to_dict()
        d["seconds"] = round(self.seconds, 3)
        return d


class NothingCaptioned(NothingDone):
    """The run asked for captions and got none (exit 3); ``result`` holds what was written."""

    def __init__(self, message: str, result: CaptionResult):
        super().__init__(message)
        self.result = result


@dataclass
class _Backend:
    """The resolved backend: its config, the job fingerprint and the model's label."""

    job: str
    model: str
    openai: Any = None
    openclip: Any = None
    api_key: str | None = field(default=None, repr=False)


def _backend(req: CaptionRequest, threads: int) -> _Backend:
    if req.backend == "openai":
        from pycore.caption.openai_backend import OpenAIConfig

        prompt = req.read_prompt()
        extra: dict[str, Any] = {"prompt": prompt} if prompt is not None else {}
        cfg = OpenAIConfig(base_url=req.base_url, model=req.model, concurrency=req.concurrency, max_attempts=req.max_attempts,
                           timeout=req.timeout, max_side=req.max_side, detail=req.detail, temperature=req.temperature,
                           max_tokens=req.max_tokens, encode_threads=threads if req.threads else 0,
                           **extra)  # fmt: skip
        key = req.resolved_api_key()
        online = req.batch_export is None and not req.batch_import
        if key is None and online and "api.openai.com" in cfg.base_url:
            raise HwError(f"set the API key in ${req.api_key_env} (or choose another variable with --api-key-env)")
        return _Backend(job_fingerprint(cfg.job_options()), cfg.model, openai=cfg, api_key=key)
    from pycore.caption.openclip_backend import OpenClipConfig

    occ = OpenClipConfig(coca_model=req.coca_model, coca_pretrained=req.coca_pretrained, clip_model=req.clip_model,
                         clip_pretrained=req.clip_pretrained, aesthetic_weights=req.aesthetic_weights, tag_files=req.tags,
                         style_files=req.styles, n_tags=req.n_tags, device=req.device, batch_size=req.batch_size,
                         max_len=req.summary_tokens)  # fmt: skip
    return _Backend(job_fingerprint(occ.job_options()), occ.model_label, openclip=occ)


def _check_outputs(req: CaptionRequest, src: Manifest) -> Path | None:
    """Every output checked before any work; returns the dataset root for --sidecar."""
    _check_store(req.store_dir)
    if req.batch_export is not None:
        if req.batch_export.exists() and not req.batch_export.is_dir():
            raise HwError(f"--batch-export {req.batch_export} is a file; this output is a folder")
        return None
    from pycore.manifest_parts import check_manifest_out

    check_manifest_out(req.out, inputs=[req.manifest], overwrite=req.overwrite)
    check_output(req.metadata, inputs=[req.manifest, req.out], overwrite=req.overwrite, option="--metadata")
    if not req.sidecar:
        return None
    root = req.root or (Path(src.meta["root"]) if src.meta.get("root") else None)
    if root is None:
        raise HwError("--sidecar needs --root (the manifest does not record the folder `hw bucket` scanned)")
    if not root.is_dir():
        raise HwError(f"dataset root {root} is not a folder (needed for --sidecar)")
    return root


def _check_store(folder: Path) -> None:
    """The result store can be created and written (every result is appended there as it arrives)."""
    import os

    if folder.exists() and not folder.is_dir():
        raise HwError(f"--store {folder} is a file; the result store is a folder")
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise HwError(f"--store {folder}: {probe} is not a writable folder")


def caption_manifest(req: CaptionRequest, progress: Progress = NO_PROGRESS) -> CaptionResult:
    """Caption ``req.manifest`` into ``req.out`` (see the module doc).

    Raises :class:`HwError` before any work for bad options or outputs, ``FatalApiError`` when
    the server rejects the key/model/URL or cannot be reached (finished results stay in the
    store), and :class:`NothingCaptioned` (exit 3) after writing everything when none of the
    images asked for was captioned.
    """
    t0 = time.perf_counter()
    threads = resolve_threads(req.threads)
    src = Manifest.read(req.manifest)
    root = _check_outputs(req, src)
    mapping = QualityMapping(percentiles=req.quality_percentiles or DEFAULT_PERCENTILES, scores=req.quality_scores)
    be = _backend(req, threads)
    plan = plan_rows(src.frame, overwrite=req.overwrite, threads=threads)
    store = ResultStore(req.store_dir, be.job)
    records = store.load()
    res = CaptionResult(manifest=str(req.manifest), out=str(req.out), backend=req.backend, model=be.model, store=str(req.store_dir),
                        job=be.job, rows=src.frame.height, unique_images=len(plan.unique), duplicates=plan.duplicates,
                        reused_from_store=sum(1 for k in plan.unique if k in records),
                        store_bad_lines=store.report.bad_lines)  # fmt: skip
    if req.batch_export is not None:
        return _export(req, plan, records, be, store, res, progress, threads, t0)
    pending: dict[str, str] = {}
    with store:
        if req.batch_import:
            _import(req, plan, be, store, res)
        else:
            _caption(req, plan, records, be, store, res, pending, progress)
        records = store.load()
        scores = _aesthetic_scores(req, plan, records, res, progress) if req.use_aesthetic else None
    words = mapping.words(scores) if scores is not None else None
    merged, res.merge = merge(src.frame, plan.keys, records, todo=plan.todo, keep=plan.keep, skip_reasons=plan.skip_reasons,
                              prefix=req.prefix, keep_tokens=req.keep_tokens, quality_words=words, scores=scores,
                              pending_reasons=pending)  # fmt: skip
    src.derive(merged, "caption", {"caption": _section(req, be, mapping)}).write(req.out, overwrite=req.overwrite)
    if words is not None:
        res.quality_distribution = distribution(merged["quality"].to_list())
    _side_outputs(req, merged, root, res)
    res.seconds = time.perf_counter() - t0
    if res.asked and not res.captioned_now:
        raise NothingCaptioned(f"0 of the {res.asked:,} image(s) asked were captioned (see caption_error in {req.out})", res)
    return res


def _section(req: CaptionRequest, be: _Backend, mapping: QualityMapping) -> dict[str, Any]:
    """This command's metadata section (no secrets: the URL without credentials or query)."""
    from pycore.caption.openai_backend import public_url

    opts: dict[str, Any] = {"backend": req.backend, "model": be.model, "prefix": req.prefix, "keep_tokens": req.keep_tokens,
                            "quality_from": "aesthetic" if req.use_aesthetic else "model",
                            "quality_percentiles": list(mapping.percentiles),
                            "quality_scores": list(mapping.scores) if mapping.scores else None, "job": be.job}  # fmt: skip
    if be.openai is not None:
        opts.update(base_url=public_url(be.openai.base_url), max_side=be.openai.max_side, detail=be.openai.detail)
    return opts


def _items(req: CaptionRequest, plan: Plan, records: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    items = missing(plan, records, retry_failed=req.retry_failed)
    return items[: req.limit] if req.limit is not None else items


def _caption(req: CaptionRequest, plan: Plan, records, be: _Backend, store: ResultStore, res: CaptionResult,
             pending: dict[str, str], progress: Progress) -> None:  # fmt: skip
    """Ask the backend for every missing image; ok/failed go to the store, transport failures to ``pending``."""
    items = _items(req, plan, records)
    res.asked = len(items)
    if not items:
        return
    progress.stage("captioning", len(items), "img")

    def keep(recs: list[dict[str, Any]]) -> None:
        stored = [r for r in recs if r["status"] != "pending"]
        pending.update((r["key"], r["error"]) for r in recs if r["status"] == "pending")
        store.append_many(stored)
        res.captioned_now += sum(r["status"] == "ok" for r in stored)
        progress.advance(len(recs))

    if req.ray:
        _caption_on_ray(req, items, be, res, pending, progress)
    elif be.openai is not None:
        from pycore.caption.openai_backend import OpenAICaptioner

        res.api = OpenAICaptioner(be.openai, be.api_key, job=be.job).run(items, lambda r: keep([r])).to_dict()
    else:
        from pycore.caption.openclip_backend import OpenClipCaptioner

        res.openclip = OpenClipCaptioner(be.openclip, job=be.job).run(items, keep)


def _caption_on_ray(req: CaptionRequest, items: list[tuple[str, str]], be: _Backend, res: CaptionResult,
                    pending: dict[str, str], progress: Progress) -> None:  # fmt: skip
    """The same captioning as a Ray Data job: workers append to the same store (durable, resumable),
    the key stays in the workers' environment (pycore.distributed.CaptionUnit)."""
    from pycore import distributed

    assert req.ray is not None
    unit = distributed.CaptionUnit("openai" if be.openai is not None else "openclip", be.openai or be.openclip,
                                   be.job, str(req.store_dir.resolve()), req.api_key_env)  # fmt: skip
    run = distributed.caption(items, unit, address=req.ray, workers=req.ray_workers, progress=progress.advance)
    pending.update(run.pending)
    res.captioned_now += run.captioned
    summed = _sum_stats(run.stats)
    summed["resumed_in_retried_units"] = run.resumed
    if be.openai is not None:
        res.api = summed
    else:
        res.openclip = summed


def _sum_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-unit statistics added up (numbers summed, nested counts merged)."""
    out: dict[str, Any] = {}
    for s in stats:
        for k, v in s.items():
            if isinstance(v, bool) or not isinstance(v, (int, float, dict)):
                out.setdefault(k, v)
            elif isinstance(v, dict):
                d = out.setdefault(k, {})
                for kk, vv in v.items():
                    d[kk] = d.get(kk, 0) + vv if isinstance(vv, (int, float)) else vv
            else:
                out[k] = out.get(k, 0) + v
    return out


def _import(req: CaptionRequest, plan: Plan, be: _Backend, store: ResultStore, res: CaptionResult) -> None:
    from pycore.caption.batch import import_batch

    rep = import_batch(req.batch_import, store, model=be.model, wanted=set(plan.unique))
    res.batch_import = rep.to_dict()
    if rep.other_job and not rep.ok and not rep.failed:
        raise HwError(f"none of the {rep.other_job} batch result line(s) belong to this job: use the same --model, "
                      "--prompt-file, --max-side, --detail, --temperature and --max-tokens as for --batch-export")  # fmt: skip
    res.asked, res.captioned_now = rep.ok + rep.failed, rep.ok
    if not rep.ok:
        res.asked = max(res.asked, 1)  # reading result files that hold no caption did nothing asked


def _export(req: CaptionRequest, plan: Plan, records, be: _Backend, store: ResultStore, res: CaptionResult,
            progress: Progress, threads: int, t0: float) -> CaptionResult:  # fmt: skip
    """Write Batch API request files for the missing images and stop (no manifest)."""
    from pycore.caption.batch import export_batch

    items = _items(req, plan, records)
    progress.stage("encoding", len(items), "img")
    with store:
        assert req.batch_export is not None  # caption_manifest only calls this for an export
        rep = export_batch(items, be.openai, req.batch_export, job=be.job, store=store, overwrite=req.overwrite,
                           threads=threads, progress=progress.advance)  # fmt: skip
    res.batch_export = rep.to_dict()
    res.seconds = time.perf_counter() - t0
    if not rep.requests:
        why = f"all {len(items):,} image(s) unreadable" if items else "every image already has a result in the store"
        raise NothingCaptioned(f"no Batch API request written: {why}", res)
    return res


def _aesthetic_scores(req: CaptionRequest, plan: Plan, records, res: CaptionResult, progress: Progress) -> dict[str, float]:
    """Scores for every unique image: from the openclip records, or the aesthetic scorer (its own job in the store)."""
    if req.backend == "openclip":
        return {k: float(r["score"]) for k, r in records.items() if k in plan.unique and r.get("score") is not None}
    from pycore.caption.openclip_backend import AestheticConfig, AestheticScorer

    acfg = AestheticConfig(clip_model=req.clip_model, clip_pretrained=req.clip_pretrained, weights=req.aesthetic_weights,
                           device=req.device, batch_size=req.batch_size, max_side=req.max_side)  # fmt: skip
    astore = ResultStore(req.store_dir, job_fingerprint(acfg.job_options()))
    have = astore.load()
    todo = [(k, p) for k, p in plan.unique.items() if k not in have]
    if todo:
        progress.stage("aesthetic scores", len(todo), "img")

        def keep(recs: list[dict[str, Any]]) -> None:
            astore.append_many(recs)
            progress.advance(len(recs))

        with astore:
            res.aesthetic = AestheticScorer(acfg, job=astore.job).run(todo, keep)
        have = astore.load()
    return {k: float(r["score"]) for k, r in have.items() if k in plan.unique and r.get("score") is not None}


def _side_outputs(req: CaptionRequest, merged, root: Path | None, res: CaptionResult) -> None:
    if root is not None:
        from pycore.caption.outputs import write_sidecars

        res.sidecars = write_sidecars(merged, root, overwrite=req.overwrite)
    if req.metadata is not None:
        from pycore.caption.outputs import export_metadata

        res.metadata = {"path": str(req.metadata), "images": export_metadata(merged, req.metadata, overwrite=req.overwrite)}
