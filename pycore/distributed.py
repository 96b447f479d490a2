"""Per-image stages on a Ray cluster (Ray Data), with the same pycore functions as a local run.

Only imported with ``--ray`` (or ``HW_RAY_ADDRESS``); ``ray`` is the optional extra ``hw[ray]``.

How a stage runs: the driver splits the input into *units* (one tar shard, one Parquet table, or
a chunk of files / manifest rows); a Ray Dataset of units is mapped with ``map_batches`` (one
unit per call) by a task that runs the ordinary pycore function on the unit and writes its rows
as a Parquet *part* ``part-<unit>.parquet`` (atomically, under a fixed name) into a folder on
storage the workers share with the driver, returning only a small summary. The driver streams
the summaries (progress), then reads the parts in unit order — so the result is the local run's
rows in the local run's order. A worker that dies mid-unit is retried by Ray Data (its map tasks are retried on system
failures by default; a Python error in the unit is not retried and fails the run with one line);
since a unit's part has one name and is written by rename, a retried unit replaces, never
duplicates, its rows: every row is present exactly once. Global steps (bucket assignment,
exact-duplicate grouping, the near-duplicate search over all hashes) then run on the driver.

Addresses: ``local`` starts a Ray instance on this machine for the run;
``auto`` joins the cluster this machine belongs to; anything else (``ray://head:10001``,
``10.0.0.5:6379``) is passed to ``ray.init(address=…)``. A session already initialised by the
caller (``ray.init`` in a notebook) is used as it is and left running.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pycore.errors import HwError, first_line

if TYPE_CHECKING:
    import polars as pl

ENV = "HW_RAY_ADDRESS"
#: Files per unit when a folder of loose images or a manifest's rows are split for Ray.
CHUNK_ROWS = 4096


def address_from(option: str | None) -> str | None:
    """The Ray address to use: the option, else ``$HW_RAY_ADDRESS``, else None (run locally)."""
    addr = option if option is not None else os.environ.get(ENV) or None
    if addr is not None and not addr.strip():
        raise HwError("--ray needs an address: local, auto, or HOST:PORT / ray://HOST:PORT")
    if addr is not None and addr.startswith("-"):
        raise HwError(f"--ray took {addr!r} as its address; give it one: --ray local, --ray auto or --ray HOST:PORT")
    return addr.strip() if addr else None


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise HwError("--ray needs Ray: pip install 'hw[ray]'") from None
    import logging

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # hw shows its own progress (the units' summaries)
    ctx.print_on_execution_start = False
    for name in ("ray.data", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return ray


@contextlib.contextmanager
def session(address: str, num_cpus: int | None = None) -> Iterator[Any]:
    """A Ray session for the run (see the module docstring for addresses)."""
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address == "local":
        kw["num_cpus"] = num_cpus
    else:
        kw["address"] = address
    try:
        ray.init(**kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise HwError(f"cannot start or reach Ray at {address}: {first_line(e)}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


@dataclass
class UnitResult:
    """What the driver gathers: each unit's rows (in unit order) and each unit's extra report."""

    frames: list[pl.DataFrame]
    extras: list[dict[str, Any]] = field(default_factory=list)

    def frame(self) -> pl.DataFrame:
        import polars as pl

        return pl.concat(self.frames, how="vertical_relaxed") if self.frames else pl.DataFrame()


def _part(folder: str, k: int) -> str:
    return os.path.join(folder, f"part-{k:06d}.parquet")


def _run_batch(batch: dict[str, Any], fn: Callable[[Any], tuple[pl.DataFrame, dict]], folder: str) -> dict[str, list]:
    """The Ray task body: run ``fn`` on each unit, write its part under a fixed name, summarise."""
    out: dict[str, list] = {"k": [], "rows": [], "extra": []}
    for k, unit in zip(list(batch["k"]), list(batch["unit"]), strict=True):
        frame, extra = fn(json.loads(str(unit)))
        fd, tmp = tempfile.mkstemp(prefix=f".part-{int(k):06d}.", suffix=".tmp", dir=folder)
        os.close(fd)
        frame.write_parquet(tmp)
        os.replace(tmp, _part(folder, int(k)))
        out["k"].append(int(k))
        out["rows"].append(frame.height)
        out["extra"].append(json.dumps(extra))
    return out


def run_units(
    fn: Callable[[Any], tuple[pl.DataFrame, dict]],
    units: Sequence[Any],
    *,
    parts_dir: str | os.PathLike[str],
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> UnitResult:
    """Run ``fn(unit) -> (rows, extra)`` for every unit as a Ray Data job (a session must be
    active, see :func:`session`); parts go to ``parts_dir`` (shared storage). ``units`` must be
    JSON-serialisable. Returns the rows in unit order."""
    import polars as pl

    ray = _import_ray()
    if not units:
        return UnitResult([], [])
    folder = os.fspath(parts_dir)
    os.makedirs(folder, exist_ok=True)
    items = [{"k": k, "unit": json.dumps(u)} for k, u in enumerate(units)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    mapped = ds.map_batches(
        _run_batch, fn_kwargs={"fn": fn, "folder": folder}, batch_size=1, batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=workers),
    )  # fmt: skip
    extras: dict[int, dict] = {}
    try:
        with warnings.catch_warnings():  # fewer units than workers is normal for a small job
            warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks", category=UserWarning)
            for row in mapped.iter_rows():
                extras[int(row["k"])] = json.loads(row["extra"])
                if progress:
                    progress(1)
    except Exception as e:  # Ray wraps worker errors in its own types; one line with the cause
        cause = getattr(e, "cause", None) or e
        if isinstance(cause, HwError):
            raise HwError(str(cause)) from None
        raise HwError(f"the Ray job failed: {type(cause).__name__}: {first_line(cause)}") from None
    lost = [k for k in range(len(units)) if k not in extras or not os.path.exists(_part(folder, k))]
    if lost:
        raise HwError(f"the Ray job finished without {len(lost)} of {len(units)} unit(s) (first: {units[lost[0]]})")
    frames = [pl.read_parquet(_part(folder, k)) for k in range(len(units))]
    return UnitResult(frames, [extras[k] for k in range(len(units))])


#: Where workers write their parts: ``$HW_RAY_PARTS``, else the current folder. On a cluster of
#: several machines this must be storage every node and the driver share (as the inputs are).
PARTS_ENV = "HW_RAY_PARTS"


@contextlib.contextmanager
def parts_folder(near: str | os.PathLike[str] | None = None) -> Iterator[str]:
    """A scratch folder for workers' parts in ``near`` (default ``$HW_RAY_PARTS`` or the current
    folder); removed afterwards."""
    base = Path(near or os.environ.get(PARTS_ENV) or os.getcwd())
    if not base.is_dir() or not os.access(base, os.W_OK):
        raise HwError(f"cannot write Ray parts in {base}; set {PARTS_ENV} to a shared writable folder")
    d = tempfile.mkdtemp(prefix=".hw-ray-parts.", dir=base)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---- stages ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScanUnit:
    """The scan of one unit: a shard, a table or a chunk of files (plain data, pickled to workers)."""

    hash: bool
    max_pixels: int
    threads: int
    sidecars: bool = False
    image_column: str | None = None
    caption_column: str | None = None

    def __call__(self, unit: dict[str, Any]) -> tuple[pl.DataFrame, dict]:
        from pycore.curation.scan import scan_paths
        from pycore.curation.scan_sources import scan_shards, scan_tables

        kind = unit["kind"]
        if kind == "shard":
            r = scan_shards([unit["path"]], hash=self.hash, max_pixels=self.max_pixels, threads=self.threads,
                            sidecars=self.sidecars)  # fmt: skip
            return r.frame, {"skipped": r.skipped, "problems": r.problems}
        if kind == "table":
            assert self.image_column is not None
            r = scan_tables([unit["path"]], self.image_column, hash=self.hash, max_pixels=self.max_pixels,
                            threads=self.threads, caption_column=self.caption_column)  # fmt: skip
            return r.frame, {}
        paths = [os.fsdecode(os.fsencode(p)) for p in unit["paths"]]
        return scan_paths(paths, hash=self.hash, max_pixels=self.max_pixels, threads=self.threads), {}


def scan_units(units: list[dict[str, Any]], scan: ScanUnit, *, address: str, near: str | os.PathLike[str] | None = None,
               workers: int | None = None, progress: Callable[[int], None] | None = None,
               ) -> tuple[pl.DataFrame, dict[str, int], list[tuple[str, str]]]:  # fmt: skip
    """Scan units on Ray: (frame in unit order, skipped counts, problems), as the local scan gives."""
    import polars as pl

    with session(address, num_cpus=workers), parts_folder(near) as d:
        res = run_units(scan, units, parts_dir=d, workers=workers, progress=progress)
    skipped: dict[str, int] = {}
    problems: list[tuple[str, str]] = []
    for e in res.extras:
        for k, v in e.get("skipped", {}).items():
            skipped[k] = skipped.get(k, 0) + v
        problems += [tuple(p) for p in e.get("problems", [])]  # type: ignore[misc]
    frame = res.frame()
    if "path_bytes" in frame.columns:
        frame = frame.with_columns(pl.col("path_bytes").cast(pl.Binary))
    return frame, skipped, problems


@dataclass(frozen=True)
class HashUnit:
    """dedup's perceptual hashes of a chunk of references (``pycore.sources.perceptual_hashes``)."""

    fast_min_side: int | None
    threads: int
    stats: bool = False

    def __call__(self, unit: dict[str, Any]) -> tuple[pl.DataFrame, dict]:
        import polars as pl

        from pycore.sources import perceptual_hashes

        r = perceptual_hashes(unit["refs"], self.fast_min_side, self.threads, stats=self.stats)
        cols = {k: pl.Series(k, v, dtype=pl.String) if isinstance(v, list) else pl.Series(k, v) for k, v in r.items()}
        return pl.DataFrame(list(cols.values())), {}


