"""Resume after kill -9: a real `hw caption` subprocess is SIGKILLed mid-run and re-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.kit.fake_openai import FakeOpenAI, image_id_of
from pycore.caption.images import data_url
from pycore.manifest import read_manifest
from tests.test_caption_openai import assert_clean, make_images

REPO = Path(__file__).resolve().parent.parent
SECRET = "sk-resume-SECRET-9f8e7d6c5b4a"


def shard_lines(store: Path) -> list[dict]:
    out = []
    for f in sorted(store.glob("shard-*.jsonl")):
        for raw in f.read_bytes().splitlines():
            try:
                out.append(json.loads(raw))
            except json.JSONDecodeError:
                pass
    return out


@pytest.mark.slow
def test_sigkill_midway_then_rerun_finishes_without_repeats(tmp_path, hw):
    n = 30
    root = tmp_path / "ds"
    make_images(root, n)
    m = tmp_path / "m.parquet"
    assert hw("bucket", root, "--out", m, "--json").code == 0
    out = tmp_path / "c.parquet"
    store = tmp_path / "c.parquet.captions"
    env = dict(os.environ, HW_TEST_KEY=SECRET, PYTHONPATH=str(REPO))
    with FakeOpenAI(latency=0.15, api_key=SECRET) as srv:
        cmd = [sys.executable, "-m", "cli.app", "caption", str(m), "--out", str(out), "--base-url", srv.base_url,
               "--model", "fake-vision", "--concurrency", "2", "--api-key-env", "HW_TEST_KEY", "--json"]  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(shard_lines(store)) < 6:
            if proc.poll() is not None:
                pytest.fail(f"hw caption ended before it could be killed: {proc.communicate()}")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        o1, e1 = proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        before = shard_lines(store)
        assert 6 <= len(before) < n, len(before)
        assert not out.exists()  # the manifest is only written at the end
        done_keys = {r["key"] for r in before}
        log_at_kill = len(srv.log)

        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=120)
        assert proc.returncode == 0, proc.stderr.decode()
        rep = json.loads(proc.stdout)
        assert rep["reused_from_store"] == len(done_keys) and rep["ok"] == n

    f = read_manifest(out)
    assert_clean(f)
    assert f["caption_status"].to_list() == ["ok"] * n
    key_of_id = {}
    for p, k in zip(f["path"], f["content_hash"], strict=True):
        key_of_id[image_id_of(data_url(p, 768, 90))] = k
    # no finished request repeated: the rerun asked only for images without a stored record
    rerun_ids = {iid for iid, _, _ in srv.log[log_at_kill:]}
    assert not {key_of_id[i] for i in rerun_ids} & done_keys
    # and nothing lost: every image was served; at most the ones in flight at the kill twice
    assert set(srv.served_ok) == set(key_of_id)
    twice = [i for i, c in srv.served_ok.items() if c > 1]
    assert len(twice) <= 2 and all(key_of_id[i] not in done_keys for i in twice)
    # each image has exactly one ok record in the store
    recs = shard_lines(store)
    assert sorted(r["key"] for r in recs if r["status"] == "ok") == sorted(set(f["content_hash"]))
    # the key went only into the Authorization header
    assert srv.auth == {f"Bearer {SECRET}": srv.auth[f"Bearer {SECRET}"]}
    for blob in (o1, e1, proc.stdout, proc.stderr):
        assert SECRET.encode() not in blob
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert SECRET.encode() not in p.read_bytes(), p
