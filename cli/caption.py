"""`hw caption`: structured, resumable captions from an OpenAI-compatible vision model or offline open_clip."""

from __future__ import annotations

import os
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cli.common import Json, Out, Overwrite, Threads, console, print_json, progress, warn
from pycore.errors import HwError, NothingDone

HELP = """Caption the images of a manifest in HelloWorld 7.0's structure: one-sentence summary,
element tags, "inspired by X" and a quality word (worst quality … masterpiece).

[bold]openai[/bold]: any OpenAI-compatible server (GPT-4o, vLLM, llama.cpp server, Ollama) with strict
json_schema replies, concurrency, retries and backoff. [bold]openclip[/bold]: offline — CoCa summary, CLIP
zero-shot tags and "inspired by", aesthetic score → quality word by dataset percentile.

Every result is appended durably to a store beside --out (OUT.captions/) as it arrives:
re-run the same command after a crash to finish the rest without repeating a finished request.
"""


class Backend(str, Enum):
    openai = "openai"
    openclip = "openclip"


class QualityFrom(str, Enum):
    model = "model"
    aesthetic = "aesthetic"


def register(app: typer.Typer) -> None:
    app.command("caption", help=HELP, no_args_is_help=True)(caption)


def caption(
    manifest: Annotated[Path, typer.Argument(help="Input manifest (.parquet), e.g. from `hw bucket`.", show_default=False)],
    out: Out,
    backend: Annotated[Backend, typer.Option("--backend", "-b", help="openai (any OpenAI-compatible server) or openclip (offline).")] = Backend.openai,
    base_url: Annotated[str, typer.Option("--base-url", help="OpenAI-compatible API root, e.g. http://localhost:8000/v1 (vLLM), http://localhost:11434/v1 (Ollama).")] = "https://api.openai.com/v1",
    model: Annotated[str, typer.Option("--model", "-m", help="Vision model name on that server.")] = "gpt-4o",
    api_key_env: Annotated[str, typer.Option("--api-key-env", help="Environment variable holding the API key (never printed or stored). Optional for local servers.")] = "OPENAI_API_KEY",
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", help="Requests in flight at once.", min=1, max=1024)] = 8,
    max_attempts: Annotated[int, typer.Option("--max-attempts", help="Attempts per image (429/5xx/time-outs/refusals/invalid replies are retried with backoff).", min=1)] = 6,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds per request before it is abandoned and retried.", min=0.01)] = 60.0,
    max_side: Annotated[int, typer.Option("--max-side", help="Resize so the short side is at most this many pixels before sending (0 = full size).", min=0)] = 768,
    detail: Annotated[str, typer.Option("--detail", help="OpenAI image detail: low (85 tokens), high or auto.")] = "low",
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature.", min=0.0, max=2.0)] = 0.2,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Reply token limit.", min=16)] = 400,
    prompt_file: Annotated[Path | None, typer.Option("--prompt-file", help="A text file replacing the built-in instructions.")] = None,
    prefix: Annotated[str | None, typer.Option("--prefix", help="Trigger word(s) put at the start of every caption.")] = None,
    keep_tokens: Annotated[bool, typer.Option("--keep-tokens", help="Write kohya's '|||' keep_tokens_separator: 'prefix, summary ||| tags ||| inspired by, quality' — only the tags shuffle.")] = False,
    quality_from: Annotated[QualityFrom | None, typer.Option("--quality-from", help="model: the API's quality word; aesthetic: the aesthetic scorer's (openclip always uses aesthetic).")] = None,
    quality_percentiles: Annotated[str, typer.Option("--quality-percentiles", help="Dataset-percentile upper bounds of worst/low/average/best quality; above the last is masterpiece.")] = "10,25,75,95",
    quality_scores: Annotated[str | None, typer.Option("--quality-scores", help="Instead of percentiles: 4 absolute score thresholds (LAION scale 1–10), e.g. 4,5,6,6.5.")] = None,
    aesthetic_weights: Annotated[Path | None, typer.Option("--aesthetic-weights", help="LAION improved-aesthetic-predictor MLP weights (.safetensors or .pth state dict) for the CLIP embedding. Without it, a zero-shot CLIP quality score is used.")] = None,
    clip_model: Annotated[str, typer.Option("--clip-model", help="open_clip model for tags/inspired-by/aesthetics (a name, or local-dir:/path).")] = "ViT-L-14",
    clip_pretrained: Annotated[str | None, typer.Option("--clip-pretrained", help="Pretrained tag or weights file for --clip-model.")] = "openai",
    coca_model: Annotated[str, typer.Option("--coca-model", help="open_clip CoCa model writing the summary (a name, or local-dir:/path).")] = "coca_ViT-L-14",
    coca_pretrained: Annotated[str | None, typer.Option("--coca-pretrained", help="Pretrained tag or weights file for --coca-model.")] = "mscoco_finetuned_laion2b_s13b_b90k",
    tags: Annotated[list[Path] | None, typer.Option("--tags", help="Tag vocabulary file(s), one concept per line, variants comma-separated, '# ' category lines. Default: the HelloWorld list.")] = None,
    styles: Annotated[list[Path] | None, typer.Option("--styles", help="'inspired by' vocabulary file(s), one artist/movement per line. Default: the bundled list.")] = None,
    n_tags: Annotated[int, typer.Option("--n-tags", help="openclip: element tags per image (best per category).", min=1, max=64)] = 6,
    summary_tokens: Annotated[int, typer.Option("--summary-tokens", help="openclip: longest CoCa summary in tokens (greedy decoding; at least 6).", min=6, max=75)] = 30,
    device: Annotated[str, typer.Option("--device", help="openclip: auto, cpu, cuda, cuda:1, mps.")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="openclip: images per forward pass.", min=1)] = 16,
    store_dir: Annotated[Path | None, typer.Option("--store", help="Result store folder (default: OUT.captions beside --out).")] = None,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Request again the images that failed in an earlier run of this job.")] = False,
    limit: Annotated[int | None, typer.Option("--limit", help="Caption at most this many new images this run (the rest stay pending).", min=0)] = None,
    batch_export: Annotated[Path | None, typer.Option("--batch-export", help="Write OpenAI Batch API JSONL request files to this folder instead of calling the API.")] = None,
    batch_import: Annotated[list[Path] | None, typer.Option("--batch-import", help="Read Batch API result JSONL file(s) into the store and the manifest.")] = None,
    sidecar: Annotated[bool, typer.Option("--sidecar", help="Write IMAGE.txt beside each captioned image (inside the dataset root only; existing files kept unless --overwrite).")] = False,
    root: Annotated[Path | None, typer.Option("--root", help="Dataset root for --sidecar (default: the folder `hw bucket` scanned).")] = None,
    metadata: Annotated[Path | None, typer.Option("--metadata", help="Write kohya metadata: .json ({image: {caption, tags, image_size}}) or .jsonl.")] = None,
    threads: Threads = None,
    json_out: Json = False,
    overwrite: Overwrite = False,
) -> None:
    from pycore.caption import pipeline as pl_
    from pycore.caption.store import ResultStore, default_store_dir, job_fingerprint, merge
    from pycore.manifest import read_manifest, read_metadata, write_manifest
    from pycore.scan import threads_from_env

    t0 = time.perf_counter()
    nthreads = threads_from_env(threads)
    if batch_export is not None and batch_import:
        raise HwError("use --batch-export and --batch-import in separate runs")
    if backend is Backend.openclip and (batch_export is not None or batch_import):
        raise HwError("--batch-export/--batch-import need --backend openai")
    if batch_export is None:
        for p in (out, metadata):
            if p is not None and p.exists() and not overwrite:
                raise HwError(f"{p} exists; pass --overwrite to replace it")
    if not out.parent.is_dir() and str(out.parent):
        raise HwError(f"output folder {out.parent} does not exist")
    use_aesthetic = backend is Backend.openclip or quality_from is QualityFrom.aesthetic
    if backend is Backend.openclip and quality_from is QualityFrom.model:
        raise HwError("--quality-from model needs --backend openai (openclip scores quality with the aesthetic head)")
    if aesthetic_weights is not None and not aesthetic_weights.is_file():
        raise HwError(f"--aesthetic-weights {aesthetic_weights} does not exist")
    mapping = pl_.QualityMapping(
        percentiles=pl_.parse_cuts(quality_percentiles, "--quality-percentiles") or pl_.DEFAULT_PERCENTILES,
        scores=pl_.parse_cuts(quality_scores, "--quality-scores"),
    )

    frame = read_manifest(manifest)
    meta = read_metadata(manifest)
    plan = pl_.plan_rows(frame, overwrite=overwrite, threads=nthreads)
    store_path = store_dir or default_store_dir(out)

    # ---- backend configuration and the job fingerprint ----------------------------------
    api_key: str | None = None
    oa_cfg = oc_cfg = None
    if backend is Backend.openai:
        from pycore.caption.openai_backend import OpenAIConfig

        prompt_kw: dict[str, Any] = {}
        if prompt_file is not None:
            try:
                prompt_kw["prompt"] = prompt_file.read_text(encoding="utf-8")
            except OSError as e:
                raise HwError(f"cannot read --prompt-file {prompt_file}: {e.strerror or e}") from None
        oa_cfg = OpenAIConfig(base_url=base_url, model=model, concurrency=concurrency, max_attempts=max_attempts,
                              timeout=timeout, max_side=max_side, detail=detail, temperature=temperature,
                              max_tokens=max_tokens, encode_threads=nthreads if threads else 0, **prompt_kw)  # fmt: skip
        api_key = os.environ.get(api_key_env) or None
        if api_key is None and batch_export is None and not batch_import and "api.openai.com" in oa_cfg.base_url:
            raise HwError(f"set the API key in ${api_key_env} (or choose another variable with --api-key-env)")
        job = job_fingerprint(oa_cfg.job_options())
        model_name = oa_cfg.model
    else:
        from pycore.caption.openclip_backend import OpenClipConfig

        oc_cfg = OpenClipConfig(coca_model=coca_model, coca_pretrained=coca_pretrained, clip_model=clip_model,
                                clip_pretrained=clip_pretrained, aesthetic_weights=aesthetic_weights, tag_files=tuple(tags or ()), style_files=tuple(styles or ()),
                                n_tags=n_tags, device=device, batch_size=batch_size, max_len=summary_tokens)  # fmt: skip
        job = job_fingerprint(oc_cfg.job_options())
        model_name = oc_cfg.model_label
    store = ResultStore(store_path, job)
    records = store.load()
    reused = sum(1 for k in plan.unique if k in records)

    report: dict[str, Any] = {"manifest": str(manifest), "out": str(out), "backend": backend.value, "model": model_name,
                              "store": str(store_path), "job": job, "rows": frame.height, "unique_images": len(plan.unique),
                              "duplicates": plan.duplicates, "reused_from_store": reused}  # fmt: skip
    if store.report.bad_lines:
        report["store_bad_lines"] = store.report.bad_lines

    # ---- Batch API export: write request files and stop ---------------------------------
    if batch_export is not None:
        from pycore.caption.batch import export_batch

        items = pl_.missing(plan, records, retry_failed=retry_failed)[: limit if limit is not None else None]
        with progress(disable=json_out) as bar, store:
            task = bar.add_task("encoding", total=len(items), rate="")
            rep = export_batch(items, oa_cfg, batch_export, job=job, store=store, overwrite=overwrite, threads=nthreads,
                               progress=lambda n: bar.update(task, advance=n))  # fmt: skip
        report.update(batch_export=rep.to_dict(), seconds=round(time.perf_counter() - t0, 3))
        if json_out:
            print_json(report)
            return
        console.print(f"{rep.requests:,} request(s) in {len(rep.files)} Batch API file(s) → {batch_export} "
                      f"({rep.bytes / 1e6:,.1f} MB); {rep.failed} unreadable image(s) recorded as failed.")  # fmt: skip
        console.print("Upload each with purpose 'batch', create batches (endpoint /v1/chat/completions, completion_window 24h), "
                      "then run this command again with --batch-import OUTPUT.jsonl (and the same model/prompt options).")  # fmt: skip
        return

    # ---- get results: Batch import, the API, or open_clip --------------------------------
    run_stats: dict[str, Any] = {}
    pending: dict[str, str] = {}
    asked = 0
    with store:
        if batch_import:
            from pycore.caption.batch import import_batch

            rep = import_batch(batch_import, store, model=model_name, wanted=set(plan.unique))
            run_stats = {"batch_import": rep.to_dict()}
            if rep.other_job and not rep.ok and not rep.failed:
                raise HwError(f"none of the {rep.other_job} batch result line(s) belong to this job: use the same --model, "
                              "--prompt-file, --max-side, --detail, --temperature and --max-tokens as for --batch-export")  # fmt: skip
        else:
            items = pl_.missing(plan, records, retry_failed=retry_failed)
            if limit is not None:
                items = items[:limit]
            asked = len(items)
            run_stats = _run_backend(backend, items, oa_cfg, oc_cfg, api_key, job, store, json_out, pending)
        records = store.load()

        # ---- aesthetic scores → quality words -----------------------------------------------
        quality_words = scores = None
        if use_aesthetic:
            scores = _aesthetic_scores(plan, records, backend, store_path, clip_model, clip_pretrained, aesthetic_weights,
                                       device, batch_size, max_side, json_out, run_stats)  # fmt: skip
            quality_words = mapping.words(scores)

    merged, mrep = merge(frame, plan.keys, records, todo=plan.todo, keep=plan.keep, skip_reasons=plan.skip_reasons,
                         prefix=prefix, keep_tokens=keep_tokens, quality_words=quality_words, scores=scores,
                         pending_reasons=pending)  # fmt: skip
    opts = {"backend": backend.value, "model": model_name, "prefix": prefix, "keep_tokens": keep_tokens,
            "quality_from": "aesthetic" if use_aesthetic else "model", "quality_percentiles": list(mapping.percentiles),
            "quality_scores": list(mapping.scores) if mapping.scores else None, "job": job}  # fmt: skip
    if oa_cfg is not None:
        opts.update(base_url=_public_url(oa_cfg.base_url), max_side=oa_cfg.max_side, detail=oa_cfg.detail)
    new_meta: dict[str, object] = {k: v for k, v in meta.items() if k != "schema_version"}
    new_meta["caption"] = opts
    write_manifest(merged, out, metadata=new_meta, overwrite=overwrite)

    side = None
    if sidecar:
        from pycore.caption.outputs import write_sidecars

        r = root or (Path(meta["root"]) if meta.get("root") else None)
        if r is None:
            raise HwError("--sidecar needs --root (the manifest does not record the scanned folder)")
        side = write_sidecars(merged, r, overwrite=overwrite)
    n_meta = None
    if metadata is not None:
        from pycore.caption.outputs import export_metadata

        n_meta = export_metadata(merged, metadata, overwrite=overwrite)

    report.update(mrep.to_dict())
    report.update(run_stats)
    if quality_words is not None:
        report["quality_distribution"] = pl_.distribution(merged["quality"].to_list())
    if side is not None:
        report["sidecars"] = side.to_dict()
    if n_meta is not None:
        report["metadata"] = {"path": str(metadata), "images": n_meta}
    report["seconds"] = round(time.perf_counter() - t0, 3)
    if json_out:
        print_json(report)
    else:
        _print_report(report, merged)
    new_ok = sum(1 for k, _ in items if records.get(k, {}).get("status") == "ok") if asked else 0
    if asked and not new_ok:
        raise NothingDone(f"0 of the {asked:,} image(s) asked were captioned (see caption_error in {out})")


