"""`hw dedup`: exact and near-duplicate detection over a manifest."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.common import Json, Out, Overwrite, Threads, console, print_json, progress, warn
from pycore.errors import HwError

HELP = """Find exact and near-duplicate images in a manifest (from `hw bucket`) and mark which to keep.

Exact duplicates share the content hash; near duplicates have 64-bit perceptual hashes (phash,
bit-identical to the `imagehash` package) within --threshold bits, found exactly by multi-index
hashing. Groups are connected components; in each group one image is kept (highest resolution,
then largest file, then path order, or --keep-by COLUMN). Adds the columns phash, dhash,
dup_group, dup_distance, dup_max_distance, dup_exact, keep. Files are never moved unless
--apply is given (and --dry-run shows what would happen).
"""


def register(app: typer.Typer) -> None:
    app.command("dedup", help=HELP, no_args_is_help=True)(dedup)


def dedup(
    manifest: Annotated[Path, typer.Argument(help="A manifest .parquet written by `hw bucket` (rows with status ok are used).", show_default=False)],
    out: Out,
    threshold: Annotated[int | None, typer.Option("--threshold", "-t", help="Largest phash Hamming distance (bits of 64) for near duplicates. Default 10 (see README); with --method clip: --clip-threshold.", min=0, max=32)] = None,
    hash_mode: Annotated[str, typer.Option("--hash-mode", help="exact: bit-identical to imagehash (full-size decode). fast: JPEGs decoded at 1/2-1/8 scale in the DCT domain.")] = "exact",
    method: Annotated[str, typer.Option("--method", help="phash (perceptual hash) or clip (open_clip image embeddings, cosine similarity).")] = "phash",
    clip_model: Annotated[str, typer.Option("--clip-model", help="With --method clip: open_clip model name.")] = "ViT-B-32",
    clip_pretrained: Annotated[str, typer.Option("--clip-pretrained", help="With --method clip: open_clip pretrained tag or a local weights file.")] = "laion2b_s34b_b79k",
    clip_threshold: Annotated[float, typer.Option("--clip-threshold", help="With --method clip: smallest cosine similarity of a duplicate.", min=-1.0, max=1.0)] = 0.95,
    device: Annotated[str, typer.Option("--device", help="With --method clip: torch device (cpu, cuda, cuda:1). Default: cuda if available.")] = "",
    batch_size: Annotated[int, typer.Option("--batch-size", help="With --method clip: images per batch.", min=1)] = 32,
    keep_by: Annotated[str | None, typer.Option("--keep-by", help="Keep the image with the highest value of this numeric column (e.g. an aesthetic score).")] = None,
    keep_ascending: Annotated[bool, typer.Option("--keep-ascending", help="With --keep-by: keep the lowest value instead.")] = False,
    max_group_size: Annotated[int, typer.Option("--max-group-size", help="Warn about groups larger than this (chained near-duplicates; try a lower threshold).", min=2)] = 1000,
    review: Annotated[Path | None, typer.Option("--review", help="Write a self-contained HTML page of every group's thumbnails.")] = None,
    review_max_groups: Annotated[int, typer.Option("--review-max-groups", help="At most this many groups (largest first) on the review page.", min=1)] = 500,
    apply: Annotated[str | None, typer.Option("--apply", help="move:DIR or symlink:DIR — move (or symlink) every image not kept into DIR/group-NNNNNN/. Never overwrites.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="With --apply: print what would be moved, touch nothing (the manifest is still written).")] = False,
    threads: Threads = None,
    json_out: Json = False,
    overwrite: Overwrite = False,
) -> None:
    from pycore import dedup as dd
    from pycore.manifest import fs_paths, read_manifest, read_metadata, write_manifest
    from pycore.checks import resolve_threads as threads_from_env

    t0 = time.perf_counter()
    for p in (out, review):
        if p is not None and p.exists() and not overwrite:
            raise HwError(f"{p} exists; pass --overwrite to replace it")
    if dry_run and apply is None:
        raise HwError("--dry-run only applies with --apply")
    action = dd.parse_apply(apply) if apply is not None else None
    opts = dd.DedupOptions(
        threshold=dd.DEFAULT_THRESHOLD if threshold is None else threshold,
        hash_mode=hash_mode, method=method, clip_threshold=clip_threshold, keep_by=keep_by,
        keep_ascending=keep_ascending, max_group_size=max_group_size, threads=threads_from_env(threads),
    )  # fmt: skip
    frame = read_manifest(manifest)
    if keep_by is not None and keep_by not in frame.columns:
        raise HwError(f"--keep-by column {keep_by!r} is not in the manifest")
    meta = read_metadata(manifest)
    rep = dd.DedupReport(rows=frame.height)
    n_ok = int((frame["status"] == "ok").sum())
    with progress(disable=json_out) as bar:
        task = bar.add_task("hashing", total=n_ok, rate="")
        started = time.perf_counter()
        done = [0]

        def on_progress(n: int) -> None:
            done[0] += n
            bar.update(task, advance=n, rate=f"{done[0] / max(time.perf_counter() - started, 1e-9):,.0f} img/s")

        frame = dd.compute_hashes(frame, opts, previous_mode=meta.get("dedup_hash_mode"), progress=on_progress, report=rep)
        emb = None
        if method == "clip":
            import numpy as np

            dev = device or _default_device()
            model, preprocess = dd.load_clip(clip_model, clip_pretrained, dev)
            bar.update(task, description="embedding", total=n_ok, completed=0)
            done[0] = 0
            started = time.perf_counter()
            ok_rows = np.flatnonzero((frame["status"] == "ok").to_numpy())
            paths = fs_paths(frame)
            e_ok, _errors = dd.clip_embeddings([paths[i] for i in ok_rows], model, preprocess, dev, batch_size, on_progress)
            emb = np.zeros((frame.height, e_ok.shape[1]), np.float32)
            emb[ok_rows] = e_ok
        frame = dd.assign_groups(frame, opts, rep, embeddings=emb)
    problems: list[str] = []
    plan = []
    if action is not None:
        plan = dd.plan_moves(frame, action[1])
        if not dry_run:
            frame, problems = dd.apply_moves(frame, action[0], plan)
    run_meta = {"dedup_hash_mode": opts.hash_mode, "dedup_method": opts.method, "dedup_threshold": rep.threshold,
                "dedup_hash": "imagehash-4.3.2 phash/dhash, 16 hex digits"}  # fmt: skip
    keep_meta: dict[str, object] = {k: v for k, v in meta.items() if k != "schema_version"}
    keep_meta.update(run_meta)
    write_manifest(frame, out, metadata=keep_meta, overwrite=overwrite)
    if review is not None:
        from pycore.io import write_text_atomic

        write_text_atomic(review, dd.render_review(frame, max_groups=review_max_groups, title=f"hw dedup review: {manifest.name}"),
                          overwrite=overwrite)  # fmt: skip
    elapsed = time.perf_counter() - t0
    for g in rep.oversized_groups[:5]:
        warn(f"group {g['group']} has {g['size']} images (max internal distance {g['max_distance']}): "
             "near-duplicates chained together; check it in --review or lower --threshold")  # fmt: skip
    for problem in problems:
        warn(problem)
    if json_out:
        d = rep.to_dict()
        d.update(out=str(out), review=str(review) if review else None, seconds=round(elapsed, 3),
                 apply=None if action is None else {"action": action[0], "dir": str(action[1]), "dry_run": dry_run,
                                                    "files": len(plan), "problems": problems})  # fmt: skip
        print_json(d)
        return
    t = Table(title="dedup", title_justify="left")
    t.add_column("")
    t.add_column("count", justify="right")
    for k, v in (("images (rows)", rep.rows), ("hashed", rep.hashed), ("reused hashes", rep.reused),
                 ("exact duplicate groups", rep.exact_groups), ("near-duplicate groups", rep.near_groups),
                 ("images in groups", rep.in_groups), ("marked for removal", rep.marked_for_removal),
                 ("largest group", rep.largest_group)):  # fmt: skip
        t.add_row(k, f"{v:,}")
    console.print(t)
    if rep.failed:
        console.print("not decoded: " + ", ".join(f"{k} {v:,}" for k, v in rep.failed.items()) + " (see status/error)")
    if action is not None:
        verb = {"move": "move", "symlink": "symlink"}[action[0]]
        if dry_run:
            for _, src, dst in plan[:20]:
                console.print(f"would {verb} {src} → {dst}")
            if len(plan) > 20:
                console.print(f"… and {len(plan) - 20} more")
        else:
            console.print(f"{verb}d {len(plan) - len(problems):,} file(s) into {action[1]}")
    console.print(f"{method} threshold {rep.threshold}, {elapsed:.2f}s; manifest → {out}"
                  + (f"; review → {review}" if review else ""))  # fmt: skip


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
