"""Bucket tables: the bundled ones, user CSV/TOML files, kohya-style generated tables, snapping.

A table is a list of (width, height) sizes in pixels. SDXL wants sides that are multiples of
32 (its latents are downsampled twice more inside the UNet), so :func:`off_grid` names the
sizes that are not and :func:`snap` rounds them to the nearest multiple (ties round down, so
the HelloWorld 1360 becomes 1344).
"""

from __future__ import annotations

import csv
import io
import tomllib
from dataclasses import dataclass
from pathlib import Path

from pycore import _rust
from pycore.data import data_path
from pycore.errors import TableError

BUNDLED = ("helloworld", "sdxl")
MAX_SIDE = 16384


@dataclass(frozen=True)
class BucketTable:
    """A named list of bucket sizes (width, height)."""

    name: str
    sizes: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if not self.sizes:
            raise TableError(f"bucket table {self.name!r} has no sizes")
        for w, h in self.sizes:
            if not (0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE):
                raise TableError(f"bucket table {self.name!r}: size {w}x{h} is out of range 1..{MAX_SIDE}")
        if len(set(self.sizes)) != len(self.sizes):
            dup = sorted({s for s in self.sizes if self.sizes.count(s) > 1})
            raise TableError(f"bucket table {self.name!r} lists {', '.join(f'{w}x{h}' for w, h in dup)} more than once")

    @property
    def max_area(self) -> int:
        return max(w * h for w, h in self.sizes)


def _parse_csv(text: str, name: str) -> list[tuple[int, int]]:
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise TableError(f"bucket table {name} is empty")
    reader = csv.reader(io.StringIO("\n".join(lines)))
    rows = list(reader)
    header = [c.strip().lower() for c in rows[0]]
    if "width" in header and "height" in header:
        wi, hi = header.index("width"), header.index("height")
        rows = rows[1:]
    else:
        wi, hi = 0, 1
    sizes = []
    for n, row in enumerate(rows, start=1):
        try:
            sizes.append((int(row[wi]), int(row[hi])))
        except (ValueError, IndexError):
            raise TableError(f"bucket table {name}: row {n} {','.join(row)!r} is not 'width,height' integers") from None
    return sizes


def _parse_toml(text: str, name: str) -> list[tuple[int, int]]:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise TableError(f"bucket table {name} is not valid TOML: {e}") from None
    if "buckets" not in doc:
        raise TableError(f"bucket table {name}: expected `buckets = [[w, h], ...]` or [[buckets]] with width/height")
    sizes = []
    for n, item in enumerate(doc["buckets"], start=1):
        try:
            if isinstance(item, dict):
                sizes.append((int(item["width"]), int(item["height"])))
            else:
                w, h = item
                sizes.append((int(w), int(h)))
        except (KeyError, TypeError, ValueError):
            raise TableError(f"bucket table {name}: entry {n} ({item!r}) is not a width/height pair") from None
    return sizes


def load_table(spec: str) -> BucketTable:
    """A bundled table by name (``helloworld``, ``sdxl``) or a user ``.csv`` / ``.toml`` file."""
    if spec in BUNDLED:
        path = data_path("buckets", f"{spec}.csv")
        return BucketTable(spec, tuple(_parse_csv(path.read_text(encoding="utf-8"), spec)))
    path = Path(spec)
    if not path.is_file():
        raise TableError(f"bucket table {spec!r} is neither a bundled table ({', '.join(BUNDLED)}) nor an existing file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TableError(f"cannot read bucket table {path}: {e}") from None
    if path.suffix.lower() == ".toml":
        sizes = _parse_toml(text, str(path))
    elif path.suffix.lower() in (".csv", ".txt"):
        sizes = _parse_csv(text, str(path))
    else:
        raise TableError(f"bucket table {path}: use a .csv (width,height) or .toml file")
    return BucketTable(path.stem, tuple(sizes))


def generate_table(max_area: int = 1024 * 1024, step: int = 64, min_side: int = 256, max_side: int = 2048) -> BucketTable:
    """kohya-style table: every width in steps, the largest height within max_area, both ways."""
    try:
        sizes = _rust.generate_buckets(max_area, step, min_side, max_side)
    except ValueError as e:
        raise TableError(str(e)) from None
    return BucketTable(f"generated(max_area={max_area},step={step},min_side={min_side},max_side={max_side})", tuple(sizes))


def off_grid(table: BucketTable, multiple: int = 32) -> list[tuple[int, int]]:
    """Sizes with a side that is not a multiple of ``multiple``."""
    return [(w, h) for w, h in table.sizes if w % multiple or h % multiple]


def snap_side(x: int, multiple: int) -> int:
    """Nearest multiple (ties down), at least one multiple."""
    q, r = divmod(x, multiple)
    if r * 2 > multiple:
        q += 1
    return max(q, 1) * multiple


def snap(table: BucketTable, multiple: int = 32) -> BucketTable:
    """Round every side to the nearest multiple; sizes that collide are merged (first kept)."""
    if multiple < 1:
        raise TableError("--snap must be a positive multiple")
    out: list[tuple[int, int]] = []
    for w, h in table.sizes:
        s = (snap_side(w, multiple), snap_side(h, multiple))
        if s not in out:
            out.append(s)
    return BucketTable(f"{table.name}(snap {multiple})", tuple(out))
