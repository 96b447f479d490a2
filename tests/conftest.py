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


# --- Ctrl-C while a command works: the interrupt lands after the first progress update ---


@dataclass
class Interrupted:
    code: int
    lines: list[str]  # stderr (a terminal) as lines, progress-bar escapes removed
    progress: tuple[int, int]  # the bar's "done/total" when SIGINT was sent


def interrupt_after_progress(args: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> Interrupted:
    """Run `hw ARGS` with stderr on a pseudo-terminal (so the progress bar is drawn), wait until
    the bar shows some items done of more, then send SIGINT and collect what follows.

    No timing assumption: the signal goes out once work is under way (the bar advanced), and
    the caller makes the rest of the work long (several more progress steps)."""
    import os
    import pty
    import re
    import select
    import signal
    import subprocess
    import sys
    import time

    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "cli.app", *args], cwd=REPO, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=slave, env={**os.environ, "COLUMNS": "120", **(env or {})})  # fmt: skip
    os.close(slave)
    buf, seen, deadline = b"", None, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1.0)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    chunk = b""
                if not chunk:
                    break
                buf += chunk
                if seen is None:
                    counts = [(int(a), int(b)) for a, b in re.findall(rb"(\d+)/(\d+)", buf.replace(b",", b""))]
                    seen = next((c for c in counts if 0 < c[0] < c[1]), None)
                    if seen is not None:
                        p.send_signal(signal.SIGINT)
            elif p.poll() is not None:
                break
        p.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
    assert seen is not None, f"no progress before the end (exit {p.returncode}):\n{buf.decode(errors='replace')[-3000:]}"
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.decode(errors="replace"))
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", text) if ln.strip()]
    return Interrupted(p.returncode, lines, seen)


def assert_interrupted(r: Interrupted) -> None:
    """Exit 130 and exactly one `hw: …` line, `hw: interrupted`; no traceback, panic or 'Aborted!'."""
    said = [ln for ln in r.lines if ln.startswith("hw:") or "Traceback" in ln or "Panic" in ln or "Aborted" in ln or "Error" in ln]
    assert (r.code, said) == (130, ["hw: interrupted"]), "\n".join(r.lines[-40:])


# --- file permissions as an ordinary user sees them, also when the tests run as root (CI) ---


def unprivileged() -> list[str]:
    """A command prefix that runs a program without the power to ignore file permissions.

    As root: `setpriv` (util-linux, an essential Debian package) clears every capability
    (bounding, inheritable, hence permitted and effective), so CAP_DAC_OVERRIDE & co. are gone and
    mode bits apply as to any user; the uid stays 0 so the program can still read the shared venv
    and the test's files (both in root-only folders). As another user: nothing to do."""
    import os
    import shutil

    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.fail("running as root: setpriv (Debian package util-linux) is needed to test file permissions")
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]


@pytest.fixture
def hw_unprivileged():
    """Run `hw ARGS...` in a subprocess without root's power over permissions (see unprivileged())."""
    import subprocess
    import sys

    def run(*args: object, timeout: float = 600) -> Result:
        p = subprocess.run([*unprivileged(), sys.executable, "-m", "cli.app", *map(str, args)], cwd=REPO,
                           capture_output=True, text=True, timeout=timeout)  # fmt: skip
        return Result(p.returncode, p.stdout, p.stderr)

    return run
