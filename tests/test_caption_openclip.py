"""The offline open_clip backend on tiny random models built in code (loaded via local-dir:)."""

from __future__ import annotations


import polars as pl
import pytest

from pycore.caption.pipeline import QualityMapping
from pycore.caption.schema import QUALITY_WORDS
from pycore.manifest import read_manifest
from tests.kit.fake_openai import FakeOpenAI
from tests.test_caption_openai import assert_clean, make_images

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from tests.kit.open_clip import CLIP_CFG, COCA_CFG, EMBED, build  # noqa: E402
from tests.kit.open_clip import save_local_dir as _save  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    clip = open_clip.CLIP(**CLIP_CFG)
    coca = build(COCA_CFG, seed=None)
    from pycore.caption.openclip_backend import aesthetic_mlp

    mlp = aesthetic_mlp(EMBED)
    from safetensors.torch import save_file

    save_file({f"layers.{k}": v.contiguous() for k, v in mlp.state_dict().items()}, str(d / "aesthetic.safetensors"))
    torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, d / "aesthetic.pth")
    return {"clip": _save(d / "clip", clip, CLIP_CFG), "coca": _save(d / "coca", coca, COCA_CFG),
            "mlp": d / "aesthetic.safetensors", "mlp_pth": d / "aesthetic.pth", "mlp_module": mlp}  # fmt: skip


@pytest.fixture
def manifest(tmp_path, hw):
    root = tmp_path / "ds"
    make_images(root, 20, size=(80, 48))
    m = tmp_path / "m.parquet"
    assert hw("bucket", root, "--out", m, "--json").code == 0
    return root, m


def oc_args(tiny, *extra):
    return ["--backend", "openclip", "--clip-model", tiny["clip"], "--coca-model", tiny["coca"], "--device", "cpu",
            "--batch-size", "20", "--summary-tokens", "7", "--json", *extra]  # fmt: skip


def test_openclip_end_to_end(tiny, manifest, tmp_path, hw):
    root, m = manifest
    out = tmp_path / "c.parquet"
    r = hw("caption", m, "--out", out, *oc_args(tiny, "--aesthetic-weights", tiny["mlp"], "--n-tags", "4", "--keep-tokens"))
    assert r.code == 0, r.err
    rep = r.json()
    assert rep["ok"] == 20 and rep["openclip"]["head"] == "laion-mlp"
    f = read_manifest(out)
    assert_clean(f)
    from pycore.caption.openclip_backend import default_style_files, default_tag_files, read_vocab

    tags = {c.tag for c in read_vocab(default_tag_files())}
    styles = {c.tag for c in read_vocab(default_style_files(), styles=True)}
    for row in f.iter_rows(named=True):
        assert row["summary"] and len(row["elements"]) == 4 and set(row["elements"]) <= tags
        assert row["inspired_by"] in styles
        head, mid, tail = row["caption"].split(" ||| ")
        assert tail == f"inspired by {row['inspired_by']}, {row['quality']}"
    # quality words by dataset percentile of the aesthetic score (the MLP on the CLIP embedding)
    scores = dict(zip(f["content_hash"], f["aesthetic"], strict=True))
    assert len(set(scores.values())) == 20
    want = QualityMapping().words(scores)
    assert f["quality"].to_list() == [want[k] for k in f["content_hash"]]
    counts = {w: f["quality"].to_list().count(w) for w in QUALITY_WORDS}
    assert counts == {"worst quality": 2, "low quality": 3, "average quality": 10, "best quality": 4, "masterpiece": 1}
    # the score is the LAION head on the normalised CLIP image embedding
    from pycore.caption.images import load_rgb

    model, _, pre = open_clip.create_model_and_transforms(tiny["clip"])
    p0 = f["path"][0]
    with torch.no_grad():
        e = model.encode_image(pre(load_rgb(p0)).unsqueeze(0))
        s = tiny["mlp_module"].eval()(e / e.norm(dim=-1, keepdim=True)).item()
    assert f["aesthetic"][0] == pytest.approx(s, rel=1e-4, abs=1e-5)
    # a re-run reuses the store; other thresholds re-map without recomputing
    r = hw("caption", m, "--out", out, "--overwrite", *oc_args(tiny, "--aesthetic-weights", tiny["mlp"], "--n-tags", "4",
           "--quality-percentiles", "50,60,70,80"))  # fmt: skip
    assert r.code == 0 and r.json()["reused_from_store"] == 20 and "openclip" not in r.json()
    assert r.json()["quality_distribution"]["worst quality"] == 10


