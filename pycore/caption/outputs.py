"""Caption outputs besides the manifest: sidecar .txt files and kohya metadata JSON/JSONL."""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from pycore.errors import HwError, HwWarning
from pycore.io import write_atomic, write_text_atomic


@dataclass
class SidecarReport:
    written: int = 0
    exists: int = 0
    outside_root: int = 0
    clashes: int = 0
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"written": self.written, "exists": self.exists, "outside_root": self.outside_root,
                "clashes": self.clashes, "errors": self.errors[:20]}  # fmt: skip


def _inside(path: Path, root: Path) -> bool:
    """Is ``path`` (its real folder, and the file itself if it is a symlink) inside ``root``?"""
    real_root = Path(os.path.realpath(root))
    real_parent = Path(os.path.realpath(path.parent))
    if not real_parent.is_relative_to(real_root):
        return False
    if path.is_symlink():  # never write through a link that leaves the root
        return Path(os.path.realpath(path)).is_relative_to(real_root)
    return True


def write_sidecars(frame: pl.DataFrame, root: str | os.PathLike[str], *, overwrite: bool = False) -> SidecarReport:
    """``image.ext`` → ``image.txt`` with the caption, for rows with caption_status ok.

    Only inside ``root`` (the dataset folder): a sidecar whose folder resolves outside it is not
    written. An existing .txt is kept unless ``overwrite``. Two images with the same stem in one
    folder (a.jpg, a.png) would share a.txt: neither is written and both are reported.
    """
    from pycore.manifest import fs_paths

    root_p = Path(root)
    if not root_p.is_dir():
        raise HwError(f"dataset root {root_p} is not a folder (needed for --sidecar)")
    rep = SidecarReport()
    ok = frame.with_row_index("_i").filter(pl.col("caption_status") == "ok")
    if ok.height == 0:
        return rep
    paths = fs_paths(ok)
    caps = ok["caption"].to_list()
    from pycore.sources import is_container_ref

    targets: dict[Path, list[int]] = {}
    inside = 0
    for j, p in enumerate(paths):
        if is_container_ref(p):  # a tar member or Parquet cell has no folder to write a .txt into
            inside += 1
            continue
        targets.setdefault(Path(p).with_suffix(".txt"), []).append(j)
    if inside:
        rep.errors.append(f"{inside} image(s) are stored inside tar shards or Parquet tables; no .txt written for them "
                          "(the captions are in the manifest)")  # fmt: skip
    for txt, idx in targets.items():
        texts = {caps[j] for j in idx}
        if len(idx) > 1 and len(texts) > 1:
            rep.clashes += len(idx)
            rep.errors.append(f"{txt}: {len(idx)} images share this sidecar name; not written")
            continue
        if not _inside(txt, root_p):
            rep.outside_root += 1
            rep.errors.append(f"{txt}: outside the dataset root {root_p}; not written")
            continue
        if txt.exists() or txt.is_symlink():
            if not overwrite:
                rep.exists += 1
                continue
            if not txt.is_file():
                rep.errors.append(f"{txt}: exists and is not a regular file; not written")
                continue
        try:
            write_text_atomic(txt, caps[idx[0]] + "\n", overwrite=True)
            rep.written += 1
        except (OSError, HwError) as e:
            rep.errors.append(f"{txt}: {getattr(e, 'strerror', None) or e}")
    return rep


def export_metadata(frame: pl.DataFrame, path: str | os.PathLike[str], *, overwrite: bool = False) -> int:
    """kohya sd-scripts metadata for the captioned rows; returns the number of images.

    ``.json``: ``{image_key: {"caption", "tags", "image_size"}}`` (kohya's in_json; keys are full
    paths — use ``--full_path``). ``.jsonl``: one ``{"image_key", "caption", "tags", "image_size",
    "summary", "elements", "inspired_by", "quality"}`` object per line.
    """
    from pycore.manifest import fs_paths

    path = Path(path)
    if path.suffix.lower() not in (".json", ".jsonl"):
        raise HwError(f"--metadata must end in .json or .jsonl (got {path.name})")
    ok = frame.filter(pl.col("caption_status") == "ok")
    keys = fs_paths(ok)
    n = ok.height
    col = lambda c: ok[c].to_list() if c in ok.columns else [None] * n  # noqa: E731
    w, h = col("width"), col("height")
    entries = []
    for i, (k, cap, summ, el, insp, q) in enumerate(zip(keys, col("caption"), col("summary"), col("elements"), col("inspired_by"), col("quality"), strict=True)):
        d = {"caption": cap, "tags": ", ".join(el or [])}
        if w[i] is not None and h[i] is not None:
            d["image_size"] = [int(w[i]), int(h[i])]
        entries.append((k, d, {"summary": summ, "elements": el or [], "inspired_by": insp, "quality": q}))
    if path.suffix.lower() == ".json":
        text = json_text({k: d for k, d, _ in entries}, indent=1) + "\n"
    else:
        text = "".join(json_text({"image_key": k, **d, **extra}) + "\n" for k, d, extra in entries)
    odd = sum(1 for k in keys if _SURROGATE.search(k))
    if odd:
        warnings.warn(f"{odd:,} file name(s) in {path.name} are not valid UTF-8: written as \\udcXX escapes (Python's "
                      "surrogateescape; json.load + open() find the file, other readers may not) — rename them for other tools",
                      HwWarning, stacklevel=2)  # fmt: skip
    write_atomic(path, lambda p: p.write_bytes(text.encode("utf-8")), overwrite=overwrite)
    return n


#: A byte of a non-UTF-8 file name, as Python's file-system decoding holds it (surrogateescape).
_SURROGATE = re.compile("[\udc80-\udcff]")


def json_text(obj: object, **kw: object) -> str:
    """JSON text that is always valid UTF-8: a file name's undecodable byte 0xXY (held by Python
    as the lone surrogate U+DCXY) is written as the escape ``\\udcXY``. Python's ``json.load``
    gives back the same string and ``open()`` the same file, so the scheme is lossless for
    Python readers (kohya sd-scripts); everything else is written as plain UTF-8."""
    text = json.dumps(obj, ensure_ascii=False, **kw)  # type: ignore[arg-type]
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
