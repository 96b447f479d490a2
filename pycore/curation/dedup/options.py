"""Settings and report of one dedup run, and the constants the CLI quotes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pycore.checks import check_float, check_int
from pycore.errors import HwError

#: Default Hamming threshold on the 64-bit phash (chosen from bench/bench_dedup.py's quality
#: run: the best F1 on re-encodes, resizes, small crops and brightness shifts of real photos).
DEFAULT_THRESHOLD = 10
#: Cosine similarity threshold for --method clip.
DEFAULT_CLIP_THRESHOLD = 0.95
#: In fast mode, JPEGs are decoded at the smallest 1/2, 1/4, 1/8 scale keeping both sides ≥ this.
FAST_MIN_SIDE = 128
HASH_MODES = ("exact", "fast")
METHODS = ("phash", "clip")
#: How the kept image of a group is chosen (after --keep-by when given).
KEEP_POLICY = ("highest resolution, then the least processed encoding (a camera format — JPEG, HEIC, AVIF, JPEG XL — "
               "before a re-saved PNG/WebP/TIFF/BMP/GIF), then the higher estimated JPEG quality, then the older file "
               "(mtime), then path order")


@dataclass
class DedupOptions:
    """Settings of one dedup run (validated on construction)."""

    threshold: int = DEFAULT_THRESHOLD  #: largest phash Hamming distance of a near duplicate
    hash_mode: str = "exact"  #: exact (imagehash bit-identical) or fast (reduced-scale JPEG decode)
    fast_min_side: int = FAST_MIN_SIDE  #: fast mode: smallest decoded side
    method: str = "phash"  #: phash, or clip (open_clip embeddings, cosine threshold)
    clip_threshold: float = DEFAULT_CLIP_THRESHOLD  #: --method clip: smallest cosine similarity
    keep_by: str | None = None  #: keep the row with the highest value of this column
    keep_ascending: bool = False  #: with keep_by: keep the lowest value instead
    max_group_size: int = 1000  #: warn about groups larger than this
    threads: int = 0  #: worker threads (0 = one per core)

    stats: bool = True  #: quality statistics from the same decode (columns q_*)
    ray: str | None = None  #: hash on Ray at this address (pycore.distributed); grouping stays global
    ray_workers: int | None = None  #: with ray: at most this many concurrent tasks

    def __post_init__(self) -> None:
        self.threshold = check_int("--threshold", self.threshold, 0, 32, "bits of the 64-bit phash")
        if self.hash_mode not in HASH_MODES:
            raise HwError(f"--hash-mode must be one of {', '.join(HASH_MODES)}, not {self.hash_mode!r}")
        if self.method not in METHODS:
            raise HwError(f"--method must be one of {', '.join(METHODS)}, not {self.method!r}")
        self.fast_min_side = check_int("fast_min_side", self.fast_min_side, 32, 4096, "the hash's input is 32×32")
        self.clip_threshold = check_float("--clip-threshold", self.clip_threshold, -1.0, 1.0, why="a cosine similarity")
        self.max_group_size = check_int("--max-group-size", self.max_group_size, 2, 1 << 40)
        self.threads = check_int("--threads", self.threads, 0, 1 << 16)


@dataclass
class DedupReport:
    rows: int = 0
    hashed: int = 0
    reused: int = 0
    pillow_fallback: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    exact_groups: int = 0
    near_groups: int = 0
    groups: int = 0
    in_groups: int = 0
    marked_for_removal: int = 0
    largest_group: int = 0
    oversized_groups: list[dict[str, int]] = field(default_factory=list)
    pairs: int = 0
    threshold: int | float = 0
    method: str = "phash"
    hash_mode: str = "exact"
    keep_policy: str = KEEP_POLICY

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


