"""Atomic file writes: write to a temporary name beside the target, fsync, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from pycore.errors import HwError


def _output_target(target: str | os.PathLike[str], overwrite: bool) -> tuple[Path, Path]:
    """The target as a Path and its folder; errors for an existing target without overwrite
    and for a missing folder."""
    target = Path(target)
    if not overwrite and target.exists():
        raise HwError(f"{target} exists; pass --overwrite to replace it")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise HwError(f"output folder {parent} does not exist")
    return target, parent


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it onto the target.

    On any exception the temporary file is removed and the target is left untouched.
    With ``overwrite=False`` an existing target is an error.
    """
    target, parent = _output_target(target, overwrite)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the permissions a plain open() would.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it takes the target's place.

    An existing target (only replaced with ``overwrite``) is moved aside first and deleted only
    after the new folder is in place, so a failure never loses the old output.
    """
    target, parent = _output_target(target, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if target.exists() or target.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=parent)) / "old"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old.parent, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_atomic(target: str | os.PathLike[str], write: Callable[[Path], None], *, overwrite: bool = True) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``target`` atomically."""
    with atomic_path(target, overwrite=overwrite) as tmp:
        write(tmp)


def write_text_atomic(target: str | os.PathLike[str], text: str, *, overwrite: bool = True) -> None:
    write_atomic(target, lambda p: p.write_text(text, encoding="utf-8"), overwrite=overwrite)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def latest_checkpoint(folder: str | os.PathLike[str], pattern: str, *, marker: str | None = None) -> Path | None:
    """The checkpoint in ``folder`` with the highest number: entries whose name fully matches ``pattern``
    (a regex whose first group is the step or epoch number); with ``marker``, only folders holding that
    file (written last, so a half-written checkpoint is never picked). None when there is none."""
    import re

    best, best_n = None, -1
    folder = Path(folder)
    if not folder.is_dir():
        return None
    for entry in folder.iterdir():
        m = re.fullmatch(pattern, entry.name)
        if m is None or (marker is not None and not (entry / marker).is_file()):
            continue
        if int(m.group(1)) > best_n:
            best, best_n = entry, int(m.group(1))
    return best
