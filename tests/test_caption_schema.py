"""Caption schema, assembly, CLIP token counts, quality mapping, reply parsing, the store and outputs."""

from __future__ import annotations

import email.utils
import json
import random
import time
from pathlib import Path

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from pycore.caption import openai_backend as ob
from pycore.caption.pipeline import QualityMapping
from pycore.caption.schema import QUALITY_WORDS, Caption, assemble, clip_token_count, openai_json_schema, training_text
from pycore.caption.store import ResultStore, failed_record, merge, ok_record
from pycore.errors import HwError

HW_EXAMPLE = dict(
    summary="conceptual art featuring a human hand wrapped in red and beige ribbons, isolated against a plain, light background",
    elements=["realistic style", "minimalist color scheme", "smooth textures", "elongated and surreal aesthetic"],
    inspired_by="salvador dali's surrealist works",
    quality="masterpiece",
)


def test_helloworld_example_order_and_47_tokens():
    c = Caption(**HW_EXAMPLE)
    text = assemble(c)
    assert text == ("conceptual art featuring a human hand wrapped in red and beige ribbons, isolated against a plain, light "
                    "background, realistic style, minimalist color scheme, smooth textures, elongated and surreal aesthetic, "
                    "inspired by salvador dali's surrealist works, masterpiece")  # fmt: skip
    assert clip_token_count(text) == 47  # the figure CAPTIONS.md gives for this caption


def test_keep_tokens_prefix_and_training_text():
    c = Caption(**HW_EXAMPLE)
    text = assemble(c, prefix="hwstyle", keep_tokens=True)
    head, mid, tail = text.split(" ||| ")
    assert head == "hwstyle, " + HW_EXAMPLE["summary"]
    assert mid == ", ".join(HW_EXAMPLE["elements"])
    assert tail == "inspired by salvador dali's surrealist works, masterpiece"
    assert training_text(text) == assemble(c, prefix="hwstyle")
    assert clip_token_count(text) == clip_token_count(assemble(c, prefix="hwstyle"))
    no_insp = assemble(Caption(**{**HW_EXAMPLE, "inspired_by": None}), keep_tokens=True)
    assert no_insp.endswith("||| masterpiece")


@pytest.mark.parametrize(
    "text",
    [
        HW_EXAMPLE["summary"],
        "Fashion photography, Fashion portrait — café au lait &amp; crème brûlée, 1984's neon-lit Tokyo!!",
        "ÆØÅ naïve 東京 写真 👍🏽 <start_of_text> don't won't it'll",
        "x" * 300,
        "   spaced\tout\n\nlines  ",
    ],
)
def test_token_count_matches_open_clip(text):
    oc = pytest.importorskip("open_clip.tokenizer")
    assert clip_token_count(text) == len(oc.SimpleTokenizer().encode(text))


def test_caption_validation_cleans_and_rejects():
    c = Caption(summary="  A red  square. ", elements=["red", " Red ", "", "a ||| b"], inspired_by="Inspired by Mark Rothko", quality="low quality")
    assert c.summary == "A red square" and c.elements == ["red", "a b"] and c.inspired_by == "Mark Rothko"
    for bad in (
        {**HW_EXAMPLE, "quality": "great quality"},
        {**HW_EXAMPLE, "extra": 1},
        {k: v for k, v in HW_EXAMPLE.items() if k != "inspired_by"},  # required even though nullable
        {**HW_EXAMPLE, "summary": " . "},
        {**HW_EXAMPLE, "elements": "a, b"},
    ):
        with pytest.raises(ValidationError):
            Caption.model_validate(bad)


def test_json_schema_is_strict_and_matches_model():
    s = openai_json_schema()
    assert s["additionalProperties"] is False and set(s["required"]) == set(s["properties"])
    assert s["properties"]["quality"]["enum"] == list(QUALITY_WORDS)
    assert Caption.model_validate(HW_EXAMPLE).model_dump() == {**HW_EXAMPLE}


def test_parse_reply_cases():
    def reply(content=None, refusal=None, finish="stop"):
        return {"choices": [{"message": {"content": content, "refusal": refusal}, "finish_reason": finish}], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}

    cap, usage = ob.parse_reply(reply(json.dumps(HW_EXAMPLE)))
    assert cap == HW_EXAMPLE and usage["total_tokens"] == 5
    cap, _ = ob.parse_reply({"choices": [{"message": {"content": [{"type": "text", "text": json.dumps(HW_EXAMPLE)}]}}]})
    assert cap["quality"] == "masterpiece"
    cases = [
        (reply(refusal="I can't\nhelp"), "refused: I can't help"),
        (reply('{"summary": "x", "elem'), "invalid JSON in reply"),
        (reply('{"summary": "x", "elem', finish="length"), "invalid JSON in reply (truncated: finish_reason length; raise --max-tokens)"),
        (reply(json.dumps({**HW_EXAMPLE, "quality": "ok"})), "reply does not match the schema: quality"),
        (reply(""), "empty reply"),
        ({"choices": []}, "malformed reply: no choices"),
        ([], "malformed reply: no choices"),
    ]
    for payload, msg in cases:
        with pytest.raises(ob.ReplyError) as e:
            ob.parse_reply(payload)
        assert str(e.value).startswith(msg), str(e.value)


