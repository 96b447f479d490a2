"""`hw caption`: structured, resumable captions from an OpenAI-compatible vision model or offline open_clip.

Parses options into a :class:`pycore.caption.request.CaptionRequest`, calls
:func:`pycore.caption.run.caption_manifest`, renders its result.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.common import BarProgress, Json, Overwrite, Threads, console, print_json, warn
from cli.scale_options import Ray, RayWorkers

HELP = (
    "Caption the images of a manifest in HelloWorld 7.0's structure: one-sentence summary, element tags, "
    '"inspired by X" and a quality word (worst quality … masterpiece).\n\n'
    "[bold]openai[/bold]: any OpenAI-compatible server (GPT-4o, vLLM, llama.cpp server, Ollama) with strict json_schema "
    "replies, concurrency, retries and backoff; a server that cannot be reached stops the run at once. "
    "[bold]openclip[/bold]: offline — CoCa summary, CLIP zero-shot tags and \"inspired by\", aesthetic score → quality "
    "word by dataset percentile.\n\n"
    "Every result is appended durably to a store beside --out (OUT.captions/) as it arrives: re-run the same command "
    "after a crash or an outage to finish the rest without repeating a finished request. Exit code 3: none of the "
    "images asked for was captioned.\n\n"
    "Example: [bold]hw caption m.parquet -o captioned.parquet --base-url http://localhost:8000/v1 -m Qwen2-VL-7B --sidecar[/bold]"
)

IO, SERVER, TEXT, CLIP, RUN = "Input and output", "OpenAI-compatible server", "Caption text and quality", "Offline open_clip", "Resume, Batch API, limits"


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
    out: Annotated[Path, typer.Option("--out", "-o", help="Output manifest (.parquet), written atomically.", rich_help_panel=IO)],
    backend: Annotated[Backend, typer.Option("--backend", "-b", help="openai (any OpenAI-compatible server) or openclip (offline).", rich_help_panel=IO)] = Backend.openai,
    sidecar: Annotated[bool, typer.Option("--sidecar", help="Write IMAGE.txt beside each captioned image (inside the dataset root only; existing files kept unless --overwrite).", rich_help_panel=IO)] = False,
    root: Annotated[Path | None, typer.Option("--root", help="Dataset root for --sidecar (default: the folder `hw bucket` scanned, kept in the manifest).", rich_help_panel=IO)] = None,
    metadata: Annotated[Path | None, typer.Option("--metadata", help="Write kohya metadata: .json ({image: {caption, tags, image_size}}) or .jsonl.", rich_help_panel=IO)] = None,
    json_out: Json = False,
    overwrite: Overwrite = False,
    base_url: Annotated[str, typer.Option("--base-url", help="OpenAI-compatible API root, e.g. http://localhost:8000/v1 (vLLM), http://localhost:11434/v1 (Ollama).", rich_help_panel=SERVER)] = "https://api.openai.com/v1",
    model: Annotated[str, typer.Option("--model", "-m", help="Vision model name on that server.", rich_help_panel=SERVER)] = "gpt-4o",
    api_key_env: Annotated[str, typer.Option("--api-key-env", help="Environment variable holding the API key (never printed or stored). Optional for local servers.", rich_help_panel=SERVER)] = "OPENAI_API_KEY",
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", help="Requests in flight at once.", rich_help_panel=SERVER)] = 8,
    max_attempts: Annotated[int, typer.Option("--max-attempts", help="Attempts per image (429/5xx/time-outs/refusals/invalid replies are retried with backoff).", rich_help_panel=SERVER)] = 6,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds per request before it is abandoned and retried.", rich_help_panel=SERVER)] = 60.0,
    max_side: Annotated[int, typer.Option("--max-side", help="Resize so the short side is at most this many pixels before sending (0 = full size).", rich_help_panel=SERVER)] = 768,
    detail: Annotated[str, typer.Option("--detail", help="OpenAI image detail: low (85 tokens), high or auto.", rich_help_panel=SERVER)] = "low",
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature (0–2).", rich_help_panel=SERVER)] = 0.2,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Reply token limit.", rich_help_panel=SERVER)] = 400,
    prompt_file: Annotated[Path | None, typer.Option("--prompt-file", help="A text file replacing the built-in instructions.", rich_help_panel=SERVER)] = None,
    prefix: Annotated[str | None, typer.Option("--prefix", help="Trigger word(s) put at the start of every caption.", rich_help_panel=TEXT)] = None,
    keep_tokens: Annotated[bool, typer.Option("--keep-tokens", help="Write kohya's '|||' keep_tokens_separator: 'prefix, summary ||| tags ||| inspired by, quality' — only the tags shuffle.", rich_help_panel=TEXT)] = False,
    quality_from: Annotated[QualityFrom | None, typer.Option("--quality-from", help="model: the API's quality word; aesthetic: the aesthetic scorer's (openclip always uses aesthetic).", rich_help_panel=TEXT)] = None,
    quality_percentiles: Annotated[str, typer.Option("--quality-percentiles", help="Dataset-percentile upper bounds of worst/low/average/best quality; above the last is masterpiece.", rich_help_panel=TEXT)] = "10,25,75,95",
    quality_scores: Annotated[str | None, typer.Option("--quality-scores", help="Instead of percentiles: 4 absolute score thresholds (LAION scale 1–10), e.g. 4,5,6,6.5.", rich_help_panel=TEXT)] = None,
    aesthetic_weights: Annotated[Path | None, typer.Option("--aesthetic-weights", help="LAION improved-aesthetic-predictor MLP weights (.safetensors or .pth state dict) for the CLIP embedding. Without it, a zero-shot CLIP quality score is used.", rich_help_panel=TEXT)] = None,
    clip_model: Annotated[str, typer.Option("--clip-model", help="open_clip model for tags/inspired-by/aesthetics (a name, or local-dir:/path).", rich_help_panel=CLIP)] = "ViT-L-14",
    clip_pretrained: Annotated[str | None, typer.Option("--clip-pretrained", help="Pretrained tag or weights file for --clip-model.", rich_help_panel=CLIP)] = "openai",
    coca_model: Annotated[str, typer.Option("--coca-model", help="open_clip CoCa model writing the summary (a name, or local-dir:/path).", rich_help_panel=CLIP)] = "coca_ViT-L-14",
    coca_pretrained: Annotated[str | None, typer.Option("--coca-pretrained", help="Pretrained tag or weights file for --coca-model.", rich_help_panel=CLIP)] = "mscoco_finetuned_laion2b_s13b_b90k",
    tags: Annotated[list[Path] | None, typer.Option("--tags", help="Tag vocabulary file(s), one concept per line, variants comma-separated, '# ' category lines. Default: the HelloWorld list.", rich_help_panel=CLIP)] = None,
    styles: Annotated[list[Path] | None, typer.Option("--styles", help="'inspired by' vocabulary file(s), one artist/movement per line. Default: the bundled list.", rich_help_panel=CLIP)] = None,
    n_tags: Annotated[int, typer.Option("--n-tags", help="Element tags per image (best per category).", rich_help_panel=CLIP)] = 6,
    summary_tokens: Annotated[int, typer.Option("--summary-tokens", help="Longest CoCa summary in tokens (greedy decoding; 6–75).", rich_help_panel=CLIP)] = 30,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1, mps.", rich_help_panel=CLIP)] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.", rich_help_panel=CLIP)] = 16,
    store_dir: Annotated[Path | None, typer.Option("--store", help="Result store folder (default: OUT.captions beside --out).", rich_help_panel=RUN)] = None,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Request again the images whose earlier answer was a failure (refusal, invalid reply, HTTP error). Images that got no answer are always asked again.", rich_help_panel=RUN)] = False,
    limit: Annotated[int | None, typer.Option("--limit", help="Caption at most this many new images this run (the rest stay pending).", rich_help_panel=RUN)] = None,
    batch_export: Annotated[Path | None, typer.Option("--batch-export", help="Write OpenAI Batch API JSONL request files to this folder instead of calling the API.", rich_help_panel=RUN)] = None,
    batch_import: Annotated[list[Path] | None, typer.Option("--batch-import", help="Read Batch API result JSONL file(s) into the store and the manifest.", rich_help_panel=RUN)] = None,
    threads: Threads = None,
    ray: Ray = None,
    ray_workers: RayWorkers = None,
) -> None:
    from pycore.caption.request import CaptionRequest
    from pycore.caption.run import NothingCaptioned, caption_manifest

    req = CaptionRequest(manifest=manifest, out=out, backend=backend.value, base_url=base_url, model=model, api_key_env=api_key_env,
                         concurrency=concurrency, max_attempts=max_attempts, timeout=timeout, max_side=max_side, detail=detail,
                         temperature=temperature, max_tokens=max_tokens, prompt_file=prompt_file, prefix=prefix,
                         keep_tokens=keep_tokens, quality_from=quality_from.value if quality_from else None,
                         quality_percentiles=quality_percentiles, quality_scores=quality_scores, aesthetic_weights=aesthetic_weights,
                         clip_model=clip_model, clip_pretrained=clip_pretrained, coca_model=coca_model, coca_pretrained=coca_pretrained,
                         tags=tags or (), styles=styles or (), n_tags=n_tags, summary_tokens=summary_tokens, device=device,
                         batch_size=batch_size, store=store_dir, retry_failed=retry_failed, limit=limit, batch_export=batch_export,
                         batch_import=batch_import or (), sidecar=sidecar, root=root, metadata=metadata, threads=threads,
                         overwrite=overwrite, ray=ray, ray_workers=ray_workers)  # fmt: skip
    try:
        with BarProgress(disable=json_out) as bar:
            res = caption_manifest(req, progress=bar)
    except NothingCaptioned as e:
        _render(e.result.to_dict(), json_out, batch_export)
        raise
    _render(res.to_dict(), json_out, batch_export)


def _render(rep: dict[str, Any], json_out: bool, batch_export: Path | None) -> None:
    if json_out:
        print_json(rep)
    elif "batch_export" in rep:
        _print_export(rep["batch_export"], batch_export)
    else:
        _print_report(rep)


def _print_export(ex: dict[str, Any], folder: Path | None) -> None:
    console.print(f"{ex['requests']:,} request(s) in {len(ex['files'])} Batch API file(s) → {folder} "
                  f"({ex['bytes'] / 1e6:,.1f} MB); {ex['failed']} unreadable image(s) recorded as failed.")  # fmt: skip
    if ex["requests"]:
        console.print("Upload each with purpose 'batch', create batches (endpoint /v1/chat/completions, completion_window 24h), "
                      "then run this command again with --batch-import OUTPUT.jsonl (and the same model/prompt options).")  # fmt: skip


def _print_report(rep: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=f"hw caption ({rep['backend']}: {rep['model']})", title_justify="left")
    t.add_column("", justify="left")
    t.add_column("images", justify="right")
    rows = [("captioned", rep["ok"]), ("  kept from the input manifest", rep["kept"]), ("failed", rep["failed"]),
            ("skipped (image status not ok)", rep["skipped"]), ("pending (no answer yet)", rep["pending"]),
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
    _print_warnings(rep)
    md = rep.get("metadata")
    if md:
        console.print(f"kohya metadata: {md['images']:,} images → {md['path']}")
    console.print(f"manifest → {rep['out']}  ({rep['seconds']:.1f}s)")


def _print_warnings(rep: dict[str, Any]) -> None:
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
