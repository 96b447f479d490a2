"""Shared fixtures: running the CLI in-process and making small image files."""

from __future__ import annotations

import io
import json
import os

# Any Ray started by a test (and every Ray process it spawns) binds to 127.0.0.1 only: Ray reads
# this when it is imported, so it is set before any test module can import ray.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from cli.app import main

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data_manifests" / "sample"


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)


@pytest.fixture
def hw(capsys):
    """Run `hw ARGS...` in-process; returns exit code, stdout, stderr."""

    def run(*args: object) -> Result:
        code = main([str(a) for a in args])
        cap = capsys.readouterr()
        return Result(code, cap.out, cap.err)

    return run


def image_bytes(fmt: str, size=(64, 48), exif: bytes | None = None, mode: str = "RGB", **kw) -> bytes:
    img = Image.new(mode, size, color=(200, 30, 40) if mode == "RGB" else 128)
    buf = io.BytesIO()
    if exif is not None:
        kw["exif"] = exif
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def exif_orientation(o: int) -> bytes:
    ex = Image.Exif()
    ex[0x0112] = o
    return ex.tobytes()


def png_header(w: int, h: int) -> bytes:
    """A PNG signature plus an IHDR declaring w×h (no pixel data)."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))


# --- helpers for tests of user mistakes (issue 13: one line, right exit code, inputs untouched) ---


def assert_one_line_error(r: Result, code: int = 1, contains: str | None = None) -> str:
    """The run failed with ``code`` and exactly one ``hw: error:`` line, no traceback; returns it."""
    assert r.code == code, f"exit {r.code} (wanted {code}); stderr:\n{r.err}"
    assert "Traceback" not in r.err, r.err
    lines = [ln for ln in r.err.splitlines() if ln.startswith("hw: error:")]
    assert len(lines) == 1, f"wanted one 'hw: error:' line; stderr:\n{r.err}"
    if contains is not None:
        assert contains.lower() in lines[0].lower(), lines[0]
    return lines[0]


def tree_digest(*paths: Path) -> dict[str, str]:
    """sha256 of every file under ``paths`` (files or folders), keyed by path."""
    import hashlib

    out: dict[str, str] = {}
    for p in map(Path, paths):
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else []
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


# --- the test kit (tests/kit) as session fixtures: built once, shared by every test file that needs them ---


@pytest.fixture(scope="session")
def kit_spm(tmp_path_factory) -> Path:
    """A tiny random step-aware preference model saved as an `hw spm-train` folder (tests.kit.clip.save_tiny_spm)."""
    pytest.importorskip("transformers")
    from tests.kit.clip import save_tiny_spm

    d = tmp_path_factory.mktemp("kit_spm")
    save_tiny_spm(d, seed=0)
    return d


@pytest.fixture(scope="session")
def kit_sdxl(tmp_path_factory) -> Path:
    """A tiny SDXL pipeline folder in SDXL's full layout (tests.kit.diffusion.save_tiny_pipeline)."""
    pytest.importorskip("diffusers")
    from tests.kit.diffusion import save_tiny_pipeline

    d = tmp_path_factory.mktemp("kit_sdxl")
    save_tiny_pipeline(d, sdxl=True, full_layout=True)
    return d


@pytest.fixture(scope="session")
def kit_sd15(tmp_path_factory) -> Path:
    """A tiny SD1.5 pipeline folder (tests.kit.diffusion.save_tiny_pipeline)."""
    pytest.importorskip("diffusers")
    from tests.kit.diffusion import save_tiny_pipeline

    d = tmp_path_factory.mktemp("kit_sd15")
    save_tiny_pipeline(d, sdxl=False)
    return d