def test_retry_after_and_backoff():
    assert ob.retry_after_seconds({"retry-after-ms": "250"}) == 0.25
    assert ob.retry_after_seconds({"retry-after": "3"}) == 3.0
    assert ob.retry_after_seconds({"retry-after-ms": "x", "retry-after": "1.5"}) == 1.5
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < ob.retry_after_seconds({"retry-after": future}) <= 30
    assert ob.retry_after_seconds({"retry-after": "soon"}) is None
    assert ob.retry_after_seconds({}) is None
    cfg = ob.OpenAIConfig(backoff_base=0.5, backoff_max=8)
    rng = random.Random(0)
    for attempt in range(1, 10):
        cap = min(8, 0.5 * 2 ** (attempt - 1))
        waits = [ob.backoff_seconds(cfg, attempt, rng) for _ in range(50)]
        assert all(cap / 2 <= w <= cap for w in waits) and len(set(waits)) > 1  # jittered


def test_config_validation():
    with pytest.raises(HwError, match="--concurrency"):
        ob.OpenAIConfig(concurrency=0)
    with pytest.raises(HwError, match="--timeout"):
        ob.OpenAIConfig(timeout=0)
    assert ob.OpenAIConfig(base_url="http://x/v1/").url == "http://x/v1/chat/completions"
    a, b = ob.OpenAIConfig().job_options(), ob.OpenAIConfig(concurrency=64, timeout=5).job_options()
    assert a == b and a != ob.OpenAIConfig(model="gpt-4o-mini").job_options()


def test_quality_mapping_percentiles_ties_and_absolute():
    scores = {f"k{i}": float(i) for i in range(100)}
    words = QualityMapping().words(scores)
    counts = [list(words.values()).count(w) for w in QUALITY_WORDS]
    assert counts == [10, 15, 50, 20, 5]
    assert words["k0"] == "worst quality" and words["k99"] == "masterpiece"
    # monotone in the score
    order = [QUALITY_WORDS.index(words[f"k{i}"]) for i in range(100)]
    assert order == sorted(order)
    # ties share a word; a single image is average
    assert set(QualityMapping().words({"a": 1.0, "b": 1.0, "c": 1.0}).values()) == {"average quality"}
    assert QualityMapping().words({"a": 5.0}) == {"a": "average quality"}
    absolute = QualityMapping(scores=(4, 5, 6, 6.5)).words({"a": 3.9, "b": 4.0, "c": 5.5, "d": 6.2, "e": 7})
    assert absolute == {"a": "worst quality", "b": "low quality", "c": "average quality", "d": "best quality", "e": "masterpiece"}
    for bad in ((10, 25, 75), (25, 10, 75, 95), (0, 25, 75, 95), (10, 25, 75, 100)):
        with pytest.raises(HwError):
            QualityMapping(percentiles=bad)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=60))
def test_quality_mapping_property(values):
    scores = {str(i): v for i, v in enumerate(values)}
    words = QualityMapping().words(scores)
    assert set(words) == set(scores)
    for a in scores:
        for b in scores:
            if scores[a] < scores[b]:
                assert QUALITY_WORDS.index(words[a]) <= QUALITY_WORDS.index(words[b])


def test_store_survives_torn_lines_and_keeps_jobs_apart(tmp_path):
    s = ResultStore(tmp_path / "st", "job1")
    s.append(ok_record("a", "job1", HW_EXAMPLE, model="m"))
    s.append(failed_record("b", "job1", "HTTP 500 after 6 attempts"))
    s.append_many([ok_record("c", "job2", HW_EXAMPLE), failed_record("a", "job1", "late failure")])
    s.close()
    (shard,) = list((tmp_path / "st").glob("shard-*.jsonl"))
    with open(shard, "ab") as f:
        f.write(b'{"v":1,"key":"d","job":"job1","status":"ok","capt')  # a kill -9 mid-write
    s2 = ResultStore(tmp_path / "st", "job1")
    recs = s2.load()
    assert set(recs) == {"a", "b"} and recs["a"]["status"] == "ok"  # a success is not replaced by a later failure
    assert s2.report.bad_lines == 1 and s2.report.other_jobs == 1
    s2.append(ok_record("b", "job1", HW_EXAMPLE))  # a new shard file; the torn one is left alone
    s2.close()
    assert len(list((tmp_path / "st").glob("shard-*.jsonl"))) == 2
    assert ResultStore(tmp_path / "st", "job1").load()["b"]["status"] == "ok"


