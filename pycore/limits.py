"""Limits hw enforces, each named once (the CLI's help and error messages quote these)."""

from __future__ import annotations

import os

from pycore import _rust

#: Pillow's DecompressionBombError threshold, ``2 * Image.MAX_IMAGE_PIXELS`` = 2 · (1024³ // 4 // 3):
#: images declaring more pixels get status ``too_large`` by default and are never decoded. Named
#: once, in Rust (rust_ext/src/limits.rs), and read from there.
MAX_PIXELS: int = _rust.MAX_PIXELS

#: ``--threads`` above this many per core is capped (I/O-bound scans gain nothing beyond it).
MAX_THREADS_PER_CORE = 8

#: Largest square training/sampling resolution accepted (SDXL's native size is 1024).
MAX_RESOLUTION = 4096


def cpu_count() -> int:
    """Cores this process may use (the affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def max_threads() -> int:
    """The most worker threads any command starts."""
    return max(16, MAX_THREADS_PER_CORE * cpu_count())

#: Most requests `hw caption` keeps in flight at once (each holds an encoded image in memory).
MAX_CAPTION_CONCURRENCY = 1024

#: Largest |strength| a LoRA may be merged with (``LORA:WEIGHT``); real strengths are within ±10.
MAX_LORA_STRENGTH = 1000.0

#: Largest LoRA rank hw factorises to (``--rank``, ``--max-rank``); SDXL's widest layer has 5120 inputs.
MAX_LORA_RANK = 4096
