"""`hw caption` under a user's mistakes (issue 13): an unreachable server stops the run at once with
one line, transport failures are never stored as an image's outcome, a run that captions nothing
exits 3, and a non-UTF-8 file name keeps the kohya metadata valid JSON. Inputs stay byte-identical."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import polars as pl
import pytest

from conftest import assert_one_line_error, tree_digest
from tests.kit.fake_openai import FakeOpenAI
from pycore.manifest import read_manifest
from test_caption_openai import assert_clean, caption_cmd, make_images


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return port


def store_records(store: Path) -> list[dict]:
    out = []
    for f in sorted(store.glob("shard-*.jsonl")):
        out += [json.loads(x) for x in f.read_bytes().splitlines() if x.strip()]
    return out


@pytest.fixture
def dataset(tmp_path, hw):
    def build(n: int = 4) -> tuple[Path, Path]:
        root = tmp_path / "ds"
        make_images(root, n)
        m = tmp_path / "m.parquet"
        assert hw("bucket", root, "--out", m, "--json").code == 0
        return root, m

    return build


class DropServer:
    """Accepts every connection and closes it without a reply (a crashing proxy or server)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.accepted = 0
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"

    def _serve(self) -> None:
        self.sock.settimeout(0.05)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            conn.recv(1 << 16)
            conn.close()

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()


def test_closed_port_stops_at_once_and_caches_nothing(dataset, tmp_path, hw):
    root, m = dataset(6)
    before = tree_digest(root, m)
    out = tmp_path / "c.parquet"
    url = f"http://127.0.0.1:{free_port()}/v1"
    r = hw("caption", m, "--out", out, "--base-url", url, "--concurrency", "2")
    line = assert_one_line_error(r, 1, "cannot reach the caption server")
    assert "connection refused" in line and url in line
    assert not out.exists()
    assert [x for x in store_records(tmp_path / "c.parquet.captions") if x["status"] != "ok"] == []
    assert tree_digest(root, m) == before


def test_server_down_then_up_captions_every_image_once_without_retry_failed(dataset, tmp_path, hw):
    root, m = dataset(5)
    out = tmp_path / "c.parquet"
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    r = hw("caption", m, "--out", out, "--base-url", url, "--model", "fake-vision")
    assert_one_line_error(r, 1, "cannot reach")
    srv = FakeOpenAI()
    srv.start(port)  # the same address, now up
    try:
        r = hw("caption", m, "--out", out, "--base-url", url, "--model", "fake-vision", "--json")
        assert r.code == 0, r.err
    finally:
        srv.stop()
    rep = r.json()
    assert rep["ok"] == 5 and rep["failed"] == 0 and rep["reused_from_store"] == 0
    assert sorted(srv.served_ok.values()) == [1] * 5  # each image captioned exactly once
    f = read_manifest(out)
    assert f["caption_status"].to_list() == ["ok"] * 5
    recs = store_records(tmp_path / "c.parquet.captions")
    assert [x["status"] for x in recs] == ["ok"] * 5


def test_unknown_host_is_one_line(dataset, tmp_path, hw):
    root, m = dataset(2)
    r = hw("caption", m, "--out", tmp_path / "c.parquet", "--base-url", "http://hw-no-such-host.invalid/v1")
    assert_one_line_error(r, 1, "cannot reach the caption server http://hw-no-such-host.invalid/v1")
    assert not (tmp_path / "c.parquet").exists()


def test_server_dropping_every_connection_stops_after_a_few_tries(dataset, tmp_path, hw):
    root, m = dataset(8)
    srv = DropServer()
    try:
        r = hw("caption", m, "--out", tmp_path / "c.parquet", "--base-url", srv.base_url, "--concurrency", "2", "--max-attempts", "6")
    finally:
        srv.close()
    assert_one_line_error(r, 1, "stopped answering")
    # 2 slots × 2 tries each, plus the requests already in flight — not 8 images × 6 attempts
    assert srv.accepted <= 6, srv.accepted
    assert store_records(tmp_path / "c.parquet.captions") == []


def test_timeouts_are_not_stored_and_are_asked_again(dataset, tmp_path, hw):
    root, m = dataset(3)
    out = tmp_path / "c.parquet"
    state = {"stall": True}
    with FakeOpenAI(lambda iid, a: "stall" if state["stall"] and iid == first else "ok", stall=1.0) as srv:
        from test_caption_openai import server_id

        first = server_id(sorted(root.glob("*.png"))[0])
        r = hw(*caption_cmd(m, out, srv, "--timeout", "0.3", "--max-attempts", "2"))
        assert r.code == 0, r.err
        rep = r.json()
        assert rep["ok"] == 2 and rep["pending"] == 1 and rep["failed"] == 0
        f = read_manifest(out)
        assert_clean(f)
        row = f.filter(pl.col("caption_status") == "pending")
        assert row["caption_error"][0].startswith("not captioned: timed out (0.3s) after 2 attempts")
        state["stall"] = False
        r = hw(*caption_cmd(m, out, srv, "--overwrite"))
        assert r.code == 0, r.err
        assert r.json()["ok"] == 3 and r.json()["reused_from_store"] == 2
    assert srv.served_ok[first] == 1