def test_merge_statuses(tmp_path):
    frame = pl.DataFrame({"path": ["/a.png", "/b.png", "/c.png", "/d.png", "/e.png"], "status": ["ok", "ok", "ok", "truncated", "ok"]})
    keys = ["ka", "kb", "kc", None, "ka"]
    recs = {"ka": ok_record("ka", "j", {**HW_EXAMPLE, "summary": "x " * 80}, model="m"), "kb": failed_record("kb", "j", "refused: no")}
    out, rep = merge(frame, keys, recs, todo={0, 1, 2, 4}, keep=set(), skip_reasons={3: "image status truncated"})
    assert out["caption_status"].to_list() == ["ok", "failed", "pending", "skipped", "ok"]
    assert out["caption_error"][1] == "refused: no" and out["caption"][1] is None
    assert out["caption_too_long"][0] is True and out["caption_tokens"][0] > 75
    assert rep.too_long == 2 and rep.failures == {"refused": 1} and rep.pending == 1 and rep.skipped == 1


def test_sidecar_clash_and_symlink_escape(tmp_path):
    from pycore.caption.outputs import write_sidecars

    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link.txt").symlink_to(outside / "target.txt")
    frame = pl.DataFrame({
        "path": [str(root / "a.jpg"), str(root / "a.png"), str(root / "link.jpg"), str(root / "ok.jpg")],
        "status": ["ok"] * 4, "caption_status": ["ok"] * 4, "caption": ["one", "two", "three", "four"],
    })  # fmt: skip
    rep = write_sidecars(frame, root, overwrite=True)
    assert rep.clashes == 2 and rep.outside_root == 1 and rep.written == 1
    assert not (root / "a.txt").exists() and not (outside / "target.txt").exists()
    assert (root / "ok.txt").read_text() == "four\n"
    assert write_sidecars(frame, root).exists == 1


def test_metadata_jsonl(tmp_path):
    from pycore.caption.outputs import export_metadata

    frame = pl.DataFrame({"path": ["/d/a.png", "/d/b.png"], "status": ["ok", "ok"], "width": [10, 20], "height": [5, 6],
                          "caption_status": ["ok", "failed"], "caption": ["s, t1, masterpiece", None], "summary": ["s", None],
                          "elements": [["t1"], None], "inspired_by": [None, None], "quality": ["masterpiece", None]})  # fmt: skip
    assert export_metadata(frame, tmp_path / "m.jsonl") == 1
    (line,) = (tmp_path / "m.jsonl").read_text().splitlines()
    assert json.loads(line) == {"image_key": "/d/a.png", "caption": "s, t1, masterpiece", "tags": "t1", "image_size": [10, 5],
                                "summary": "s", "elements": ["t1"], "inspired_by": None, "quality": "masterpiece"}  # fmt: skip
    with pytest.raises(HwError, match="exists"):
        export_metadata(frame, tmp_path / "m.jsonl")
    with pytest.raises(HwError, match=".json or .jsonl"):
        export_metadata(frame, tmp_path / "m.csv")


def test_images_exif_alpha_and_resize(tmp_path):
    from PIL import Image

    from pycore.caption.images import ImageLoadError, load_rgb

    ex = Image.Exif()
    ex[0x0112] = 6  # rotate 90°: stored 2000×1000 is displayed 1000×2000
    Image.new("RGB", (2000, 1000), (1, 2, 3)).save(tmp_path / "r.jpg", exif=ex.tobytes())
    im = load_rgb(tmp_path / "r.jpg", 768)
    assert im.size == (768, 1536) and im.mode == "RGB"
    Image.new("RGBA", (10, 10), (255, 0, 0, 0)).save(tmp_path / "a.png")
    assert load_rgb(tmp_path / "a.png").getpixel((0, 0)) == (255, 255, 255)
    assert load_rgb(tmp_path / "r.jpg", 0).size == (1000, 2000)
    Path(tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ImageLoadError, match="cannot read image"):
        load_rgb(tmp_path / "bad.jpg")


def test_spliced_request_body_equals_json_dumps(tmp_path):
    from PIL import Image

    from pycore.caption.images import data_url

    Image.new("RGB", (40, 30), (9, 8, 7)).save(tmp_path / "x.png")
    url = data_url(tmp_path / "x.png")
    cfg = ob.OpenAIConfig(prompt='Describe "this" image\\n — café')
    cap = ob.OpenAICaptioner(cfg, None, job="j")
    assert json.loads(cap._body(url)) == ob.request_body(cfg, url)
    assert cap._body(url) == json.dumps(ob.request_body(cfg, url)).encode()


def test_public_url_drops_credentials():
    from pycore.caption.openai_backend import public_url as _public_url

    assert _public_url("https://user:sk-secret@example.com:8443/v1?api-key=sk-x") == "https://example.com:8443/v1"
    assert _public_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"
