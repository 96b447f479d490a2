"""Type stubs for hw's Rust extension (checked against the module by mypy.stubtest in CI)."""

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__version__: str
__all__ = ["__version__", "walk_dir", "scan_files", "assign_buckets", "path_keys", "generate_buckets"]

def walk_dir(
    root: str | os.PathLike[str], extensions: Sequence[str], threads: int = 0
) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, str]]]:
    """Walk a folder: (candidate image paths, [(extension, skipped count)], [(folder, problem)])."""

def scan_files(
    paths: Sequence[str | os.PathLike[str]], hash: bool = True, max_pixels: int = 178956970, threads: int = 0
) -> dict[str, Any]:
    """Probe files in parallel; a dict of columns (lists and NumPy arrays), in input order."""

def assign_buckets(
    table: Sequence[tuple[int, int]],
    widths: npt.NDArray[np.uint32],
    heights: npt.NDArray[np.uint32],
    keys: npt.NDArray[np.uint64],
    small: str = "upscale",
    step: int = 64,
    min_side: int = 0,
    max_crop: float | None = None,
    flag_only: bool = False,
    seed: int | None = None,
    threads: int = 0,
) -> dict[str, Any]:
    """Assign buckets (0×0 sizes are skipped, status code 0); a dict of NumPy columns."""

def path_keys(paths: Sequence[str | os.PathLike[str]]) -> npt.NDArray[np.uint64]:
    """xxh3-64 of each path's bytes (keys for seeded random crops)."""

def generate_buckets(max_area: int, step: int, min_side: int, max_side: int) -> list[tuple[int, int]]:
    """A kohya-style generated bucket table."""