def test_nothing_captioned_exits_3_with_manifest_and_reasons(dataset, tmp_path, hw):
    root, m = dataset(3)
    before = tree_digest(root, m)
    out = tmp_path / "c.parquet"
    with FakeOpenAI(lambda iid, a: "400") as srv:
        r = hw(*caption_cmd(m, out, srv)[:-1])  # without --json: the table, then the error line
    assert_one_line_error(r, 3, "0 of the 3 image(s) asked were captioned")
    f = read_manifest(out)
    assert f["caption_status"].to_list() == ["failed"] * 3
    assert tree_digest(root, m) == before


def test_non_utf8_file_name_keeps_metadata_json_valid(tmp_path, hw):
    import os

    root = tmp_path / "ds"
    make_images(root, 2)
    raw = os.fsencode(root) + b"/caf\xe9.png"  # Latin-1 é: not valid UTF-8
    os.rename(root / "img_001.png", raw)
    m = tmp_path / "m.parquet"
    assert hw("bucket", root, "--out", m, "--json").code == 0
    before = tree_digest(root, m)
    with FakeOpenAI() as srv:
        r = hw(*caption_cmd(m, tmp_path / "c.parquet", srv, "--metadata", tmp_path / "meta.json", "--sidecar"))
        assert r.code == 0, r.err
        assert "not valid UTF-8" in r.err and "\\udcXX" in r.err and "Traceback" not in r.err
        r2 = hw(*caption_cmd(m, tmp_path / "c2.parquet", srv, "--metadata", tmp_path / "meta.jsonl", "--store", tmp_path / "c.parquet.captions"))
        assert r2.code == 0, r2.err
    data = (tmp_path / "meta.json").read_bytes()
    text = data.decode("utf-8")  # valid UTF-8
    assert "\\udce9" in text
    meta = json.loads(text)
    assert len(meta) == 2 and raw in {os.fsencode(k) for k in meta}  # lossless for Python readers
    assert all(Path(k).exists() for k in meta)
    lines = [json.loads(x) for x in (tmp_path / "meta.jsonl").read_bytes().decode("utf-8").splitlines()]
    assert raw in {os.fsencode(d["image_key"]) for d in lines}
    assert Path(os.fsdecode(raw[:-4] + b".txt")).read_text().strip() == meta[os.fsdecode(raw)]["caption"]
    after = tree_digest(root, m)
    assert {k: v for k, v in after.items() if not k.endswith(".txt")} == before  # only the sidecars are new


BAD_OPTIONS = [
    (["--concurrency", "0"], 1, "--concurrency must be between 1 and 1,024"),
    (["--concurrency", "-3"], 1, "--concurrency must be between 1 and 1,024"),
    (["--concurrency", "100000"], 1, "--concurrency must be between 1 and 1,024"),
    (["--max-attempts", "0"], 1, "--max-attempts must be between 1 and 100"),
    (["--max-attempts", "99999999999999999999"], 1, "--max-attempts"),
    (["--timeout", "0"], 1, "--timeout must be a finite number"),
    (["--timeout", "nan"], 1, "--timeout must be a finite number"),
    (["--timeout", "1e308"], 1, "--timeout must be a finite number"),
    (["--max-side", "-1"], 1, "--max-side must be between 0 and 16,384"),
    (["--temperature", "5"], 1, "--temperature"),
    (["--max-tokens", "1"], 1, "--max-tokens"),
    (["--limit", "-1"], 1, "--limit must be at least 0"),
    (["--batch-size", "0"], 1, "--batch-size"),
    (["--n-tags", "1000"], 1, "--n-tags"),
    (["--summary-tokens", "2"], 1, "--summary-tokens"),
    (["--quality-percentiles", "10,20"], 1, "exactly 4"),
    (["--quality-scores", "a,b,c,d"], 1, "--quality-scores must be 4 comma-separated numbers"),
    (["--metadata", "meta.csv"], 1, "--metadata must end in .json or .jsonl"),
    (["--prompt-file", "no-such-prompt.txt"], 1, "--prompt-file no-such-prompt.txt does not exist"),
    (["--backend", "openclip", "--device", "tpu"], 1, "--device must be auto, cpu, cuda, cuda:N or mps"),
    (["--backend", "openclip", "--device", "cuda:7"], 1, "--device cuda:7"),
    (["--quality-from", "aesthetic", "--aesthetic-weights", "nope.safetensors"], 1, "--aesthetic-weights nope.safetensors does not exist"),
    (["--batch-export", "b", "--batch-import", "r.jsonl"], 1, "separate runs"),
    (["--concurrency", "many"], 2, None),  # not a number: Typer's usage error
]


