"""Test kit: small WebDataset shards and Parquet image tables (with broken members), and the same
images as loose files, for the row-for-row comparisons of tests and benchmarks."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image


def _img(fmt: str, size: tuple[int, int], color: tuple[int, int, int], exif: bytes | None = None) -> bytes:
    im = Image.new("RGB", size, color)
    for x in range(0, size[0], 7):  # some structure so perceptual hashes differ
        for y in range(0, size[1], 5):
            im.putpixel((x, y), ((x * 13) % 256, (y * 7) % 256, (x * y) % 256))
    buf = io.BytesIO()
    kw = {"exif": exif} if exif else {}
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def orientation(o: int) -> bytes:
    ex = Image.Exif()
    ex[0x0112] = o
    return ex.tobytes()


def samples(n_good: int = 8) -> list[tuple[str, bytes, str | None]]:
    """(member name, image bytes, alt text) — good images of several formats, then broken ones."""
    fmts = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"), ("gif", "GIF"), ("bmp", "BMP")]
    out: list[tuple[str, bytes, str | None]] = []
    for i in range(n_good):
        ext, fmt = fmts[i % len(fmts)]
        size = (40 + 8 * i, 30 + 5 * (i % 4))
        exif = orientation(6) if (ext == "jpg" and i % 2 == 0) else None
        out.append((f"{i:09d}.{ext}", _img(fmt, size, (20 * i % 256, 90, 160), exif), f"a picture number {i}"))
    good_jpeg = _img("JPEG", (64, 64), (1, 2, 3))
    out.append((f"{n_good:09d}.jpg", b"this is a text file, not an image", "text"))
    out.append((f"{n_good + 1:09d}.jpg", b"", None))
    out.append((f"{n_good + 2:09d}.png", _img("PNG", (30, 30), (5, 5, 5))[:20], "cut png"))
    out.append((f"{n_good + 3:09d}.jpg", good_jpeg, "duplicate bytes 1"))
    out.append((f"{n_good + 4:09d}.jpg", good_jpeg, "duplicate bytes 2"))
    return out


def write_loose(folder: Path, items: list[tuple[str, bytes, str | None]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data, _ in items:
        (folder / name).write_bytes(data)
    return folder


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000
    tf.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, items: list[tuple[str, bytes, str | None]], per_shard: int = 5,
                 fmt: int = tarfile.USTAR_FORMAT) -> list[Path]:  # fmt: skip
    """img2dataset-style shards 00000.tar, 00001.tar, …: KEY.ext, KEY.txt (alt text), KEY.json."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(0, len(items), per_shard):
        p = folder / f"{s // per_shard:05d}.tar"
        with tarfile.open(p, "w", format=fmt) as tf:
            for name, data, caption in items[s : s + per_shard]:
                key = name.split(".")[0]
                _add(tf, name, data)
                if caption is not None:
                    _add(tf, f"{key}.txt", caption.encode())
                _add(tf, f"{key}.json", json.dumps({"key": key, "caption": caption}).encode())
        paths.append(p)
    return paths


def write_table(path: Path, items: list[tuple[str, bytes, str | None]], struct: bool = True,
                null_rows: tuple[int, ...] = (), row_group_size: int = 4) -> Path:  # fmt: skip
    """A Parquet table: ``image`` ({bytes, path} struct like HF datasets, or binary) and ``text``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cells: list = []
    for i, (name, data, _) in enumerate(items):
        if i in null_rows:
            cells.append(None)
        else:
            cells.append({"bytes": data, "path": name} if struct else data)
    typ = pa.struct([("bytes", pa.binary()), ("path", pa.string())]) if struct else pa.binary()
    t = pa.table({"image": pa.array(cells, typ), "text": [c for _, _, c in items]})
    pq.write_table(t, path, row_group_size=row_group_size)
    return path


def bucketed_sets(root, n: int = 10, bucket_args: tuple[str, ...] = ()) -> dict[str, object]:
    """The same ``n`` sample images as loose files, tar shards (4 per shard) and a Parquet image
    table under ``root``, each bucketed by ``hw bucket`` into ``root/<name>.parquet``; returns
    {"loose" | "shards" | "table": manifest path}."""
    from cli.app import main

    items = samples(n)
    write_loose(root / "loose", items)
    write_shards(root / "shards", items, per_shard=4)
    write_table(root / "t.parquet", items)
    out = {}
    for name, args in (("loose", [root / "loose"]), ("shards", [root / "shards"]),
                       ("table", [root / "t.parquet", "--image-column", "image"])):  # fmt: skip
        m = root / f"{name}.parquet"
        assert main(["bucket", *map(str, args), "--out", str(m), *bucket_args]) == 0
        out[name] = m
    return out
