"""`hw caption --backend openai` against a real HTTP server on 127.0.0.1 (tests/kit/fake_openai.py)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from tests.kit.fake_openai import FakeOpenAI, caption_for, image_id_of, random_faults
from pycore.caption.images import data_url
from pycore.caption.schema import QUALITY_WORDS
from pycore.manifest import read_manifest, write_manifest

ERROR_WORDS = ("error", "refus", "sorry", "http", "timed out", "invalid", "rate limit", "schema")


def make_images(folder: Path, n: int, size=(96, 64)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        im = Image.new("RGB", size, (i * 37 % 256, i * 91 % 256, (i * 13 + 50) % 256))
        im.putpixel((i % size[0], 0), (255, 255, 255))  # distinct bytes even when colours repeat
        p = folder / f"img_{i:03d}.png"
        im.save(p)
        out.append(p)
    return out


@pytest.fixture
def dataset(tmp_path, hw):
    def build(n: int = 12, extra=None) -> tuple[Path, Path]:
        root = tmp_path / "ds"
        make_images(root, n)
        if extra:
            extra(root)
        m = tmp_path / "m.parquet"
        r = hw("bucket", root, "--out", m, "--overwrite", "--json")
        assert r.code == 0, r.err
        return root, m

    return build


def server_id(path: Path) -> str:
    return image_id_of(data_url(path, 768, 90))


def caption_cmd(m: Path, out: Path, srv: FakeOpenAI, *extra) -> list:
    return ["caption", m, "--out", out, "--base-url", srv.base_url, "--model", "fake-vision", "--json", *extra]


def assert_clean(frame: pl.DataFrame) -> None:
    """Every row captioned or failed-with-reason; no error text inside any caption."""
    ok = frame.filter(pl.col("caption_status") == "ok")
    failed = frame.filter(pl.col("caption_status").is_in(["failed", "pending"]))
    assert ok.height + failed.height + frame.filter(pl.col("caption_status") == "skipped").height == frame.height
    assert failed["caption"].null_count() == failed.height
    assert failed["caption_error"].null_count() == 0
    for cap in ok["caption"].to_list():
        assert cap and not any(w in cap.lower() for w in ERROR_WORDS), cap
    assert ok["caption_error"].null_count() == ok.height
    assert set(ok["quality"].to_list()) <= set(QUALITY_WORDS)


def test_all_ok_structured_and_reported(dataset, tmp_path, hw):
    root, m = dataset(8)
    out = tmp_path / "c.parquet"
    with FakeOpenAI() as srv:
        r = hw(*caption_cmd(m, out, srv, "--concurrency", "4"))
        assert r.code == 0, r.err
    rep = r.json()
    assert rep["ok"] == 8 and rep["failed"] == 0 and rep["api"]["requests"] == 8
    assert rep["api"]["usage"] == {"prompt_tokens": 8 * 120, "completion_tokens": 8 * 40, "total_tokens": 8 * 160}
    assert not srv.bad_requests
    f = read_manifest(out)
    assert_clean(f)
    for row in f.iter_rows(named=True):
        path, cap, summ, el, insp, q, ntok = (row[c] for c in ("path", "caption", "summary", "elements", "inspired_by", "quality", "caption_tokens"))
        want = caption_for(server_id(Path(path)))
        assert summ == want["summary"] and el == want["elements"] and insp == want["inspired_by"] and q == want["quality"]
        parts = [want["summary"], *want["elements"]] + ([f"inspired by {insp}"] if insp else []) + [q]
        assert cap == ", ".join(parts)
        assert 0 < ntok <= 75
    assert f["caption_model"].unique().to_list() == ["fake-vision"]
    # rows and bucket columns are all kept
    assert f.height == read_manifest(m).height and "bucket_width" in f.columns


def test_faults_every_image_captioned_or_failed_none_twice(dataset, tmp_path, hw):
    root, m = dataset(40)
    out = tmp_path / "c.parquet"
    plan = random_faults(0.35, seed=3, kinds=("429", "429ms", "500", "503", "malformed", "badjson", "badschema", "refusal", "stall"))
    with FakeOpenAI(plan, stall=1.0) as srv:
        r = hw(*caption_cmd(m, out, srv, "--concurrency", "8", "--timeout", "0.5", "--max-attempts", "3"))
        assert r.code == 0, r.err
    f = read_manifest(out)
    assert_clean(f)
    rep = r.json()
    assert rep["ok"] + rep["failed"] + rep["pending"] == 40 and rep["failed"] > 0 and rep["ok"] > 20
    # the server served each image's caption at most once, and every served caption was recorded
    assert max(srv.served_ok.values()) == 1
    by_id = {server_id(Path(p)): (s, e) for p, s, e in zip(f["path"], f["caption_status"], f["caption_error"], strict=True)}
    assert set(by_id) == set(srv.attempts)
    for iid, (status, err) in by_id.items():
        actions = srv.actions_for(iid)
        if "ok" in actions:
            assert status == "ok" and actions[-1] == "ok"  # no request after the success
        elif actions[-1] == "stall":  # no answer to the last attempt: not stored, asked again next run
            assert status == "pending" and len(actions) == 3 and "timed out (0.5s) after 3 attempts" in err, (actions, err)
        else:
            assert status == "failed" and len(actions) == 3, (actions, err)
            last = actions[-1]
            expect = {"429": "HTTP 429", "429ms": "HTTP 429", "500": "HTTP 500", "503": "HTTP 503", "stall": "timed out",
                      "malformed": "invalid JSON response body", "badjson": "invalid JSON in reply",
                      "badschema": "reply does not match the schema", "refusal": "refused"}[last]  # fmt: skip
            assert err.startswith(expect) and err.endswith("after 3 attempts"), (last, err)
    assert sum(rep["failures"].values()) == rep["failed"]


def test_retry_after_is_honoured(dataset, tmp_path, hw, monkeypatch):
    root, m = dataset(3)
    out = tmp_path / "c.parquet"
    import pycore.caption.openai_backend as ob

    waits = []
    real_sleep = ob.asyncio.sleep

    async def spy(d, *a, **k):
        waits.append(d)
        await real_sleep(0)

    monkeypatch.setattr(ob.asyncio, "sleep", spy)
    plan = lambda iid, attempt: {1: "429", 2: "429ms"}.get(attempt, "ok")  # noqa: E731
    with FakeOpenAI(plan) as srv:
        r = hw(*caption_cmd(m, out, srv, "--concurrency", "1"))
        assert r.code == 0, r.err
    assert r.json()["ok"] == 3
    assert sorted(waits) == sorted([0.05, 0.03] * 3)  # retry-after: 0.05 s, retry-after-ms: 30
    assert all(len(srv.actions_for(i)) == 3 for i in srv.attempts)


def test_refusal_always_is_failure_not_caption(dataset, tmp_path, hw):
    root, m = dataset(4)
    out = tmp_path / "c.parquet"
    with FakeOpenAI(lambda iid, a: "refusal") as srv:
        r = hw(*caption_cmd(m, out, srv, "--max-attempts", "2", "--sidecar", "--metadata", tmp_path / "meta.json"))
        assert r.code == 3, r.err  # nothing captioned: NothingDone, after writing the manifest with the reasons
        assert "0 of the 4 image(s) asked were captioned" in r.err
    f = read_manifest(out)
    assert f["caption_status"].to_list() == ["failed"] * 4
    assert all(e.startswith("refused: I'm sorry") for e in f["caption_error"])
    assert f["caption"].null_count() == 4
    assert not list(root.glob("*.txt"))  # no sidecar holds an error
    assert json.loads((tmp_path / "meta.json").read_text()) == {}
    assert r.json()["api"]["requests"] == 8


def test_auth_failure_stops_run_and_key_never_written(dataset, tmp_path, hw, monkeypatch):
    root, m = dataset(5)
    out = tmp_path / "c.parquet"
    secret = "sk-test-SECRET-0123456789abcdef"
    with FakeOpenAI(api_key=secret) as srv:
        monkeypatch.setenv("HW_TEST_KEY", "sk-wrong-key-zzzzzzzz")
        r = hw(*caption_cmd(m, out, srv, "--api-key-env", "HW_TEST_KEY", "--concurrency", "1"))
        assert r.code == 1 and "HTTP 401 authentication failed" in r.err
        assert not out.exists()
        assert sum(srv.attempts.values()) == 1  # stopped at once, not 5 × retries
        monkeypatch.setenv("HW_TEST_KEY", secret)
        r = hw(*caption_cmd(m, out, srv, "--api-key-env", "HW_TEST_KEY", "--sidecar", "--metadata", tmp_path / "k.jsonl"))
        assert r.code == 0, r.err
        assert srv.auth[f"Bearer {secret}"] == 5
    assert secret not in r.out + r.err
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert secret.encode() not in p.read_bytes(), p
    assert "sk-wrong" not in r.out


def test_missing_key_for_openai_com_is_one_line_error(dataset, tmp_path, hw, monkeypatch):
    root, m = dataset(1)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    r = hw("caption", m, "--out", tmp_path / "c.parquet")
    assert r.code == 1 and "set the API key in $OPENAI_API_KEY" in r.err


def test_duplicates_skips_and_kept_captions(dataset, tmp_path, hw):
    def extra(root: Path):
        (root / "dup.png").write_bytes((root / "img_000.png").read_bytes())
        (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")

    root, m = dataset(3, extra)
    out = tmp_path / "c.parquet"
    with FakeOpenAI() as srv:
        r = hw(*caption_cmd(m, out, srv))
        assert r.code == 0, r.err
        rep = r.json()
        assert rep["unique_images"] == 3 and rep["duplicates"] == 1 and rep["api"]["requests"] == 3
        f = read_manifest(out)
        by = dict(zip([Path(p).name for p in f["path"]], f.iter_rows(named=True), strict=True))
        assert by["dup.png"]["caption"] == by["img_000.png"]["caption"]
        assert by["broken.png"]["caption_status"] == "skipped" and by["broken.png"]["caption_error"] == "image status truncated"
        # a captioned manifest as input: existing captions are kept (no requests) unless --overwrite
        f2 = f.with_columns(pl.when(pl.col("path").str.ends_with("img_001.png")).then(pl.lit("my own caption")).otherwise(pl.col("caption")).alias("caption"))
        write_manifest(f2, tmp_path / "c2.parquet")
        before = sum(srv.attempts.values())
        r = hw(*caption_cmd(tmp_path / "c2.parquet", tmp_path / "c3.parquet", srv, "--store", tmp_path / "other-store"))
        assert r.code == 0 and r.json()["kept"] == 4 and sum(srv.attempts.values()) == before
        assert "my own caption" in read_manifest(tmp_path / "c3.parquet")["caption"].to_list()
        r = hw(*caption_cmd(tmp_path / "c2.parquet", tmp_path / "c3.parquet", srv, "--store", tmp_path / "other-store", "--overwrite"))
        assert r.code == 0 and r.json()["kept"] == 0
        assert "my own caption" not in read_manifest(tmp_path / "c3.parquet")["caption"].to_list()
        assert sum(srv.attempts.values()) == before + 3


def test_rerun_reuses_store_and_prefix_keep_tokens_apply_without_requests(dataset, tmp_path, hw):
    root, m = dataset(5)
    out = tmp_path / "c.parquet"
    with FakeOpenAI() as srv:
        assert hw(*caption_cmd(m, out, srv)).code == 0
        r = hw(*caption_cmd(m, out, srv, "--overwrite", "--prefix", "hwstyle", "--keep-tokens"))
        assert r.code == 0, r.err
        assert r.json()["reused_from_store"] == 5 and sum(srv.attempts.values()) == 5
        f = read_manifest(out)
        for cap, summ, q in zip(f["caption"], f["summary"], f["quality"], strict=True):
            head, mid, tail = cap.split(" ||| ")
            assert head == f"hwstyle, {summ}" and tail.endswith(q) and "flat colour" in mid
        # another model is another job: requested again, old results not mixed in
        r = hw(*caption_cmd(m, out, srv, "--overwrite", "--model", "other-model"))
        assert r.json()["reused_from_store"] == 0 and sum(srv.attempts.values()) == 10


def test_failed_are_kept_until_retry_failed(dataset, tmp_path, hw):
    root, m = dataset(4)
    out = tmp_path / "c.parquet"
    broken = {"on": True}
    with FakeOpenAI(lambda iid, a: "500" if broken["on"] else "ok") as srv:
        r = hw(*caption_cmd(m, out, srv, "--max-attempts", "2"))
        assert r.json()["failed"] == 4 and sum(srv.attempts.values()) == 8
        broken["on"] = False
        r = hw(*caption_cmd(m, out, srv, "--overwrite"))
        assert r.json()["failed"] == 4 and sum(srv.attempts.values()) == 8
        r = hw(*caption_cmd(m, out, srv, "--overwrite", "--retry-failed"))
        assert r.json()["ok"] == 4 and sum(srv.attempts.values()) == 12


def test_sidecars_only_inside_root_and_not_overwritten(dataset, tmp_path, hw):
    def extra(root: Path):
        (root / "img_001.txt").write_text("hand-written caption\n")

    root, m = dataset(3, extra)
    out = tmp_path / "c.parquet"
    # a row pointing outside the dataset root must not get a sidecar
    outside = tmp_path / "elsewhere"
    make_images(outside, 1)
    f = read_manifest(m)
    row = f.filter(pl.col("path").str.ends_with("img_002.png")).with_columns(pl.lit(str(outside / "img_000.png")).alias("path"), pl.lit("ffff" * 8).alias("content_hash"))
    write_manifest(pl.concat([f, row]), tmp_path / "m2.parquet", metadata={"root": str(root)})
    with FakeOpenAI() as srv:
        r = hw(*caption_cmd(tmp_path / "m2.parquet", out, srv, "--sidecar", "--metadata", tmp_path / "meta.json"))
        assert r.code == 0, r.err
    rep = r.json()["sidecars"]
    assert rep == {"written": 2, "exists": 1, "outside_root": 1, "clashes": 0, "errors": [rep["errors"][0]]}
    assert (root / "img_001.txt").read_text() == "hand-written caption\n"
    assert not (outside / "img_000.txt").exists()
    got = read_manifest(out)
    cap0 = got.filter(pl.col("path").str.ends_with("ds/img_000.png"))["caption"][0]
    assert (root / "img_000.txt").read_text() == cap0 + "\n"
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta[str(root / "img_000.png")] == {"caption": cap0, "tags": ", ".join(caption_for(server_id(root / "img_000.png"))["elements"]), "image_size": [96, 64]}
    with FakeOpenAI() as srv:
        r = hw(*caption_cmd(tmp_path / "m2.parquet", out, srv, "--sidecar", "--overwrite", "--store", tmp_path / "s2"))
    assert (root / "img_001.txt").read_text() != "hand-written caption\n"


def test_batch_export_split_and_import(dataset, tmp_path, hw):
    root, m = dataset(5)
    out = tmp_path / "c.parquet"
    bdir = tmp_path / "batch"
    from pycore.caption import batch

    r = hw("caption", m, "--out", out, "--model", "gpt-4o-mini", "--batch-export", bdir, "--json")
    assert r.code == 0, r.err
    files = sorted(bdir.glob("batch-*.jsonl"))
    assert len(files) == 1 and r.json()["batch_export"]["requests"] == 5
    lines = [json.loads(x) for x in files[0].read_text().splitlines()]
    assert {ln["url"] for ln in lines} == {"/v1/chat/completions"} and {ln["method"] for ln in lines} == {"POST"}
    body = lines[0]["body"]
    assert body["model"] == "gpt-4o-mini" and body["response_format"]["json_schema"]["strict"] is True
    assert body["messages"][1]["content"][1]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    # splitting: by request count and by bytes
    from pycore.caption.openai_backend import OpenAIConfig

    items = list(zip([f"{i:032x}" for i in range(5)], [str(p) for p in sorted(root.glob("*.png"))], strict=True))
    rep = batch.export_batch(items, OpenAIConfig(), tmp_path / "b2", job="j", max_requests=2)
    assert [len(Path(f).read_text().splitlines()) for f in rep.files] == [2, 2, 1]
    one = len(Path(rep.files[0]).read_bytes()) // 2
    rep = batch.export_batch(items, OpenAIConfig(), tmp_path / "b3", job="j", max_bytes=int(one * 1.5))
    assert len(rep.files) == 5 and all(Path(f).stat().st_size <= one * 1.5 for f in rep.files)
    r = hw("caption", m, "--out", out, "--model", "gpt-4o-mini", "--batch-export", bdir)
    assert r.code == 1 and "--overwrite" in r.err

    # a Batch output file: 3 successes, 1 refusal, 1 expired request
    res = []
    for i, ln in enumerate(lines):
        iid = image_id_of(ln["body"]["messages"][1]["content"][1]["image_url"]["url"])
        msg = {"role": "assistant", "content": json.dumps(caption_for(iid)), "refusal": None}
        if i == 3:
            msg = {"role": "assistant", "content": None, "refusal": "I can't help with that."}
        body = {"choices": [{"index": 0, "message": msg, "finish_reason": "stop"}], "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
        if i == 4:
            res.append({"id": "b", "custom_id": ln["custom_id"], "response": None, "error": {"code": "batch_expired", "message": "This request could not be executed before the completion window expired."}})
        else:
            res.append({"id": "b", "custom_id": ln["custom_id"], "response": {"status_code": 200, "request_id": "r", "body": body}, "error": None})
    resf = tmp_path / "out.jsonl"
    resf.write_text("".join(json.dumps(x) + "\n" for x in res) + '{"torn": ')
    r = hw("caption", m, "--out", out, "--model", "gpt-4o-mini", "--batch-import", resf, "--json")
    assert r.code == 0, r.err
    rep = r.json()
    assert rep["batch_import"]["ok"] == 3 and rep["batch_import"]["failed"] == 2 and rep["batch_import"]["bad_lines"] == 1
    assert rep["batch_import"]["usage"]["total_tokens"] == 45
    f = read_manifest(out)
    assert_clean(f)
    errs = sorted(e for e in f["caption_error"] if e)
    assert errs[0].startswith("batch error: batch_expired") and errs[1].startswith("refused:")
    # another model's job does not accept these results
    r = hw("caption", m, "--out", tmp_path / "x.parquet", "--model", "gpt-4o", "--batch-import", resf)
    assert r.code == 1 and "belong to this job" in r.err


def test_config_validation_errors(dataset, tmp_path, hw):
    root, m = dataset(1)
    out = tmp_path / "c.parquet"
    r = hw("caption", m, "--out", out, "--base-url", "localhost:8000", "--api-key-env", "NOPE_NOT_SET")
    assert r.code == 1 and "--base-url must start with http" in r.err
    r = hw("caption", m, "--out", out, "--base-url", "http://127.0.0.1:9/v1", "--quality-percentiles", "10,5,75,95")
    assert r.code == 1 and "strictly increasing" in r.err
    r = hw("caption", m, "--out", out, "--base-url", "http://127.0.0.1:9/v1", "--detail", "ultra")
    assert r.code == 1 and "--detail" in r.err


def test_no_hash_manifest_and_image_broken_after_bucketing(tmp_path, hw):
    root = tmp_path / "ds"
    paths = make_images(root, 4)
    m = tmp_path / "m.parquet"
    assert hw("bucket", root, "--out", m, "--no-hash", "--json").code == 0
    assert read_manifest(m)["content_hash"].null_count() == 4
    paths[1].write_bytes(paths[1].read_bytes()[:60])  # truncated after `hw bucket` read its header
    out = tmp_path / "c.parquet"
    with FakeOpenAI() as srv:
        r = hw(*caption_cmd(m, out, srv))
        assert r.code == 0, r.err
        assert sum(srv.attempts.values()) == 3
    f = read_manifest(out)
    assert_clean(f)
    by = {Path(p).name: (s, e) for p, s, e in zip(f["path"], f["caption_status"], f["caption_error"], strict=True)}
    assert by["img_001.png"][0] == "failed" and by["img_001.png"][1].startswith("cannot read image")
    assert [by[f"img_00{i}.png"][0] for i in (0, 2, 3)] == ["ok"] * 3
    # hashes computed here are the same xxh3-128 `hw bucket` stores: a hashed manifest reuses the store
    m2 = tmp_path / "m2.parquet"
    assert hw("bucket", root, "--out", m2, "--json").code == 0
    with FakeOpenAI() as srv:
        r = hw(*caption_cmd(m2, tmp_path / "c2.parquet", srv, "--store", tmp_path / "c.parquet.captions"))
        assert r.code == 0 and r.json()["reused_from_store"] == 4 and not srv.attempts
