"""Preference pairs for training the step-aware preference model.

Two table forms are read (Parquet, or CSV / JSON-lines for the manifest form; a folder means every
Parquet file in it):

* Pick-a-Pic style: ``caption``, ``jpg_0``, ``jpg_1`` (encoded image bytes, or a struct with a
  ``bytes`` field as Hugging Face ``datasets`` writes it), ``label_0`` (1 = image 0 preferred,
  0 = image 1, 0.5 = tie; ``label_1`` is checked against it when present);
* manifest form: ``prompt``, ``image_a``, ``image_b`` (file paths; relative ones are resolved
  against the folder of the pairs file, not the working directory), ``preferred`` (``a``/``b``/``tie``, or 0 = image_a, 1 = image_b, 0.5 = tie).

Rows that cannot be used (empty prompt, label out of range, missing image file or bytes) are
skipped and counted by reason up front; a missing column is a one-line error. Images that fail to
decode during training are skipped (the batch goes on without them) and counted.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pycore.errors import HwError, first_line

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
MANIFEST_COLUMNS = ("prompt", "image_a", "image_b", "preferred")
_PREFERRED = {"a": 1.0, "image_a": 1.0, "0": 1.0, "b": 0.0, "image_b": 0.0, "1": 0.0, "tie": 0.5, "0.5": 0.5}


class PairsError(HwError):
    """A pairs file that cannot be used at all."""


@dataclass
class PairSet:
    """Usable pairs: prompt, the two images (bytes or paths) and label_0 ∈ {0, 0.5, 1}."""

    kind: str
    prompts: list[str]
    images_0: list[Any]
    images_1: list[Any]
    label_0: list[float]
    rows: list[int]
    total_rows: int
    skipped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, idx: list[int]) -> PairSet:
        return PairSet(self.kind, [self.prompts[i] for i in idx], [self.images_0[i] for i in idx],
                       [self.images_1[i] for i in idx], [self.label_0[i] for i in idx],
                       [self.rows[i] for i in idx], len(idx), Counter())  # fmt: skip


def _read_table(path: Path):
    import polars as pl

    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise PairsError(f"{path} holds no .parquet files")
    elif path.is_file():
        files = [path]
    else:
        raise PairsError(f"pairs file {path} does not exist")
    frames = []
    for f in files:
        try:
            if f.suffix.lower() == ".csv":
                frames.append(pl.read_csv(f, infer_schema_length=10000))
            elif f.suffix.lower() in (".jsonl", ".ndjson"):
                frames.append(pl.read_ndjson(f))
            else:
                frames.append(pl.read_parquet(f))
        except (pl.exceptions.PolarsError, OSError) as e:
            raise PairsError(f"cannot read pairs file {f}: {first_line(e)}") from None
    try:
        return pl.concat(frames, how="diagonal_relaxed") if len(frames) > 1 else frames[0]
    except pl.exceptions.PolarsError as e:
        raise PairsError(f"pairs files in {path} do not share a schema: {first_line(e)}") from None


def _image_bytes(v: Any) -> bytes | None:
    if isinstance(v, dict):
        v = v.get("bytes")
    if isinstance(v, (bytes, bytearray, memoryview)) and len(v):
        return bytes(v)
    return None


def _label(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f in (0.0, 0.5, 1.0) else None


def read_pairs(path: str | os.PathLike[str], *, prompt_column: str | None = None) -> PairSet:
    """Read and validate a pairs table; rows that cannot be used are counted in ``skipped``."""
    path = Path(path)
    frame = _read_table(path)
    cols = set(frame.columns)
    pick_cols = list(PICKAPIC_COLUMNS)
    man_cols = list(MANIFEST_COLUMNS)
    if prompt_column:
        pick_cols[0] = prompt_column
        man_cols[0] = prompt_column
    if {"jpg_0", "jpg_1"} & cols or "label_0" in cols:
        kind, need = "pickapic", pick_cols
    elif {"image_a", "image_b"} & cols or "preferred" in cols:
        kind, need = "manifest", man_cols
    else:
        raise PairsError(f"{path}: not a pairs table; expected columns {', '.join(PICKAPIC_COLUMNS)} (Pick-a-Pic) "
                         f"or {', '.join(MANIFEST_COLUMNS)} (manifest form); found {', '.join(sorted(cols)) or 'none'}")  # fmt: skip
    missing = [c for c in need if c not in cols]
    if missing:
        raise PairsError(f"{path}: missing column(s) {', '.join(missing)} for the {kind} pairs form")
    base = path if path.is_dir() else path.parent
    skipped: Counter = Counter()
    out = PairSet(kind, [], [], [], [], [], frame.height, skipped)
    prompts = frame[need[0]].to_list()
    a_col, b_col = frame[need[1]].to_list(), frame[need[2]].to_list()
    labels = frame[need[3]].to_list()
    labels_1 = frame["label_1"].to_list() if kind == "pickapic" and "label_1" in cols else None
    for i in range(frame.height):
        p = prompts[i]
        if not isinstance(p, str) or not p.strip():
            skipped["empty prompt"] += 1
            continue
        if kind == "pickapic":
            lab = _label(labels[i])
            if lab is None:
                skipped["label out of range"] += 1
                continue
            if labels_1 is not None and labels_1[i] is not None and _label(labels_1[i]) != 1.0 - lab:
                skipped["label_0 + label_1 != 1"] += 1
                continue
            a, b = _image_bytes(a_col[i]), _image_bytes(b_col[i])
            if a is None or b is None:
                skipped["missing image bytes"] += 1
                continue
        else:
            raw = labels[i]
            key = str(raw).strip().lower() if raw is not None else ""
            if isinstance(raw, float) and raw in (0.0, 1.0, 0.5):
                key = {0.0: "0", 1.0: "1", 0.5: "0.5"}[raw]
            lab = _PREFERRED.get(key)
            if lab is None:
                skipped["label out of range"] += 1
                continue
            if not isinstance(a_col[i], str) or not isinstance(b_col[i], str):
                skipped["missing image path"] += 1
                continue
            a, b = base / os.path.expanduser(a_col[i]), base / os.path.expanduser(b_col[i])
            if not a.is_file() or not b.is_file():
                skipped["image file not found"] += 1
                continue
            a, b = str(a), str(b)
        out.prompts.append(p)
        out.images_0.append(a)
        out.images_1.append(b)
        out.label_0.append(lab)
        out.rows.append(i)
    if not len(out):
        why = ", ".join(f"{k}: {v}" for k, v in skipped.items()) or "the table is empty"
        raise PairsError(f"{path}: no usable pairs among {frame.height} row(s) ({why})")
    return out


def split_pairs(pairs: PairSet, val_fraction: float, seed: int, max_val: int | None = None) -> tuple[PairSet, PairSet]:
    """Deterministic train/validation split (prompts kept together, so held-out prompts are unseen)."""
    import random

    prompts = sorted(set(pairs.prompts))
    rng = random.Random(seed)
    rng.shuffle(prompts)
    n_val = max(1, round(len(prompts) * val_fraction)) if len(prompts) > 1 else 0
    val_prompts = set(prompts[:n_val])
    val_idx = [i for i, p in enumerate(pairs.prompts) if p in val_prompts]
    if max_val is not None:
        val_idx = val_idx[:max_val]
    train_idx = [i for i in range(len(pairs)) if pairs.prompts[i] not in val_prompts]
    if not train_idx or not val_idx:
        raise PairsError(f"cannot split {len(pairs)} pair(s) over {len(prompts)} prompt(s) into train and validation; "
                         "add pairs or pass a separate --val file")  # fmt: skip
    return pairs.subset(train_idx), pairs.subset(val_idx)


class ImageDecodeError(HwError):
    pass


def load_image(src: Any, resolution: int):
    """Encoded bytes or a path → [3, R, R] fp32 tensor in [-1, 1]: shortest side to R (bicubic), centre crop."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    from pycore.sources import open_image

    try:  # a path may name a file, a tar member or a Parquet cell (pycore.sources)
        im = Image.open(io.BytesIO(src)) if isinstance(src, bytes) else open_image(os.fspath(src))
        im = ImageOps.exif_transpose(im).convert("RGB")
    except Exception as e:  # PIL raises many types for corrupt data
        raise ImageDecodeError(f"cannot decode image: {type(e).__name__}") from None
    w, h = im.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(im, dtype=np.float32)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1) / 127.5 - 1.0


