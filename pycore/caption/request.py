"""What `hw caption` is asked to do: :class:`CaptionRequest`, validated when it is made.

Python callers build one directly (every field has the CLI's default) and pass it to
:func:`pycore.caption.run.caption_manifest`; the CLI only turns options into one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pycore.checks import check_float, check_int
from pycore.errors import HwError
from pycore.limits import MAX_CAPTION_CONCURRENCY

BACKENDS = ("openai", "openclip")
QUALITY_SOURCES = ("model", "aesthetic")


def _paths(v: Any) -> tuple[Path, ...]:
    if v is None:
        return ()
    if isinstance(v, str | os.PathLike):
        return (Path(v),)
    return tuple(Path(x) for x in v)


def _cuts(v: Any, option: str) -> tuple[float, ...] | None:
    """4 increasing numbers from "10,25,75,95" or a sequence."""
    if v is None:
        return None
    if isinstance(v, str):
        try:
            v = [float(x) for x in v.replace(" ", "").split(",") if x]
        except ValueError:
            raise HwError(f"{option} must be 4 comma-separated numbers (got {v!r})") from None
    return tuple(check_float(option, x) for x in v)


@dataclass
class CaptionRequest:
    """Caption the images of ``manifest`` and write ``out`` (see `hw caption --help` for each option)."""

    manifest: Path
    out: Path
    backend: str = "openai"
    # OpenAI-compatible server
    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o"
    api_key: str | None = field(default=None, repr=False)  #: None: read from $``api_key_env``
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    max_attempts: int = 6
    timeout: float = 60.0
    max_side: int = 768
    detail: str = "low"
    temperature: float = 0.2
    max_tokens: int = 400
    prompt_file: Path | None = None
    # caption text
    prefix: str | None = None
    keep_tokens: bool = False
    quality_from: str | None = None  #: model | aesthetic (openclip: always aesthetic)
    quality_percentiles: Any = "10,25,75,95"
    quality_scores: Any = None
    # open_clip models (offline backend, aesthetic scores)
    aesthetic_weights: Path | None = None
    clip_model: str = "ViT-L-14"
    clip_pretrained: str | None = "openai"
    coca_model: str = "coca_ViT-L-14"
    coca_pretrained: str | None = "mscoco_finetuned_laion2b_s13b_b90k"
    tags: Any = ()
    styles: Any = ()
    n_tags: int = 6
    summary_tokens: int = 30
    device: str = "auto"
    batch_size: int = 16
    # the run
    store: Path | None = None  #: default: OUT.captions beside ``out``
    retry_failed: bool = False
    limit: int | None = None
    batch_export: Path | None = None
    batch_import: Any = ()
    sidecar: bool = False
    root: Path | None = None  #: default: the folder `hw bucket` scanned (manifest metadata ``root``)
    metadata: Path | None = None
    threads: int | None = None
    overwrite: bool = False
    ray: str | None = None  #: caption as a Ray Data job at this address (pycore.distributed)
    ray_workers: int | None = None  #: with ray: at most this many concurrent tasks

    def __post_init__(self) -> None:
        from pycore.distributed import address_from

        self.manifest, self.out = Path(self.manifest), Path(self.out)
        self.ray = address_from(self.ray)
        if self.ray_workers is not None:
            check_int("--ray-workers", self.ray_workers, 1, 4096)
        if self.ray and (self.batch_export is not None or self.batch_import):
            raise HwError("--ray captions online; --batch-export/--batch-import run on this machine without it")
        if self.ray and self.api_key is not None and os.environ.get(self.api_key_env) != self.api_key:
            raise HwError(f"with --ray every worker reads the API key from ${self.api_key_env} (it is never sent "
                          "through Ray); set it there instead of passing it")  # fmt: skip
        if self.backend not in BACKENDS:
            raise HwError(f"--backend must be openai or openclip, not {self.backend!r}")
        if self.quality_from is not None and self.quality_from not in QUALITY_SOURCES:
            raise HwError(f"--quality-from must be model or aesthetic, not {self.quality_from!r}")
        if self.backend == "openclip" and self.quality_from == "model":
            raise HwError("--quality-from model needs --backend openai (openclip scores quality with the aesthetic head)")
        self.tags, self.styles, self.batch_import = _paths(self.tags), _paths(self.styles), _paths(self.batch_import)
        if self.batch_export is not None and self.batch_import:
            raise HwError("use --batch-export and --batch-import in separate runs")
        if self.backend == "openclip" and (self.batch_export is not None or self.batch_import):
            raise HwError("--batch-export/--batch-import need --backend openai")
        check_int("--concurrency", self.concurrency, 1, MAX_CAPTION_CONCURRENCY)
        check_int("--max-attempts", self.max_attempts, 1, 100)
        check_float("--timeout", self.timeout, 0.01, 3600.0)
        check_int("--max-side", self.max_side, 0, 16384)
        check_float("--temperature", self.temperature, 0.0, 2.0)
        check_int("--max-tokens", self.max_tokens, 16, 32768)
        check_int("--n-tags", self.n_tags, 1, 64)
        check_int("--summary-tokens", self.summary_tokens, 6, 75)
        check_int("--batch-size", self.batch_size, 1, 4096)
        if self.limit is not None:
            check_int("--limit", self.limit, 0)
        if self.threads is not None:
            check_int("--threads", self.threads, 0)
        self.quality_percentiles = _cuts(self.quality_percentiles, "--quality-percentiles")
        self.quality_scores = _cuts(self.quality_scores, "--quality-scores")
        if self.aesthetic_weights is not None and not Path(self.aesthetic_weights).is_file():
            raise HwError(f"--aesthetic-weights {self.aesthetic_weights} does not exist")
        if self.use_aesthetic:  # the open_clip models run here: a device this machine lacks is an error now
            from pycore.checks import parse_device

            self.device = parse_device(self.device)
        if self.prompt_file is not None and not Path(self.prompt_file).is_file():
            raise HwError(f"--prompt-file {self.prompt_file} does not exist")
        if self.metadata is not None and Path(self.metadata).suffix.lower() not in (".json", ".jsonl"):
            raise HwError(f"--metadata must end in .json or .jsonl (got {Path(self.metadata).name})")

    @property
    def use_aesthetic(self) -> bool:
        """Quality words from the aesthetic scorer (always with openclip)."""
        return self.backend == "openclip" or self.quality_from == "aesthetic"

    @property
    def store_dir(self) -> Path:
        from pycore.caption.store import default_store_dir

        return Path(self.store) if self.store is not None else default_store_dir(self.out)

    def resolved_api_key(self) -> str | None:
        return self.api_key or os.environ.get(self.api_key_env) or None

    def read_prompt(self) -> str | None:
        if self.prompt_file is None:
            return None
        try:
            return Path(self.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise HwError(f"cannot read --prompt-file {self.prompt_file}: {getattr(e, 'strerror', None) or e}") from None
