"""Outputs into a folder the user cannot write (issue 13): every command and every output option
stops before any work with one line naming the option, exit 1, inputs untouched, nothing written.

These run as an ordinary user would — also under root (CI), by dropping every capability with
setpriv in the subprocess (tests/conftest.py: unprivileged), so a read-only folder is read-only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import REPO, assert_one_line_error, tree_digest, unprivileged


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A small image folder, its manifest, a prompts file, a pairs table and (empty) LoRA files."""
    from cli.app import main

    d = tmp_path_factory.mktemp("perm_inputs")
    (d / "imgs").mkdir()
    for i, colour in enumerate(((200, 30, 40), (20, 180, 60), (200, 30, 41))):
        Image.new("RGB", (96, 64), colour).save(d / "imgs" / f"{i}.png")
    assert main(["bucket", str(d / "imgs"), "--out", str(d / "m.parquet")]) == 0
    (d / "prompts.txt").write_text("a cat\na dog\n", encoding="utf-8")
    (d / "pairs.csv").write_text(f"prompt,image_a,image_b,preferred\na cat,{d}/imgs/0.png,{d}/imgs/1.png,a\n", encoding="utf-8")
    for name in ("a", "b"):
        (d / f"{name}.safetensors").write_bytes(b"")
    return d


@pytest.fixture
def ro(tmp_path) -> Path:
    """A folder nobody may write into (mode 0500), removed after the test."""
    f = tmp_path / "ro"
    f.mkdir()
    f.chmod(0o500)
    yield f
    f.chmod(0o700)


# (command and arguments with {i} = the inputs folder and {ro} = the read-only folder, text in the line)
CASES = [
    ("bucket {i}/imgs --out {ro}/m.parquet", "--out"),
    ("bucket {i}/imgs --out {i}/../x.parquet --export-kohya {ro}/k.json", "--export-kohya"),
    ("bucket {i}/imgs --out {i}/../x.parquet --plot {ro}/hist.png", "--plot"),
    ("dedup {i}/m.parquet --out {ro}/d.parquet", "--out"),
    ("dedup {i}/m.parquet --out {i}/../x.parquet --review {ro}/r.html", "--review"),
    ("dedup {i}/m.parquet --out {i}/../x.parquet --plot {ro}/q.svg", "--plot"),
    ("dedup {i}/m.parquet --out {i}/../x.parquet --apply move:{ro}/dups", "--apply"),
    ("caption {i}/m.parquet --out {ro}/c.parquet --base-url http://127.0.0.1:9/v1", "not a writable folder"),
    ("caption {i}/m.parquet --out {i}/../x.parquet --metadata {ro}/meta.jsonl --base-url http://127.0.0.1:9/v1", "--metadata"),
    ("spm-score {i}/m.parquet --out {ro}/s.parquet --prompt cat", "--out"),
    ("spm-train {i}/pairs.csv --base-model base --out {ro}/spm", "--out"),
    ("spo-train --base {sdxl} --spm spm --prompts {i}/prompts.txt --out {ro}/run", "--out"),
    ("spo-sample --base {sdxl} --prompts {i}/prompts.txt --out {ro}/samples", "--out"),
    ("merge-lora {i}/a.safetensors {i}/b.safetensors --out {ro}/m.safetensors", "--out"),
    ("extract-lora {i}/a.safetensors {i}/b.safetensors --rank 4 --out {ro}/l.safetensors", "--out"),
    ("convert-lora {i}/a.safetensors --out {ro}/c.safetensors", "--out"),
]


@pytest.mark.parametrize(("args", "text"), CASES, ids=[c[0].split(" --out")[0].replace("{i}/", "") + " " + c[1] for c in CASES])
def test_output_into_an_unwritable_folder(hw_unprivileged, inputs, ro, request, args, text):
    sdxl = request.getfixturevalue("kit_sdxl") if "{sdxl}" in args else None
    before = tree_digest(inputs, *([sdxl] if sdxl else []))
    argv = [a.format(i=inputs, ro=ro, sdxl=sdxl) for a in args.split()]
    r = hw_unprivileged(*argv)
    line = assert_one_line_error(r, 1, text)
    assert "writ" in line or "permission denied" in line, line
    assert list(ro.iterdir()) == []
    assert tree_digest(inputs, *([sdxl] if sdxl else [])) == before
    assert not (inputs.parent / "x.parquet").exists()


def test_the_folder_really_is_read_only_for_the_command(ro):
    """The premise: the unprivileged subprocess cannot create a file in `ro` (as root it could)."""
    code = "import sys, pathlib; pathlib.Path(sys.argv[1], 'x').write_text('x')"
    p = subprocess.run([*unprivileged(), sys.executable, "-c", code, str(ro)], capture_output=True, text=True, cwd=REPO)
    assert p.returncode != 0 and "PermissionError" in p.stderr
    assert not os.access(ro, os.W_OK) or os.geteuid() == 0
