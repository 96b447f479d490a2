"""Manifests as a folder of Parquet parts: ``manifest/part-00000.parquet``, ``part-00001.parquet``, …

One table split by rows, every part with the same schema and the same ``hw.*`` footer metadata
(plus ``hw.part`` = "i/n"), so Polars (``pl.scan_parquet("manifest/*.parquet")`` or the folder),
DuckDB (``read_parquet('manifest/*.parquet')``) and pyarrow (``pq.read_table("manifest")``) read
the folder as one table in row order. :func:`pycore.manifest.read_manifest` reads a folder like a
file; :func:`pycore.manifest.write_manifest` writes one when the output path ends with ``/``,
is an existing folder or has no suffix. The folder is written atomically (built beside, then renamed).
:func:`iter_parts` streams a folder part by part for work that does not need every row at once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pycore.errors import ManifestError
from pycore.io import atomic_dir

if TYPE_CHECKING:
    import polars as pl

#: Rows per part when writing a folder (about 100-300 MB of manifest for hw's columns).
PART_ROWS = 1_000_000
PART_GLOB = "part-*.parquet"


def wants_parts(path: str | os.PathLike[str]) -> bool:
    """An output path names a folder of parts: it ends with a separator, has no suffix at all
    (``--out manifest`` → ``manifest/part-*.parquet``; ``--out m.parquet`` → one file), or is an
    existing manifest folder. Any other existing folder is never taken for one (it is the user's:
    writing there is refused as for a file output)."""
    s = os.fspath(path)
    if os.path.isdir(s):
        return is_manifest_folder(s)
    return s.endswith(("/", os.sep)) or Path(s).suffix == ""


def check_manifest_out(out: str | os.PathLike[str], *, inputs=(), overwrite: bool = False,
                       option: str = "--out") -> str:  # fmt: skip
    """:func:`pycore.checks.check_output` for a manifest output: a folder of parts when
    :func:`wants_parts` says so (returned with a trailing ``/`` so it stays one), else one file."""
    from pycore.checks import check_output

    folder = wants_parts(out)
    got = check_output(out, inputs=inputs, overwrite=overwrite, folder=folder, option=option)
    assert got is not None
    return os.fspath(got) + "/" if folder else os.fspath(got)


def is_manifest_folder(path: str | os.PathLike[str]) -> bool:
    """A folder whose first Parquet part carries hw's schema version (a folder of parts)."""
    import polars as pl

    if not os.path.isdir(path):
        return False
    try:
        f = part_files(path)[0]
        return "hw.schema_version" in pl.read_parquet_metadata(f)
    except (ManifestError, pl.exceptions.PolarsError, OSError):
        return False


def part_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The parts of a manifest folder, in order; an error when there are none."""
    p = Path(folder)
    files = sorted(q for q in p.glob("*.parquet") if not q.name.startswith((".", "_")))
    if not files:
        raise ManifestError(f"manifest folder {p} holds no .parquet parts")
    return files


def read_parts(folder: str | os.PathLike[str]) -> pl.DataFrame:
    """All parts as one frame (row order: part order, then rows)."""
    import polars as pl

    files = part_files(folder)
    try:
        return pl.concat([pl.read_parquet(f) for f in files], how="vertical_relaxed")
    except (pl.exceptions.PolarsError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ManifestError(f"cannot read manifest folder {folder}: {first}") from None


def iter_parts(folder: str | os.PathLike[str]) -> Iterator[tuple[Path, pl.DataFrame]]:
    """(part file, its rows) one part at a time: memory bounded by the largest part."""
    import polars as pl

    for f in part_files(folder):
        try:
            yield f, pl.read_parquet(f)
        except (pl.exceptions.PolarsError, OSError) as e:
            raise ManifestError(f"cannot read manifest part {f}: {str(e).strip().splitlines()[0]}") from None


def first_part(folder: str | os.PathLike[str]) -> Path:
    return part_files(folder)[0]


def part_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


class PartsWriter:
    """Write a folder of parts one part at a time (streaming commands): the folder is built beside
    the target and renamed into place by :meth:`close` (nothing is left on an error)::

        with PartsWriter("out/", n_parts, overwrite=False) as w:
            for m in Manifest.parts("in/"):
                w.write(m.derive(work(m.frame), "command", updates))
    """

    def __init__(self, folder: str | os.PathLike[str], n_parts: int | None, *, overwrite: bool = False) -> None:
        """``n_parts`` None when not known in advance (``hw.part`` is then just the part's number)."""
        self.target = Path(os.fspath(folder).rstrip("/" + os.sep) or ".")
        if self.target.exists() and not self.target.is_dir():
            raise ManifestError(f"{self.target} is a file; a folder of manifest parts cannot replace it")
        self.n, self.i, self.overwrite = n_parts, 0, overwrite
        self._cm = atomic_dir(self.target, overwrite=overwrite)

    def __enter__(self) -> PartsWriter:
        self.tmp = self._cm.__enter__()
        return self

    def write(self, manifest) -> None:  # noqa: ANN001 (pycore.manifest.Manifest; imported lazily)
        from pycore.manifest import prepare_write

        frame, meta = prepare_write(manifest.frame, manifest.meta)
        part = f"{self.i + 1}/{self.n}" if self.n else str(self.i + 1)
        frame.write_parquet(self.tmp / part_name(self.i), metadata={**meta, "hw.part": part})
        self.i += 1

    def __exit__(self, *exc) -> bool | None:  # noqa: ANN002
        return self._cm.__exit__(*exc)


def write_parts(frame: pl.DataFrame, folder: str | os.PathLike[str], meta: dict[str, str], *,
                overwrite: bool = False, part_rows: int | None = None) -> list[Path]:  # fmt: skip
    """Write ``frame`` as a folder of parts of ``part_rows`` rows (:data:`PART_ROWS` by default;
    at least one part)."""
    part_rows = PART_ROWS if part_rows is None else part_rows
    if part_rows < 1:
        raise ManifestError("part_rows must be 1 or more")
    target = Path(os.fspath(folder).rstrip("/" + os.sep) or ".")
    if target.exists() and not target.is_dir():
        raise ManifestError(f"{target} is a file; a folder of manifest parts cannot replace it")
    n = max(1, -(-frame.height // part_rows))
    with atomic_dir(target, overwrite=overwrite) as tmp:
        for i in range(n):
            part = frame.slice(i * part_rows, part_rows)
            part.write_parquet(tmp / part_name(i), metadata={**meta, "hw.part": f"{i + 1}/{n}"})
    return [target / part_name(i) for i in range(n)]
