"""Validation shared by every command: numeric ranges, threads, devices, dtypes, output paths.

Each check raises :class:`~pycore.errors.HwError` with one line naming the option, the value and
the bound, so the CLI and Python callers get the same message. Request dataclasses call these
from ``__post_init__``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pycore.errors import HwError, HwWarning
from pycore.limits import cpu_count, max_threads


def check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None, why: str = "") -> int:
    """``value`` as an int within [lo, hi] (either bound may be None)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise HwError(f"{name} must be a whole number, not {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise HwError(f"{name} must be {_range_text(lo, hi)}, not {value}" + (f" ({why})" if why else ""))
    return value


def check_float(name: str, value: Any, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, hi_open: bool = False, why: str = "") -> float:  # fmt: skip
    """``value`` as a finite float within the bounds (open or closed at each end)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise HwError(f"{name} must be a number, not {value!r}")
    v = float(value)
    bad = not math.isfinite(v)
    bad = bad or (lo is not None and (v < lo or (lo_open and v == lo)))
    bad = bad or (hi is not None and (v > hi or (hi_open and v == hi)))
    if bad:
        lo_s = "" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
        hi_s = "" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
        rng = f"in {lo_s or '(-∞'}, {hi_s or '∞)'}"
        raise HwError(f"{name} must be a finite number {rng}, not {value}" + (f" ({why})" if why else ""))
    return v


def _range_text(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f"between {lo:,} and {hi:,}"
    if lo is not None:
        return f"at least {lo:,}"
    return f"at most {hi:,}"


def resolve_threads(threads: int | None, name: str = "--threads") -> int:
    """Worker threads to start: None → $HW_THREADS or 0; 0 → one per core; capped at
    :func:`pycore.limits.max_threads` with an :class:`HwWarning`. Never 0 on return."""
    if threads is None:
        env = os.environ.get("HW_THREADS", "").strip()
        if env:
            try:
                threads = int(env)
            except ValueError:
                raise HwError(f"HW_THREADS must be a whole number, not {env!r}") from None
            name = "HW_THREADS"
        else:
            threads = 0
    check_int(name, threads, 0)
    if threads == 0:
        return cpu_count()
    cap = max_threads()
    if threads > cap:
        warnings.warn(f"{name} {threads:,} is more than {cap} ({cap // cpu_count()} per core on this "
                      f"{cpu_count()}-core machine); using {cap}", HwWarning, stacklevel=2)  # fmt: skip
        return cap
    return threads


# ---------------------------------------------------------------------------------------------
# devices and dtypes (torch is imported only when a check needs it)

DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float": "float32",
               "float16": "float16", "fp16": "float16", "half": "float16",
               "bfloat16": "bfloat16", "bf16": "bfloat16"}  # fmt: skip


def dtype_name(name: Any, option: str = "--dtype") -> str:
    """The canonical name (float32, float16, bfloat16) of a dtype given by name or torch dtype."""
    s = str(name).removeprefix("torch.").strip().lower()
    if s not in DTYPE_NAMES:
        raise HwError(f"{option} must be one of float32, float16, bfloat16 (or fp32, fp16, bf16), not {name!r}")
    return DTYPE_NAMES[s]


def parse_dtype(name: Any, option: str = "--dtype") -> Any:
    """A torch dtype from a name (``fp16``, ``bfloat16``, ``torch.float32``, …) or a torch dtype."""
    import torch

    return getattr(torch, dtype_name(name, option))


def parse_device(name: str | None, option: str = "--device") -> str:
    """A usable torch device string: ``auto`` (CUDA, then Apple MPS, then CPU), ``cpu``, ``cuda``,
    ``cuda:N`` or ``mps``; a device this machine lacks is a one-line error."""
    s = (name or "auto").strip().lower()
    kind, _, index = s.partition(":")
    if kind not in ("auto", "cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise HwError(f"{option} must be auto, cpu, cuda, cuda:N or mps, not {name!r}")
    import torch

    has_mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if kind == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise HwError(f"{option} {s}: {why} (torch.cuda.is_available() is False); use --device cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise HwError(f"{option} {s}: this machine has {torch.cuda.device_count()} CUDA device(s) (0-based)")
    if kind == "mps" and not has_mps:
        raise HwError(f"{option} mps: Apple's MPS backend is not available here; use --device cpu")
    return s


# ---------------------------------------------------------------------------------------------
# output paths


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # resolves symlinks; equal inode+device catches hard links
    except OSError:
        return a.resolve() == b.resolve()


def _inside(a: Path, folder: Path) -> bool:
    try:
        a.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def check_output(path: str | os.PathLike[str] | None, *, inputs: Iterable[str | os.PathLike[str] | None] = (),
                 overwrite: bool = False, folder: bool = False, option: str = "--out") -> Path | None:  # fmt: skip
    """Check an output path before any work starts; returns it as a Path (None passes through).

    - its folder exists and is writable;
    - a file output is not an existing folder, a folder output not an existing file;
    - an existing output needs ``overwrite``;
    - it is none of the command's inputs (same resolved path or the same file through a hard
      link), and an existing folder output does not contain an input (replacing it would
      delete the input).
    """
    if path is None:
        return None
    p = Path(path)
    try:
        os.fsencode(p).decode("utf-8")
    except UnicodeDecodeError:
        raise HwError(f"{option} {os.fsencode(p)!r}: the name is not valid UTF-8; choose a UTF-8 name") from None
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise HwError(f"{option} {p}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise HwError(f"{option} {p}: folder {parent} is not writable")
    if p.exists() or p.is_symlink():
        if folder and not p.is_dir():
            raise HwError(f"{option} {p} is a file; this output is a folder")
        if not folder and p.is_dir():
            raise HwError(f"{option} {p} is a folder; this output is a file")
    for inp in inputs:
        if inp is None:
            continue
        q = Path(inp)
        if not (q.exists() or q.is_symlink()):
            continue
        if (p.exists() and _same_file(p, q)) or p.resolve() == q.resolve():
            raise HwError(f"{option} {p} is also an input of this command ({q}); write to another path")
        if folder and p.exists() and _inside(q, p):
            raise HwError(f"{option} {p} contains the input {q}; write to another folder")
    if (p.exists() or p.is_symlink()) and not overwrite:
        raise HwError(f"{p} exists; pass --overwrite to replace it")
    return p