@pytest.mark.parametrize(("args", "code", "msg"), BAD_OPTIONS, ids=[" ".join(a) for a, _, _ in BAD_OPTIONS])
def test_bad_options_are_one_line_before_any_request(args, code, msg, dataset, tmp_path, hw, monkeypatch):
    root, m = dataset(1)
    monkeypatch.chdir(tmp_path)
    before = tree_digest(root, m)
    with FakeOpenAI() as srv:
        r = hw("caption", m, "--out", tmp_path / "c.parquet", "--base-url", srv.base_url, *args)
    if code == 2:
        assert r.code == 2 and "Traceback" not in r.err
    else:
        assert_one_line_error(r, code, msg)
    assert not srv.attempts and not (tmp_path / "c.parquet").exists()
    assert tree_digest(root, m) == before


def test_bad_outputs_are_refused_before_any_request(dataset, tmp_path, hw):
    import os

    root, m = dataset(2)
    before = tree_digest(root, m)
    (tmp_path / "folder.parquet").mkdir()
    (tmp_path / "exists.parquet").write_bytes(b"mine")
    os.link(m, tmp_path / "hardlink.parquet")
    os.link(m, tmp_path / "hardlink.json")
    cases = [
        ([m], "is also an input"),
        ([tmp_path / "hardlink.parquet", "--overwrite"], "is also an input"),
        ([tmp_path / "folder.parquet"], "is a folder"),
        ([tmp_path / "exists.parquet"], "exists; pass --overwrite"),
        ([tmp_path / "nodir" / "c.parquet"], "does not exist"),
        ([os.fsdecode(os.fsencode(tmp_path) + b"/bad\xff.parquet")], "not valid UTF-8"),
        ([tmp_path / "c.parquet", "--metadata", tmp_path / "hardlink.json", "--overwrite"], "is also an input"),
        ([tmp_path / "c.parquet", "--sidecar", "--root", tmp_path / "no-root"], "is not a folder"),
        ([tmp_path / "c.parquet", "--store", tmp_path / "exists.parquet"], "the result store is a folder"),
    ]
    with FakeOpenAI() as srv:
        for args, msg in cases:
            r = hw("caption", m, "--out", *args, "--base-url", srv.base_url)
            assert_one_line_error(r, 1, msg)
    assert not srv.attempts
    assert (tmp_path / "exists.parquet").read_bytes() == b"mine"
    assert tree_digest(root, m) == before


def test_sidecar_without_a_known_root_fails_before_any_request(dataset, tmp_path, hw):
    from pycore.manifest import write_manifest

    root, m = dataset(2)
    bare = tmp_path / "bare.parquet"
    write_manifest(read_manifest(m), bare)  # no metadata: the scanned folder is unknown
    with FakeOpenAI() as srv:
        r = hw("caption", bare, "--out", tmp_path / "c.parquet", "--base-url", srv.base_url, "--sidecar")
    assert_one_line_error(r, 1, "--sidecar needs --root")
    assert not srv.attempts


@pytest.mark.parametrize(
    ("exc", "fatal"),
    [("ConnectError", "cannot reach the caption server"), ("ConnectTimeout", "no connection within 2s"),
     ("ReadTimeout", None), ("RemoteProtocolError", None), ("ReadError", None)],
)  # fmt: skip
def test_transport_errors_are_pending_never_failed(exc, fatal):
    """Every kind of 'no HTTP response' ends as pending (not stored); connection failures before the
    server ever answered stop the run; the others stop it after max(4, 2 × concurrency) in a row."""
    import asyncio

    import httpx

    from pycore.caption.openai_backend import OpenAICaptioner, OpenAIConfig

    calls = []

    def handler(request):
        calls.append(request)
        raise getattr(httpx, exc)("boom", request=request)

    cfg = OpenAIConfig(base_url="http://caption.test/v1", model="m", max_attempts=3, timeout=2, backoff_base=0, backoff_max=0, concurrency=1)
    cap = OpenAICaptioner(cfg, None, job="j")

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return [await cap.request(client, "data:image/jpeg;base64,AAAA") for _ in range(2)]

    results = asyncio.run(go())
    assert all(status == "pending" for status, *_ in results), results
    if fatal:
        assert len(calls) == 1 and fatal in cap._fatal
    else:
        assert len(calls) == 4 and "stopped answering (4 requests in a row" in cap._fatal  # the streak limit
        assert results[0][2].endswith("after 3 attempts")