def perceptual_hashes(refs: Sequence[str], fast_min_side: int | None, threads: int, stats: bool = False, *, address: str,
                      near: str | os.PathLike[str] | None = None, workers: int | None = None,
                      progress: Callable[[int], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """:func:`pycore.sources.perceptual_hashes` over Ray: the same columns, in input order."""
    import polars as pl

    chunks = [list(refs[i : i + CHUNK_ROWS]) for i in range(0, len(refs), CHUNK_ROWS)]
    sizes = [len(c) for c in chunks]

    def step(n: int) -> None:
        if progress:
            progress(sizes[min(len(sizes) - 1, step.done)])  # type: ignore[attr-defined]
        step.done += 1  # type: ignore[attr-defined]

    step.done = 0  # type: ignore[attr-defined]
    with session(address, num_cpus=workers), parts_folder(near) as d:
        res = run_units(HashUnit(fast_min_side, threads, stats), [{"refs": c} for c in chunks], parts_dir=d,
                        workers=workers, progress=step)  # fmt: skip
    f = res.frame()
    if f.height != len(refs):
        raise HwError(f"the Ray job returned {f.height} hashes for {len(refs)} images")
    return {c: (f[c].to_list() if f[c].dtype == pl.String else f[c].to_numpy()) for c in f.columns}


#: Models loaded by this worker process, so a process that runs many units loads each once.
_MODELS: dict[tuple, Any] = {}


@dataclass(frozen=True)
class ScoreUnit:
    """``hw spm-score`` of a chunk of (reference, prompt) rows (``pycore.spo.spm_data.score_files``)."""

    model: str
    base: str | None
    processor: str | None
    dtype: str
    device: str
    timestep: int
    batch_size: int

    def load(self) -> Any:
        key = (self.model, self.base, self.processor, self.dtype, self.device)
        if key not in _MODELS:
            from pycore.checks import parse_dtype
            from pycore.spm.checkpoints import load_spm

            spm = load_spm(self.model, base=self.base, processor=self.processor, dtype=parse_dtype(self.dtype),
                           device=self.device)  # fmt: skip
            spm.requires_grad_(False)
            _MODELS.clear()
            _MODELS[key] = spm
        return _MODELS[key]

    def __call__(self, unit: dict[str, Any]) -> tuple[pl.DataFrame, dict]:
        import polars as pl

        from pycore.spm.score import score_files

        s, e = score_files(self.load(), unit["refs"], unit["prompts"], timestep=self.timestep, batch_size=self.batch_size)
        return pl.DataFrame({"score": pl.Series(s, dtype=pl.Float64), "error": pl.Series(e, dtype=pl.String)}), {}


def score(refs: Sequence[str], prompts: Sequence[str | None], unit: ScoreUnit, *, address: str,
          workers: int | None = None, near: str | os.PathLike[str] | None = None,
          progress: Callable[[int], None] | None = None, chunk: int = 512) -> tuple[list[float | None], list[str | None]]:  # fmt: skip
    """``score_files`` over Ray: (scores, errors) in input order. The model is loaded once per worker process."""
    units = [{"refs": list(refs[i : i + chunk]), "prompts": list(prompts[i : i + chunk])} for i in range(0, len(refs), chunk)]
    done = iter([min(chunk, len(refs) - i) for i in range(0, len(refs), chunk)])

    def step(_: int) -> None:
        if progress:
            progress(next(done, 0))

    with session(address, num_cpus=workers), parts_folder(near) as d:
        res = run_units(unit, units, parts_dir=d, workers=workers, progress=step)
    f = res.frame()
    if f.height != len(refs):
        raise HwError(f"the Ray job returned {f.height} scores for {len(refs)} images")
    return f["score"].to_list(), f["error"].to_list()


# ---- captioning --------------------------------------------------------------------------------

#: Images per captioning unit: small enough that a retried unit re-reads little, large enough
#: that a unit keeps a server's concurrency busy.
CAPTION_CHUNK = 256


@dataclass(frozen=True)
class CaptionUnit:
    """``hw caption`` of a chunk of (content hash, image reference) items on a worker.

    Results go straight into the caption store (``pycore.caption.store``) as the local run writes
    them — one fsync'd JSON line per answer, in shard files tagged with the unit — so nothing a
    worker finished is lost when it or the driver is killed; a retried unit first reads back its
    own tagged shards and asks only for what is missing. The API key is never part of the unit
    (nor of anything Ray stores or logs): the worker reads it from its own environment variable
    ``api_key_env``, inherited from the process that started Ray (``--ray local``) or set on
    each node when the node was started (a cluster)."""

    backend: str  #: openai or openclip
    config: Any  #: OpenAIConfig / OpenClipConfig (plain settings, no secrets)
    job: str
    store_dir: str
    api_key_env: str = "OPENAI_API_KEY"

    def __call__(self, unit: dict[str, Any]) -> tuple[pl.DataFrame, dict]:
        import polars as pl

        from pycore.caption.store import ResultStore

        store = ResultStore(self.store_dir, self.job, tag=f"u{int(unit['k']):06d}")
        done = store.load_tagged()
        items = [(k, p) for k, p in unit["items"] if k not in done]
        pending: dict[str, str] = {}
        counts = {"ok": 0, "failed": 0, "resumed": len(unit["items"]) - len(items)}

        def keep(recs: list[dict[str, Any]]) -> None:
            stored = [r for r in recs if r["status"] != "pending"]
            pending.update((r["key"], r["error"]) for r in recs if r["status"] == "pending")
            store.append_many(stored)
            for r in stored:
                counts[r["status"]] += 1

        stats: dict[str, Any] = {}
        with store, _stop_when_orphaned():
            if items and self.backend == "openai":
                from pycore.caption.openai_backend import OpenAICaptioner

                key = os.environ.get(self.api_key_env) or None
                stats = OpenAICaptioner(self.config, key, job=self.job).run(items, lambda r: keep([r])).to_dict()
            elif items:
                stats = _openclip_captioner(self.config, self.job).run(items, keep) or {}
        frame = pl.DataFrame({"key": list(pending), "error": list(pending.values())}, schema={"key": pl.String, "error": pl.String})
        return frame, {**counts, "stats": stats}


@contextlib.contextmanager
def _stop_when_orphaned(every: float = 0.1) -> Iterator[None]:
    """While a captioning unit runs, end this worker process at once if the process that started
    it (the raylet) is gone — a Ray started by a driver that was killed. Everything answered so
    far is already fsync'd in the store; an orphaned worker must not go on paying for requests
    that the next run asks for again."""
    import threading

    parent = os.getppid()
    done = threading.Event()

    def watch() -> None:
        while not done.wait(every):
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="hw-orphan-watch", daemon=True).start()
    try:
        yield
    finally:
        done.set()


def _openclip_captioner(cfg: Any, job: str) -> Any:
    """One open_clip captioner per worker process (the models load once)."""
    key = ("openclip", job)
    if key not in _MODELS:
        from pycore.caption.openclip_backend import OpenClipCaptioner

        _MODELS.clear()
        _MODELS[key] = OpenClipCaptioner(cfg, job=job)
    return _MODELS[key]


@dataclass
class CaptionRun:
    """What the driver gathers from a captioning job."""

    captioned: int = 0
    failed: int = 0
    resumed: int = 0  #: items a retried unit found already done in its own shards
    pending: dict[str, str] = field(default_factory=dict)  #: key → transport error (not stored)
    stats: list[dict[str, Any]] = field(default_factory=list)


def caption(items: Sequence[tuple[str, str]], unit: CaptionUnit, *, address: str, workers: int | None = None,
            near: str | os.PathLike[str] | None = None, progress: Callable[[int], None] | None = None,
            chunk: int = CAPTION_CHUNK) -> CaptionRun:  # fmt: skip
    """Caption ``items`` (content hash, reference) as a Ray Data job, one unit per ``chunk``."""
    units = [{"k": k, "items": [list(x) for x in items[i : i + chunk]]} for k, i in enumerate(range(0, len(items), chunk))]
    sizes = [len(u["items"]) for u in units]
    done = iter(sizes)

    def step(_: int) -> None:
        if progress:
            progress(next(done, 0))

    with session(address, num_cpus=workers), parts_folder(near) as d:
        res = run_units(unit, units, parts_dir=d, workers=workers, progress=step)
    out = CaptionRun()
    for e in res.extras:
        out.captioned += e["ok"]
        out.failed += e["failed"]
        out.resumed += e["resumed"]
        out.stats.append(e["stats"])
    f = res.frame()
    if f.height:
        out.pending = dict(zip(f["key"].to_list(), f["error"].to_list(), strict=True))
    return out
