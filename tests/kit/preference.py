"""Preference pairs on a property a tiny model can learn and a tiny UNet's LoRA can move: brightness.

Used by the demo and the SPO behaviour test to train a step-aware preference model with `hw spm-train`
whose preference SPO can then raise (a random SPM's preference is noise no LoRA can follow).
"""

from __future__ import annotations

import io
import os
import random
from typing import Any


def _png(rgb: tuple[int, int, int], size: int, rng: random.Random) -> bytes:
    from PIL import Image

    im = Image.new("RGB", (size, size))
    im.putdata([tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in rgb) for _ in range(size * size)])
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def brightness_pairs(n: int, *, size: int = 16, seed: int = 0) -> Any:
    """``n`` Pick-a-Pic-style pairs (caption, jpg_0, jpg_1, label_0): two textured images of one random
    colour, the preferred one brighter by 40–110 grey levels; which side wins is random. 3 pairs per caption."""
    import polars as pl

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        base = [rng.randint(40, 215) for _ in range(3)]
        d = rng.randint(20, 55)
        bright = _png(tuple(c + d for c in base), size, random.Random(2 * i))  # type: ignore[arg-type]
        dark = _png(tuple(c - d for c in base), size, random.Random(2 * i + 1))  # type: ignore[arg-type]
        first = rng.random() < 0.5
        rows.append({"caption": f"picture number {i // 3}", "jpg_0": bright if first else dark,
                     "jpg_1": dark if first else bright, "label_0": 1.0 if first else 0.0})  # fmt: skip
    return pl.DataFrame(rows, schema={"caption": pl.String, "jpg_0": pl.Binary, "jpg_1": pl.Binary, "label_0": pl.Float64})


def write_brightness_pairs(path: str | os.PathLike[str], n: int, *, size: int = 16, seed: int = 0) -> str:
    """Write :func:`brightness_pairs` as Parquet; returns the path."""
    brightness_pairs(n, size=size, seed=seed).write_parquet(path)
    return os.fspath(path)
