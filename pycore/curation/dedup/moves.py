"""Moving or symlinking the images not kept (``--apply``); never overwrites."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import polars as pl

from pycore.errors import HwError

def parse_apply(spec: str) -> tuple[str, Path]:
    """'move:DIR' or 'symlink:DIR' → (action, folder)."""
    action, sep, folder = spec.partition(":")
    if not sep or action not in ("move", "symlink") or not folder:
        raise HwError(f"--apply must be move:DIR or symlink:DIR, got {spec!r}")
    return action, Path(folder)


def _free_name(folder: Path, name: str, taken: set[Path]) -> Path:
    stem, suffix = os.path.splitext(name)
    cand = folder / name
    k = 1
    while cand in taken or os.path.lexists(cand):
        cand = folder / f"{stem}-{k}{suffix}"
        k += 1
    taken.add(cand)
    return cand


def plan_moves(frame: pl.DataFrame, folder: Path) -> list[tuple[int, str, Path]]:
    """(row, source path, target) for every row marked keep == False; targets never exist yet
    (a numbered name is chosen instead): DIR/group-NNNNNN/name."""
    from pycore.manifest import fs_paths

    from pycore.sources import is_container_ref

    paths = fs_paths(frame)
    rows = np.flatnonzero((frame["keep"] == False).fill_null(False).to_numpy())  # noqa: E712
    inside = [paths[r] for r in rows if is_container_ref(paths[r])]
    if inside:
        raise HwError(f"--apply cannot move images stored inside tar shards or Parquet tables ({inside[0]}); "
                      "filter the manifest on its keep column instead")  # fmt: skip
    groups = frame["dup_group"].to_list()
    taken: set[Path] = set()
    return [(int(r), paths[r], _free_name(folder / f"group-{groups[r]:06d}", os.path.basename(paths[r]), taken))
            for r in rows]  # fmt: skip


def apply_moves(frame: pl.DataFrame, action: str, plan: list[tuple[int, str, Path]]) -> tuple[pl.DataFrame, list[str]]:
    """Move or symlink the planned files (never overwriting). Returns the frame with
    ``dup_moved_to`` (and status "duplicate_moved" for moved rows) and a list of problems."""
    moved_to: list[str | None] = frame["dup_moved_to"].to_list() if "dup_moved_to" in frame.columns else [None] * frame.height
    status = frame["status"].to_list()
    problems = []
    for row, src, dst in plan:
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            if os.path.lexists(dst):
                raise FileExistsError(f"{dst} exists")
            if action == "symlink":
                os.symlink(os.path.abspath(src), dst)
            else:
                # link + unlink is atomic and refuses to overwrite on one file system
                try:
                    os.link(src, dst)
                    os.unlink(src)
                except OSError as e:
                    if e.errno != 18:  # EXDEV: another file system, copy instead
                        raise
                    shutil.copy2(src, dst)
                    os.unlink(src)
                status[row] = "duplicate_moved"
            moved_to[row] = str(dst)
        except OSError as e:
            problems.append(f"{src}: {e}")
    return frame.with_columns(pl.Series("dup_moved_to", moved_to, dtype=pl.String),
                              pl.Series("status", status, dtype=pl.String)), problems  # fmt: skip