def _public_url(url: str) -> str:
    """The URL without user:password@ or a query string (either could hold a credential)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _run_backend(backend: Backend, items, oa_cfg, oc_cfg, api_key, job, store, quiet: bool, pending: dict[str, str]) -> dict[str, Any]:
    if not items:
        return {}
    with progress(disable=quiet) as bar:
        task = bar.add_task("captioning", total=len(items), rate="")
        started = time.perf_counter()
        counts = {"ok": 0, "failed": 0}

        def advance(n: int, failed: int = 0) -> None:
            counts["failed"] += failed
            done = bar.tasks[0].completed + n
            rate = done / max(time.perf_counter() - started, 1e-9)
            bar.update(task, advance=n, rate=f"{rate:,.1f} img/s" + (f", {counts['failed']} failed" if counts["failed"] else ""))

        if backend is Backend.openai:
            from pycore.caption.openai_backend import OpenAICaptioner

            cap = OpenAICaptioner(oa_cfg, api_key, job=job)

            def on_record(rec: dict[str, Any]) -> None:
                if rec["status"] == "pending":
                    pending[rec["key"]] = rec["error"]
                else:
                    store.append(rec)
                advance(1, rec["status"] != "ok")

            stats = cap.run(items, on_record)
            return {"api": stats.to_dict()}
        from pycore.caption.openclip_backend import OpenClipCaptioner

        def on_records(recs: list[dict[str, Any]]) -> None:
            store.append_many(recs)
            advance(len(recs), sum(r["status"] != "ok" for r in recs))

        oc = OpenClipCaptioner(oc_cfg, job=job)
        return {"openclip": oc.run(items, on_records)}


def _aesthetic_scores(plan, records, backend, store_path, clip_model, clip_pretrained, weights, device, batch_size, max_side,
                      quiet, run_stats) -> dict[str, float]:  # fmt: skip
    """Scores for every unique image: from the openclip records, or the aesthetic scorer (stored as its own job)."""
    from pycore.caption.openclip_backend import AestheticConfig, AestheticScorer
    from pycore.caption.store import ResultStore, job_fingerprint

    if backend is Backend.openclip:
        return {k: float(r["score"]) for k, r in records.items() if k in plan.unique and r.get("score") is not None}
    acfg = AestheticConfig(clip_model=clip_model, clip_pretrained=clip_pretrained, weights=weights, device=device,
                           batch_size=batch_size, max_side=max_side)  # fmt: skip
    astore = ResultStore(store_path, job_fingerprint(acfg.job_options()))
    have = astore.load()
    todo = [(k, p) for k, p in plan.unique.items() if k not in have]
    if todo:
        with progress(disable=quiet) as bar, astore:
            task = bar.add_task("aesthetic scores", total=len(todo), rate="")

            def on_records(recs: list[dict[str, Any]]) -> None:
                astore.append_many(recs)
                bar.update(task, advance=len(recs))

            run_stats["aesthetic"] = AestheticScorer(acfg, job=astore.job).run(todo, on_records)
        have = astore.load()
    return {k: float(r["score"]) for k, r in have.items() if k in plan.unique and r.get("score") is not None}


def _print_report(rep: dict[str, Any], merged) -> None:
    t = Table(title=f"hw caption ({rep['backend']}: {rep['model']})", title_justify="left")
    t.add_column("", justify="left")
    t.add_column("images", justify="right")
    rows = [("captioned", rep["ok"]), ("  kept from the input manifest", rep["kept"]), ("failed", rep["failed"]),
            ("skipped (image status not ok)", rep["skipped"]), ("pending", rep["pending"]),
            ("over 75 CLIP tokens", rep["too_long"])]  # fmt: skip
    for name, v in rows:
        if v or name in ("captioned", "failed"):
            t.add_row(name, f"{v:,}")
    console.print(t)
    console.print(f"{rep['rows']:,} rows, {rep['unique_images']:,} unique images ({rep['duplicates']:,} duplicate rows share a request); "
                  f"{rep['reused_from_store']:,} results reused from the store {rep['store']}.")  # fmt: skip
    api = rep.get("api")
    if api:
        u = api.get("usage") or {}
        console.print(f"API: {api['requests']:,} requests ({api['retries']:,} retries) in {api['seconds']:.1f}s; "
                      f"tokens: {u.get('prompt_tokens', 0):,} prompt + {u.get('completion_tokens', 0):,} completion = {u.get('total_tokens', 0):,}.")  # fmt: skip
    bi = rep.get("batch_import")
    if bi:
        console.print(f"batch import: {bi['ok']:,} captions, {bi['failed']:,} failures, {bi['other_job']:,} lines of another job, "
                      f"{bi['bad_lines']:,} unreadable lines.")  # fmt: skip
    if rep["failures"]:
        console.print("failures: " + ", ".join(f"{k} {v:,}" for k, v in sorted(rep["failures"].items(), key=lambda kv: -kv[1]))
                      + "  (see caption_error; --retry-failed requests them again)")  # fmt: skip
    if rep["too_long"]:
        warn(f"{rep['too_long']:,} caption(s) exceed CLIP's 75 tokens (longest {rep['max_tokens']}); trainers truncate them — "
             "see caption_too_long / caption_tokens.")  # fmt: skip
    if rep["pending"]:
        warn(f"{rep['pending']:,} image(s) still pending: run the same command again to finish them.")
    qd = rep.get("quality_distribution")
    if qd:
        console.print("quality: " + ", ".join(f"{k} {v:,}" for k, v in qd.items()))
    sc = rep.get("sidecars")
    if sc:
        console.print(f"sidecars: {sc['written']:,} written, {sc['exists']:,} existing kept"
                      + (f", {sc['outside_root']:,} outside the root" if sc["outside_root"] else "")
                      + (f", {sc['clashes']:,} name clashes" if sc["clashes"] else ""))  # fmt: skip
        for e in sc["errors"][:5]:
            warn(e)
    md = rep.get("metadata")
    if md:
        console.print(f"kohya metadata: {md['images']:,} images → {md['path']}")
    console.print(f"manifest → {rep['out']}  ({rep['seconds']:.1f}s)")
