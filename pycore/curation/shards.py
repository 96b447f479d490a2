"""Naming many input files at once: brace patterns, list files and folders of shards.

``shards/{00000..00099}.tar`` (zero padding kept, as in WebDataset and img2dataset), ``a{x,y}b``
alternatives, several braces in one pattern (expanded left to right), a list file (``@list.txt``,
or any ``.lst``/``.list`` file: one path per line, ``#`` comments, relative paths from
the list's folder), and a folder (its ``.tar`` or ``.parquet`` files, sorted by name, not
recursive — img2dataset's output layout).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from pycore.errors import HwError

#: A brace pattern that expands to more names than this is almost certainly a mistake.
MAX_EXPANSION = 10_000_000

_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(\d+))?$")
#: A file with one of these suffixes is a list of inputs; any other (a caption ``.txt``) only with ``@``.
LIST_SUFFIXES = (".lst", ".list")
SHARD_SUFFIXES = (".tar",)
TABLE_SUFFIXES = (".parquet",)


def _first_brace(s: str) -> tuple[int, int] | None:
    """(start, end) of the first top-level ``{…}`` group, or None."""
    start = s.find("{")
    if start < 0:
        return None
    depth = 0
    for i in range(start, len(s)):
        if s[i] == "{":
            depth += 1
        elif s[i] == "}":
            depth -= 1
            if depth == 0:
                return start, i
    raise HwError(f"unbalanced '{{' in pattern {s!r}")


def _alternatives(body: str) -> list[str]:
    m = _RANGE.match(body)
    if m:
        a, b, step = int(m[1]), int(m[2]), int(m[3] or 1)
        if step <= 0:
            raise HwError(f"brace range {{{body}}} needs a positive step")
        if abs(b - a) // step + 1 > MAX_EXPANSION:
            raise HwError(f"brace range {{{body}}} names more than {MAX_EXPANSION:,} shards")
        width = max(len(m[1]), len(m[2])) if (m[1].startswith("0") or m[2].startswith("0")) and len(m[1]) > 1 else 0
        seq = range(a, b + 1, step) if a <= b else range(a, b - 1, -step)
        return [str(v).zfill(width) if width else str(v) for v in seq]
    parts, depth, cur = [], 0, ""
    for ch in body:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    parts.append(cur)
    if len(parts) == 1:  # "{x}" is literal in shells and in braceexpand
        return ["{" + body + "}"]
    return parts


def expand_braces(pattern: str) -> list[str]:
    """All names a brace pattern stands for, in order (``{00..03}``, ``{a,b}``, nested, several)."""
    span = _first_brace(pattern)
    if span is None:
        return [pattern]
    s, e = span
    head, body, tail = pattern[:s], pattern[s + 1 : e], pattern[e + 1 :]
    alts = _alternatives(body)
    if alts == ["{" + body + "}"]:
        return [head + alts[0] + t for t in expand_braces(tail)]
    out: list[str] = []
    for a in alts:
        for x in expand_braces(head + a + tail):
            out.append(x)
            if len(out) > MAX_EXPANSION:
                raise HwError(f"pattern {pattern!r} names more than {MAX_EXPANSION:,} files")
    return out


def is_pattern(src: str) -> bool:
    return "{" in src and "}" in src and not os.path.exists(src)


def is_list_file(src: str) -> bool:
    return src.startswith("@") or (Path(src).suffix.lower() in LIST_SUFFIXES and Path(src).is_file())


def read_list(src: str) -> list[str]:
    """Paths named in a list file (relative ones from the list's folder); ``@`` prefix optional."""
    p = Path(src[1:] if src.startswith("@") else src)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise HwError(f"cannot read list file {p}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise HwError(f"list file {p} is not UTF-8 text") from None
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        out.append(line if os.path.isabs(line) else str(p.parent / line))
    if not out:
        raise HwError(f"list file {p} names no files")
    return out


def folder_files(folder: str, suffixes: tuple[str, ...]) -> list[str]:
    """Files directly in ``folder`` with one of ``suffixes`` (case-insensitive), sorted by name."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as e:
        raise HwError(f"cannot read {folder}: {e.strerror or e}") from None
    return [os.path.join(folder, n) for n in names
            if n.lower().endswith(suffixes) and not n.startswith(".") and os.path.isfile(os.path.join(folder, n))]  # fmt: skip


def expand_inputs(src: str | os.PathLike[str], suffixes: tuple[str, ...]) -> list[str]:
    """The container files (tar shards or Parquet tables) an input names: a file, a brace pattern,
    a list file or a folder. Every name is made absolute; duplicates are an error (a shard read
    twice would give every image twice)."""
    s = os.fspath(src)
    if is_list_file(s):
        names = [n for item in read_list(s) for n in (expand_braces(item) if is_pattern(item) else [item])]
    elif is_pattern(s):
        names = expand_braces(s)
    elif os.path.isdir(s):
        names = folder_files(s, suffixes)
        if not names:
            raise HwError(f"{s} holds no {'/'.join(suffixes)} files")
    else:
        names = [s]
    names = [os.path.abspath(n) for n in names]
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise HwError(f"{n} is named twice in {s}")
        seen.add(n)
    return names


def folder_has(folder: str | os.PathLike[str], suffixes: tuple[str, ...]) -> bool:
    """Whether ``folder`` directly holds a file with one of ``suffixes``."""
    try:
        with os.scandir(folder) as it:
            return any(e.name.lower().endswith(suffixes) and e.is_file() for e in it)
    except OSError:
        return False


def names_shards(src: str | os.PathLike[str]) -> bool:
    """Whether an input names tar shards (a .tar file, a pattern or list of them, or a folder
    holding .tar files) rather than a folder of images or a manifest."""
    s = os.fspath(src)
    if is_list_file(s):
        return all(n.lower().endswith(SHARD_SUFFIXES) for n in read_list(s))
    if is_pattern(s):
        return s.lower().endswith(SHARD_SUFFIXES)
    if os.path.isdir(s):
        return folder_has(s, SHARD_SUFFIXES) and _only_shard_files(s)
    return s.lower().endswith(SHARD_SUFFIXES)


def _only_shard_files(folder: str) -> bool:
    """A shard folder as img2dataset writes it: files only (shards and their .parquet/.json
    companions), no sub-folders and no loose images — so a photo folder that happens to hold a
    .tar archive is still scanned as a folder of images."""
    from pycore.curation.scan import IMAGE_EXTENSIONS

    try:
        with os.scandir(folder) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                if e.is_dir() or e.name.rpartition(".")[2].lower() in IMAGE_EXTENSIONS:
                    return False
    except OSError:
        return False
    return True


@dataclass
class SourceOptions:
    """Where the images are, beyond a folder of files (``hw bucket`` options)."""

    #: Parquet tables: the column holding image bytes (binary, or HF datasets' {bytes, path}).
    image_column: str | None = None
    #: Parquet tables: a text column carried into the manifest as ``source_caption``.
    caption_column: str | None = None
    #: Tar shards: carry ``KEY.txt`` as ``source_caption`` and ``KEY.json`` as ``source_json``.
    sidecars: bool = False
    #: Run the scan on Ray at this address (``local``, ``auto``, ``HOST:PORT``; pycore.distributed).
    ray: str | None = None
    #: With ``ray``: at most this many concurrent tasks.
    ray_workers: int | None = None

    def __post_init__(self) -> None:
        from pycore.checks import check_int

        if self.caption_column and not self.image_column:
            raise HwError("--caption-column applies to Parquet tables read with --image-column")
        if self.ray is not None or os.environ.get("HW_RAY_ADDRESS"):
            from pycore.distributed import address_from

            self.ray = address_from(self.ray)
        if self.ray_workers is not None:
            check_int("--ray-workers", self.ray_workers, 1, 4096)
