"""The manifest chain bucket → dedup → caption → spm-score through the CLI: spm-score keeps every
row, every earlier column (values unchanged) and every earlier metadata key, and appends itself."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from pycore.manifest import Manifest  # noqa: E402
from tests.kit.fake_openai import FakeOpenAI  # noqa: E402
from tests.test_caption_openai import make_images  # noqa: E402


@pytest.mark.slow
def test_spm_score_carries_the_whole_chain_forward(hw, tmp_path, kit_spm, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = tmp_path / "ds"
    make_images(root, 6)
    shutil.copy(root / "img_000.png", root / "img_000_copy.png")  # an exact duplicate for dedup to group
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    steps = [tmp_path / f"{n}.parquet" for n in ("bucket", "dedup", "caption", "scored")]
    assert hw("bucket", root, "--out", steps[0], "--json").code == 0
    r = hw("dedup", steps[0], "--out", steps[1], "--json")
    assert r.code == 0, r.err
    with FakeOpenAI() as srv:
        r = hw("caption", steps[1], "--out", steps[2], "--base-url", srv.base_url, "--model", "fake-vision", "--json")
    assert r.code == 0, r.err
    r = hw("spm-score", steps[2], "--prompt-column", "caption", "--model", kit_spm, "--device", "cpu", "--out", steps[3], "--json")
    assert r.code == 0, r.err
    before, after = Manifest.read(steps[2]), Manifest.read(steps[3])
    assert after.frame.height == before.frame.height == 8
    for c in before.frame.columns:
        assert c in after.frame.columns and after.frame[c].equals(before.frame[c]), c
    for k, v in before.meta.items():
        if k != "history":
            assert after.meta.get(k) == v, k
    assert after.history == [*before.history, "spm-score"]
    assert {"root", "dedup_hash_mode"} <= set(after.meta)  # what `hw caption --sidecar` needs later
    assert r.json()["scored"] >= 6 and after.get("spm_score")["prompt_column"] == "caption"
