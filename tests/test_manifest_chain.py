"""The manifest carries itself forward (issue 11 item 3): bucket → dedup → caption → spm-score through
the CLI on a few images. After every step the rows are the same, every earlier column keeps its
values, every earlier metadata key keeps its value, and ``history`` grows by one entry; at the end
`hw caption --sidecar` still finds the folder `hw bucket` scanned (no --root).

This test needs every command of the chain to write through ``Manifest.derive``; a failure names
the step that dropped something.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from tests.kit.fake_openai import FakeOpenAI
from pycore.manifest import Manifest
from test_caption_openai import make_images

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_spm(kit_spm):
    """A tiny step-aware preference model saved as an `hw spm-train` folder (the kit's)."""
    return kit_spm


def _check_step(step: str, before: Manifest, after: Manifest) -> None:
    a, b = before.frame, after.frame
    assert sorted(b["path"].to_list()) == sorted(a["path"].to_list()), f"{step} changed the rows"
    dropped = [c for c in a.columns if c not in b.columns]
    assert not dropped, f"{step} dropped column(s) {dropped}"
    joined = a.join(b, on="path", how="left", suffix="__next", nulls_equal=True)
    for c in a.columns:
        if c == "path":
            continue
        assert joined[c].equals(joined[f"{c}__next"], check_names=False), f"{step} changed the values of column {c!r}"
    for k, v in before.meta.items():
        assert k in after.meta, f"{step} dropped metadata key {k!r}"
        if k != "history":
            assert after.meta[k] == v, f"{step} changed metadata key {k!r}"
    assert after.history[:-1] == before.history and len(after.history) == len(before.history) + 1, \
        f"{step}: history {before.history} → {after.history}"  # fmt: skip


def test_bucket_dedup_caption_spm_score_keep_everything(tmp_path, hw, tiny_spm, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = tmp_path / "ds"
    make_images(root, 5)
    (root / "copy.png").write_bytes((root / "img_001.png").read_bytes())  # an exact duplicate for dedup
    m = [tmp_path / f"m{i}.parquet" for i in range(6)]

    r = hw("bucket", root, "--out", m[0], "--json")
    assert r.code == 0, r.err
    first = Manifest.read(m[0])
    assert first.get("root") and Path(first.meta["root"]).resolve() == root.resolve()
    assert len(first.history) == 1, f"bucket did not start the history (pycore.manifest.new_manifest): {first.history}"

    r = hw("dedup", m[0], "--out", m[1], "--json")
    assert r.code == 0, r.err
    with FakeOpenAI() as srv:
        r = hw("caption", m[1], "--out", m[2], "--base-url", srv.base_url, "--model", "fake-vision", "--json")
        assert r.code == 0, r.err
        assert r.json()["ok"] == 6 and sum(srv.attempts.values()) == 5  # the duplicate shares a request
        r = hw("spm-score", m[2], "--prompt-column", "caption", "--model", tiny_spm, "--out", m[3], "--device", "cpu", "--json")
        assert r.code == 0, r.err

        chain = [Manifest.read(p) for p in m[:4]]
        for step, before, after in zip(("dedup", "caption", "spm-score"), chain, chain[1:], strict=False):
            _check_step(step, before, after)
        hist = chain[-1].history
        assert [w in h for w, h in zip(("bucket", "dedup", "caption", "spm"), hist, strict=True)] == [True] * 4, hist
        assert {"dup_group", "keep", "caption", "caption_status", "spm_score"} <= set(chain[-1].frame.columns)
        assert json.loads(chain[-1].meta["caption"])["model"] == "fake-vision"

        # the chain's metadata still names the scanned folder: sidecars without --root, no new request
        sent = sum(srv.attempts.values())
        r = hw("caption", m[3], "--out", m[4], "--base-url", srv.base_url, "--model", "fake-vision", "--sidecar",
               "--store", tmp_path / "m2.parquet.captions", "--json")  # fmt: skip
        assert r.code == 0, r.err
        assert sum(srv.attempts.values()) == sent
    assert r.json()["kept"] == 6 and r.json()["sidecars"]["written"] == 6
    final = Manifest.read(m[4])
    _check_step("caption again", chain[-1], final)
    cap = final.frame.filter(pl.col("path").str.ends_with("img_000.png"))["caption"][0]
    assert (root / "img_000.txt").read_text() == cap + "\n"
