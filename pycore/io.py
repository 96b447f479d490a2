"""Atomic file writes: write to a temporary name beside the target, fsync, then rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from pycore.errors import HwError


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it onto the target.

    On any exception the temporary file is removed and the target is left untouched.
    With ``overwrite=False`` an existing target is an error.
    """
    target = Path(target)
    if not overwrite and target.exists():
        raise HwError(f"{target} exists; pass --overwrite to replace it")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise HwError(f"output folder {parent} does not exist")
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
