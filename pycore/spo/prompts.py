"""Prompt lists for `hw spo-train` and `hw spo-sample`: .txt, .jsonl, or a table column.

* ``.txt``: one prompt per line (blank lines are not prompts and are passed over).
* ``.jsonl`` / ``.ndjson``: one JSON object per line with the prompt under ``--prompt-column``
  (default: the first of ``prompt``, ``caption``, ``text`` present), or a bare JSON string.
* ``.parquet`` / ``.csv`` / ``.json`` tables, e.g. an ``hw caption`` manifest with
  ``--prompt-column caption``. Rows whose ``caption_status`` is not ``ok`` have no caption and
  are skipped with that reason.

Captions written with ``--keep-tokens`` carry kohya's ``|||`` separator; it becomes a comma, so
the prompt reads as the caption without it. Every unusable row is reported (row number, reason),
never dropped silently; a file with no usable prompt is a one-line error.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from pycore.errors import HwError, first_line

DEFAULT_KEYS = ("prompt", "caption", "text")
TABLE_SUFFIXES = (".parquet", ".csv", ".json")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
_SEPARATOR = re.compile(r"\s*\|\|\|\s*")


class PromptsError(HwError):
    """A prompt file that cannot be used."""


@dataclass
class PromptSet:
    """Usable prompts in file order (repeats kept) and the rows skipped, as (1-based row, reason)."""

    source: str
    prompts: list[str]
    skipped: list[tuple[int, str]] = field(default_factory=list)

    @property
    def unique(self) -> int:
        return len(set(self.prompts))

    def __len__(self) -> int:
        return len(self.prompts)

    def add(self, row: int, value: object, what: str) -> None:
        """Keep ``value`` as a prompt, or record row ``row`` as skipped when it holds none."""
        p = clean_prompt(value)
        if p is None:
            self.skipped.append((row, f"{what} is empty or not text"))
        else:
            self.prompts.append(p)


def clean_prompt(value: object) -> str | None:
    """The prompt text of one cell, or None when it has none (null, not text, blank)."""
    if not isinstance(value, str):
        return None
    text = _SEPARATOR.sub(", ", value).strip().strip(",").strip()
    return text or None


def _from_txt(path: Path) -> PromptSet:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PromptsError(f"prompt file {path} is not UTF-8 text (byte {e.start})") from None
    ps = PromptSet(str(path), [])
    for i, line in enumerate(text.splitlines(), 1):
        p = clean_prompt(line)
        if p is not None:
            ps.prompts.append(p)
    return ps


def _pick_key(keys: list[str], column: str | None, path: Path) -> str:
    if column is not None:
        if column not in keys:
            raise PromptsError(f"{path} has no column {column!r} (columns: {', '.join(keys[:8]) or 'none'})")
        return column
    for k in DEFAULT_KEYS:
        if k in keys:
            return k
    raise PromptsError(f"{path} has none of the columns {', '.join(DEFAULT_KEYS)}; name one with --prompt-column "
                       f"(columns: {', '.join(keys[:8]) or 'none'})")  # fmt: skip


def _from_jsonl(path: Path, column: str | None) -> PromptSet:
    ps = PromptSet(str(path), [])
    key: str | None = column
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise PromptsError(f"prompt file {path} is not UTF-8 text (byte {e.start})") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            ps.skipped.append((i, f"not JSON ({e.msg})"))
            continue
        if isinstance(obj, str):
            value: object = obj
        elif isinstance(obj, dict):
            if key is None:
                found = [k for k in DEFAULT_KEYS if k in obj]
                if not found:
                    ps.skipped.append((i, f"no {'/'.join(DEFAULT_KEYS)} key"))
                    continue
                key = found[0]
            if key not in obj:
                ps.skipped.append((i, f"no {key!r} key"))
                continue
            value = obj[key]
        else:
            ps.skipped.append((i, "neither a JSON object nor a string"))
            continue
        ps.add(i, value, key or "value")
    return ps


def _from_table(path: Path, column: str | None) -> PromptSet:
    import polars as pl

    try:
        if path.suffix.lower() == ".csv":
            frame = pl.read_csv(path, infer_schema_length=10000)
        elif path.suffix.lower() == ".json":
            frame = pl.read_json(path)
        else:
            frame = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError, ValueError) as e:
        raise PromptsError(f"cannot read prompt table {path}: {first_line(e)}") from None
    key = _pick_key(frame.columns, column, path)
    values = frame.get_column(key).to_list()
    status = frame.get_column("caption_status").to_list() if key == "caption" and "caption_status" in frame.columns else None
    ps = PromptSet(str(path), [])
    for i, v in enumerate(values, 1):
        if status is not None and status[i - 1] != "ok":
            ps.skipped.append((i, f"caption_status {status[i - 1]}"))
            continue
        ps.add(i, v, key)
    return ps


def load_prompts(path: str | os.PathLike[str], column: str | None = None) -> PromptSet:
    """Read the prompts of ``path`` (see the module doc). ``column`` applies to .jsonl and tables."""
    p = Path(path)
    if not p.exists():
        raise PromptsError(f"prompt file {p} not found")
    if not p.is_file():
        raise PromptsError(f"prompt file {p} is not a file")
    suffix = p.suffix.lower()
    try:
        if suffix in JSONL_SUFFIXES:
            ps = _from_jsonl(p, column)
        elif suffix in TABLE_SUFFIXES:
            ps = _from_table(p, column)
        else:
            ps = _from_txt(p)
    except OSError as e:
        raise PromptsError(f"cannot read prompt file {p}: {e.strerror or e}") from None
    if not ps.prompts:
        why = f" ({len(ps.skipped)} rows skipped, first: row {ps.skipped[0][0]}: {ps.skipped[0][1]})" if ps.skipped else ""
        raise PromptsError(f"no prompts in {p}{why}")
    return ps