class PairDataset:
    """torch-style dataset of decoded pairs.

    A pair whose image does not decode is replaced by the next decodable pair (so every batch keeps
    its size and processes stay in step under multi-GPU); the bad rows are reported in
    ``skipped_rows`` of the item that replaced them.
    """

    def __init__(self, pairs: PairSet, resolution: int):
        self.pairs = pairs
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        p = self.pairs
        bad: list[int] = []
        for k in range(len(p)):
            j = (i + k) % len(p)
            try:
                a = load_image(p.images_0[j], self.resolution)
                b = load_image(p.images_1[j], self.resolution)
            except ImageDecodeError:
                bad.append(p.rows[j])
                continue
            return {"pixels_0": a, "pixels_1": b, "prompt": p.prompts[j], "label_0": p.label_0[j],
                    "row": p.rows[j], "skipped_rows": bad}  # fmt: skip
        raise PairsError("no pair in the set has two decodable images")


def collate_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of pair items into a batch (rows of undecodable pairs under ``skipped_rows``)."""
    import torch

    return {
        "pixels_0": torch.stack([it["pixels_0"] for it in items]),
        "pixels_1": torch.stack([it["pixels_1"] for it in items]),
        "label_0": torch.tensor([it["label_0"] for it in items], dtype=torch.float32),
        "prompts": [it["prompt"] for it in items],
        "skipped_rows": [r for it in items for r in it["skipped_rows"]],
    }
