"""Type stubs for hw's Rust extension (checked against the module by mypy.stubtest in CI)."""

import os
from collections.abc import Sequence
from typing import Any, final

import numpy as np
import numpy.typing as npt

__version__: str
#: Image status names in code order (a ``status_code`` array indexes it); the Rust enum ``Status``.
STATUSES: list[str]
#: The statuses bucket assignment sets.
BUCKET_STATUSES: list[str]
#: Pillow's DecompressionBombError threshold (2 * Image.MAX_IMAGE_PIXELS).
MAX_PIXELS: int
#: The ``error`` of a row rejected by bucketing is this followed by its status.
REJECTED_BY_BUCKETING: str
#: The manifest columns ``BucketRows.write`` writes, in order.
MANIFEST_COLUMNS: list[str]
__all__ = [
    "__version__", "STATUSES", "BUCKET_STATUSES", "MAX_PIXELS", "REJECTED_BY_BUCKETING", "MANIFEST_COLUMNS", "walk_dir",
    "scan_files", "assign_buckets", "path_keys", "bucket_summary", "BucketRows", "generate_buckets",
    "perceptual_hashes", "hash_luma", "decode_luma", "hamming_pairs", "connected_components", "group_max_distances",
    "tar_index", "scan_ranges", "scan_buffers", "perceptual_hashes_buffers",
]

def walk_dir(
    root: str | os.PathLike[str], extensions: Sequence[str], threads: int = 0
) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, str]]]:
    """Walk a folder: (candidate image paths, [(extension, skipped count)], [(folder, problem)])."""

def scan_files(
    paths: Sequence[str | os.PathLike[str]], hash: bool = True, max_pixels: int | None = None, threads: int = 0
) -> dict[str, Any]:
    """Probe files in parallel; a dict of columns (lists and NumPy arrays; ``status_code`` indexes
    ``STATUSES``), in input order. ``max_pixels`` None: ``MAX_PIXELS``."""

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
    status_codes: npt.NDArray[np.uint8] | None = None,
) -> dict[str, Any]:
    """Assign buckets; a dict of NumPy columns (``assigned`` is False for 0×0 sizes and, with
    ``status_codes``, for rows whose status is neither ok nor a bucketing one: they keep their
    status; ``status_code`` indexes ``STATUSES``)."""

def bucket_summary(
    status_codes: npt.NDArray[np.uint8],
    bucket_widths: npt.NDArray[np.uint32],
    bucket_heights: npt.NDArray[np.uint32],
    upscaled: npt.NDArray[np.bool_],
    flagged: npt.NDArray[np.bool_],
    orientation: npt.NDArray[np.uint8],
    crop_fraction: npt.NDArray[np.float64],
) -> dict[str, Any]:
    """Counts of a bucketed manifest: {rows, ok, not_ok: [(status, n)] most first, buckets:
    [((w, h), n)] of ok rows, upscaled, flagged, rotated, mean_crop}."""

@final
class BucketRows:
    """A folder's manifest rows held in Rust from the scan to the Parquet file."""

    def __new__(cls) -> BucketRows: ...
    def __len__(self) -> int: ...
    def scan(
        self, paths: Sequence[str | os.PathLike[str]], hash: bool = True, max_pixels: int | None = None, threads: int = 0
    ) -> None:
        """Probe ``paths`` and append their rows (in order)."""
    def assign(
        self,
        table: Sequence[tuple[int, int]],
        small: str = "upscale",
        step: int = 64,
        min_side: int = 0,
        max_crop: float | None = None,
        flag_only: bool = False,
        seed: int | None = None,
        threads: int = 0,
    ) -> None:
        """Bucket every eligible row (see ``assign_buckets``)."""
    def summary(self) -> dict[str, Any]:
        """The counts of ``bucket_summary`` over these rows."""
    def write(self, path: str | os.PathLike[str], metadata: Sequence[tuple[str, str]]) -> None:
        """Write the bucketed rows as a manifest Parquet file with these footer key/value pairs."""

def path_keys(paths: Sequence[str | os.PathLike[str]]) -> npt.NDArray[np.uint64]:
    """xxh3-64 of each path's bytes (keys for seeded random crops)."""

def generate_buckets(max_area: int, step: int, min_side: int, max_side: int) -> list[tuple[int, int]]:
    """A kohya-style generated bucket table."""


def perceptual_hashes(
    paths: Sequence[str | os.PathLike[str]], fast_min_side: int | None = None, threads: int = 0, stats: bool = False
) -> dict[str, Any]:
    """imagehash-identical (phash, dhash) of JPEG/PNG files: {phash, dhash: uint64 arrays, ok: bool array,
    error_kind, error: lists}. `fast_min_side`: decode JPEGs at the smallest 1/2, 1/4, 1/8 scale keeping both
    sides >= it, a YCbCr JPEG's Y plane only (fast mode; not imagehash-identical). `stats`: also
    sharpness, luma_mean, luma_std, clip_low, clip_high, colorfulness (float32, NaN where not ok), grayscale
    (bool), jpeg_quality (int16, -1 where unknown) from the same decode. Ctrl-C stops between files."""

def hash_luma(pixels: npt.NDArray[np.uint8]) -> tuple[int, int]:
    """(phash, dhash) of a 2-D uint8 luma array."""

def decode_luma(path: str | os.PathLike[str], fast_min_side: int | None = None) -> npt.NDArray[np.uint8]:
    """A JPEG/PNG file's luma as Pillow's convert("L") gives it (2-D uint8); with `fast_min_side`, a JPEG's
    reduced-scale decode (a YCbCr JPEG's Y plane)."""

def hamming_pairs(
    hashes: npt.NDArray[np.uint64], threshold: int, brute_force: bool = False, threads: int = 0
) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint32], npt.NDArray[np.uint8]]:
    """All pairs (i < j) within `threshold` bits: (i, j, distance), sorted by (i, j)."""

def connected_components(n: int, i: npt.NDArray[np.uint32], j: npt.NDArray[np.uint32]) -> npt.NDArray[np.int64]:
    """Component labels (0.. by smallest member; -1 for singletons)."""

def group_max_distances(
    hashes: npt.NDArray[np.uint64], labels: npt.NDArray[np.int64], threads: int = 0
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_]]:
    """Per group label: (largest internal Hamming distance, computed exactly?)."""

# ---- images where they are stored: tar shards and byte buffers (rust_ext/src/tar.rs) ----

def tar_index(
    path: str | os.PathLike[str],
) -> tuple[list[bytes], npt.NDArray[np.uint64], npt.NDArray[np.uint64], list[str], int, tuple[str, str] | None]:
    """Index a tar shard in place: (member names, data offsets, sizes, kinds "file"/"dir"/"other",
    shard length, (status name, reason) when the shard ends early or has a damaged header)."""

def scan_ranges(
    paths: Sequence[str | os.PathLike[str]],
    offsets: npt.NDArray[np.uint64],
    sizes: npt.NDArray[np.uint64],
    hash: bool = True,
    max_pixels: int | None = None,
    threads: int = 0,
) -> dict[str, Any]:
    """Probe byte ranges of files (tar members) in place; the columns of `scan_files`."""

def scan_buffers(
    buffers: Sequence[bytes], hash: bool = True, max_pixels: int | None = None, threads: int = 0
) -> dict[str, Any]:
    """Probe in-memory images; the columns of `scan_files` (mtime NaN)."""

def perceptual_hashes_buffers(
    buffers: Sequence[bytes], fast_min_side: int | None = None, threads: int = 0, stats: bool = False
) -> dict[str, Any]:
    """`perceptual_hashes` for in-memory images (bytes): the same columns, same order."""