def test_user_vocab_zero_shot_head_and_pth_weights(tiny, manifest, tmp_path, hw):
    root, m = manifest
    voc = tmp_path / "tags.txt"
    voc.write_text("# Colour\nred, crimson\nblue\n# Subject\ncat, kitten\ndog\n")
    sty = tmp_path / "styles.txt"
    sty.write_text("# x\nmonet\nhokusai\n")
    broken = root / "img_019.png"
    broken.write_bytes(broken.read_bytes()[:70])  # unreadable now, after `hw bucket`
    r = hw("caption", m, "--out", tmp_path / "c.parquet", *oc_args(tiny, "--tags", voc, "--styles", sty, "--n-tags", "3"))
    assert r.code == 0, r.err
    assert r.json()["openclip"] == {"captioned": 19, "failed": 1, "head": "zero-shot", "device": "cpu"}
    f = read_manifest(tmp_path / "c.parquet")
    bad = f.filter(pl.col("path").str.ends_with("img_019.png"))
    assert bad["caption_status"][0] == "failed" and bad["caption_error"][0].startswith("cannot read image")
    f = f.filter(pl.col("caption_status") == "ok")
    for el, insp in zip(f["elements"].to_list(), f["inspired_by"], strict=True):
        assert len(el) == 3 and set(el) <= {"red", "blue", "cat", "dog"} and insp in {"monet", "hokusai"}
        assert ({"red", "blue"} & set(el)) and ({"cat", "dog"} & set(el))  # one per category first
    from pycore.caption.openclip_backend import load_aesthetic

    mlp = load_aesthetic(tiny["mlp_pth"], EMBED, "cpu")
    x = torch.randn(3, EMBED)
    assert torch.allclose(mlp(x), tiny["mlp_module"].eval()(x))
    from pycore.errors import HwError

    with pytest.raises(HwError, match="expect 32-dim CLIP embeddings but --clip-model gives 768"):
        load_aesthetic(tiny["mlp"], 768, "cpu")


def test_quality_from_aesthetic_with_openai(tiny, manifest, tmp_path, hw):
    root, m = manifest
    out = tmp_path / "c.parquet"
    with FakeOpenAI() as srv:
        r = hw("caption", m, "--out", out, "--base-url", srv.base_url, "--model", "fake", "--quality-from", "aesthetic",
               "--clip-model", tiny["clip"], "--aesthetic-weights", tiny["mlp"], "--device", "cpu", "--json")  # fmt: skip
        assert r.code == 0, r.err
    f = read_manifest(out)
    assert_clean(f)
    want = QualityMapping().words(dict(zip(f["content_hash"], f["aesthetic"], strict=True)))
    assert f["quality"].to_list() == [want[k] for k in f["content_hash"]]
    assert all(c.endswith(q) for c, q in zip(f["caption"], f["quality"], strict=True))
    assert f["summary"].str.starts_with("a test image number").all()


def test_bad_model_name_is_one_line_error(manifest, tmp_path, hw):
    root, m = manifest
    r = hw("caption", m, "--out", tmp_path / "c.parquet", "--backend", "openclip", "--clip-model", f"local-dir:{tmp_path}/nope", "--device", "cpu")
    assert r.code == 1 and r.err.startswith("hw: error: cannot load open_clip model local-dir:") and r.err.count("\n") == 1
    assert not (tmp_path / "c.parquet").exists()
    assert pl.read_parquet(m).height == 20
