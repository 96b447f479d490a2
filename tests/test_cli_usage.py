"""Usage errors (issue 13): a value of the wrong type, a missing required option or argument, an
unknown option, a bad choice — for every command one line ``hw: error: <option>: <what is wrong>
(see hw CMD --help)``, exit code 2, no usage box, no traceback, and nothing touched."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli.app import COMMANDS
from tests.conftest import REPO

# Each command with the arguments it needs to get past parsing (paths need not exist: parsing
# fails before any file is looked at).
NEEDS = {
    "bucket": ["imgs", "-o", "m.parquet"],
    "dedup": ["m.parquet", "-o", "d.parquet"],
    "caption": ["m.parquet", "-o", "c.parquet"],
    "spm-score": ["m.parquet", "-o", "s.parquet"],
    "spm-train": ["pairs.csv", "--base-model", "base", "-o", "spm"],
    "spo-train": ["--base", "base", "--spm", "spm", "--prompts", "p.txt", "--out", "run"],
    "spo-sample": ["--base", "base", "--prompts", "p.txt", "--out", "samples"],
    "merge-lora": ["base.safetensors", "a.safetensors", "-o", "merged.safetensors"],
    "extract-lora": ["tuned.safetensors", "base.safetensors", "-o", "lora.safetensors"],
    "convert-lora": ["lora.safetensors", "-o", "out.safetensors"],
    "lora-info": ["lora.safetensors"],
}

# (command, extra arguments, the option named in the message, what the message says)
WRONG_VALUES = [
    ("bucket", ["--threads", "abc"], "--threads", "expected a whole number, got 'abc'"),
    ("bucket", ["--max-area", "1.5"], "--max-area", "expected a whole number, got '1.5'"),
    ("bucket", ["--max-crop", "lots"], "--max-crop", "expected a number, got 'lots'"),
    ("bucket", ["--threads", "-2"], "--threads", "must be ≥ 0, got '-2'"),
    ("dedup", ["--threshold", "x"], "--threshold", "expected a whole number, got 'x'"),
    ("dedup", ["--clip-threshold", "high"], "--clip-threshold", "expected a number, got 'high'"),
    ("caption", ["--backend", "zzz"], "--backend", "'zzz' is not one of 'openai', 'openclip'"),
    ("caption", ["--concurrency", "many"], "--concurrency", "expected a whole number, got 'many'"),
    ("spm-score", ["--timestep", "late"], "--timestep", "expected a whole number, got 'late'"),
    ("spm-train", ["--resolution", "1024px"], "--resolution", "expected a whole number, got '1024px'"),
    ("spm-train", ["--cfg-scale", "strong"], "--cfg-scale", "expected a number, got 'strong'"),
    ("spo-train", ["--epochs", "0"], "--epochs", "must be ≥ 1, got '0'"),
    ("spo-train", ["--learning-rate", "fast"], "--learning-rate", "expected a number, got 'fast'"),
    ("spo-sample", ["--steps", "twenty"], "--steps", "expected a whole number, got 'twenty'"),
    ("spo-sample", ["--eta", "2"], "--eta", "must be ≤ 1.0, got '2'"),
    ("merge-lora", ["--rank", "r8"], "--rank", "expected a whole number, got 'r8'"),
    ("extract-lora", ["--energy", "most"], "--energy", "expected a number, got 'most'"),
    ("convert-lora", ["--max-rank", "1e3"], "--max-rank", "expected a whole number, got '1e3'"),
    ("lora-info", ["--json=yes"], "--json", "does not take a value"),
    ("bucket", ["--no-upscale=3"], "--no-upscale", "does not take a value"),
    ("bucket", ["--threads"], "--threads", "needs a value"),
]

# (command, arguments without the required one, the option or argument named)
MISSING = [
    ("bucket", ["imgs"], "--out"),
    ("bucket", ["-o", "m.parquet"], "SRC"),
    ("dedup", ["m.parquet"], "--out"),
    ("caption", ["m.parquet"], "--out"),
    ("spm-score", ["m.parquet"], "--out"),
    ("spm-train", ["pairs.csv", "-o", "spm"], "--base-model"),
    ("spo-train", ["--base", "base", "--out", "run"], "--spm, --prompts"),
    ("spo-sample", ["--base", "base", "--out", "samples"], "--prompts"),
    ("merge-lora", ["base.safetensors", "a.safetensors"], "--out"),
    ("extract-lora", ["tuned.safetensors", "-o", "l.safetensors"], "BASE"),
    ("convert-lora", ["lora.safetensors"], "--out"),
    ("lora-info", ["--json"], "PATH"),
]


def _check(r, name: str | None, text: str, command: str | None) -> str:
    """Exit 2, stderr is exactly one `hw: error:` line naming ``name`` and pointing at the help."""
    assert r.code == 2, f"exit {r.code}; stderr:\n{r.err}"
    lines = r.err.splitlines()
    assert len(lines) == 1, f"wanted one line; stderr:\n{r.err}"
    line = lines[0]
    assert line.startswith(f"hw: error: {name}: " if name else "hw: error: "), line
    assert text in line, line
    assert line.endswith(f"(see hw{' ' + command if command else ''} --help)"), line
    assert not any(c in r.err for c in "╭╰│") and "Usage:" not in r.err and "Traceback" not in r.err
    assert r.out == ""
    return line


def test_every_command_is_covered():
    assert {c for c, *_ in WRONG_VALUES} == set(COMMANDS) == {c for c, *_ in MISSING} == set(NEEDS)


@pytest.mark.parametrize(("command", "args", "name", "text"), WRONG_VALUES, ids=[f"{c} {' '.join(a)}" for c, a, *_ in WRONG_VALUES])
def test_wrong_value_is_one_usage_line(hw, tmp_path, monkeypatch, command, args, name, text):
    monkeypatch.chdir(tmp_path)
    _check(hw(command, *NEEDS[command], *args), name, text, command)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("command", "args", "name"), MISSING, ids=[f"{c} without {n}" for c, _, n in MISSING])
def test_missing_required_is_one_usage_line(hw, tmp_path, monkeypatch, command, args, name):
    monkeypatch.chdir(tmp_path)
    _check(hw(command, *args), name, "required, not given", command)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", list(COMMANDS))
def test_unknown_option_is_one_usage_line(hw, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    _check(hw(command, *NEEDS[command], "--no-such-option"), "--no-such-option", "no such option", command)
    assert list(tmp_path.iterdir()) == []


def test_near_miss_option_suggests_the_real_one(hw):
    line = _check(hw("bucket", "imgs", "-o", "m.parquet", "--thread", "2"), "--thread", "no such option", "bucket")
    assert "did you mean" in line and "--threads" in line


@pytest.mark.parametrize(
    ("args", "text", "command"),
    [
        (["nosuch"], "no such command 'nosuch'", None),
        (["--bogus"], "no such option", None),
        (["bucket", "imgs", "-o", "m.parquet", "extra"], "unexpected extra argument", "bucket"),
    ],
)
def test_other_usage_errors(hw, args, text, command):
    _check(hw(*args), args[0] if args[0].startswith("--") else None, text, command)


def test_help_and_version_still_exit_0(hw):
    r = hw("--version")
    assert r.code == 0 and r.out.startswith("hw ")
    r = hw("bucket", "--help")
    assert r.code == 0 and "Example:" in r.out and r.err == ""


def _hw_script() -> list[str]:
    script = Path(sys.executable).with_name("hw")
    if not script.exists():
        pytest.skip("the `hw` console script is not installed next to this Python")
    return [str(script)]


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["bucket", "imgs", "--threads", "abc", "-o", "m.parquet"],
         "hw: error: --threads: expected a whole number, got 'abc' (see hw bucket --help)"),
        (["dedup", "m.parquet"], "hw: error: --out: required, not given (see hw dedup --help)"),
        (["caption", "m.parquet", "-o", "c.parquet", "--backend", "gpt"],
         "hw: error: --backend: 'gpt' is not one of 'openai', 'openclip' (see hw caption --help)"),
        (["merge-lora", "a", "b", "-o", "c", "--wat"], "hw: error: --wat: no such option (see hw merge-lora --help)"),
    ],
)  # fmt: skip
def test_real_entry_point(tmp_path, args, line):
    """Through the installed `hw` script in a fresh process: the exact line on stderr, exit 2."""
    p = subprocess.run([*_hw_script(), *args], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "COLUMNS": "80"})  # fmt: skip
    assert (p.returncode, p.stderr, p.stdout) == (2, line + "\n", "")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_shape(hw, command):
    """Every command's help: an example line, options grouped in panels, arguments in capitals in the
    usage line (no `{src}`), no `<bool>` next to flags."""
    r = hw(command, "--help")
    assert r.code == 0, r.err
    usage = next(ln for ln in r.out.splitlines() if "Usage:" in ln)
    assert "{" not in usage and "}" not in usage, usage
    args = usage.split("[OPTIONS]", 1)[1].split()
    assert all(a.rstrip(".").isupper() for a in args), usage
    assert "Example: hw " + command in " ".join(r.out.split()), r.out[:2000]
    assert "<bool>" not in r.out
    panels = [ln for ln in r.out.splitlines() if ln.startswith("╭─ ") and "Arguments" not in ln]
    assert len(panels) >= 2 or command == "lora-info", panels


def test_interrupt_in_process_is_one_line_and_leaves_signals_alone(hw, monkeypatch, tmp_path):
    """main() as a library call: KeyboardInterrupt → `hw: interrupted`, 130; the caller's SIGINT handler is kept."""
    import signal

    import pycore.curation.bucket as bucket_mod

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(bucket_mod, "bucket", interrupted)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    before = signal.getsignal(signal.SIGINT)
    r = hw("bucket", "imgs", "-o", "m.parquet")
    assert (r.code, r.err, r.out) == (130, "hw: interrupted\n", "")
    assert signal.getsignal(signal.SIGINT) is before


def test_closed_stdout_exits_1_without_a_traceback(tmp_path):
    """`hw … | head -c1`: the reader goes away; hw stops quietly (exit 1, no BrokenPipeError traceback)."""
    src = tmp_path / "imgs"
    src.mkdir()
    (src / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # a row (truncated), so there is a report to print
    r, w = os.pipe()
    os.close(r)  # nobody reads: the first write of the --json report fails with EPIPE
    p = subprocess.run([sys.executable, "-m", "cli.app", "bucket", str(src), "-o", str(tmp_path / "m.parquet"), "--json"],
                       cwd=REPO, stdout=w, stderr=subprocess.PIPE, text=True, timeout=300)  # fmt: skip
    os.close(w)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr
