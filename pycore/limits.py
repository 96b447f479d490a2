"""Limits hw enforces, each named once (the CLI's help and error messages quote these)."""

from __future__ import annotations

import os

#: Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS`` = 1024·1024·1024 // 4 // 3): images
#: declaring more pixels get status ``too_large`` by default and are never decoded.
MAX_PIXELS = 178_956_970

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

#: Largest |strength| a LoRA may be merged with (``LORA:WEIGHT``); real strengths are within ±10.
MAX_LORA_STRENGTH = 1000.0

#: Largest LoRA rank hw factorises to (``--rank``, ``--max-rank``); SDXL's widest layer has 5120 inputs.
MAX_LORA_RANK = 4096
