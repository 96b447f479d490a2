"""Loading --base (diffusers folder, single .safetensors file, hub name) and reading --prompts."""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pycore.errors import HwError  # noqa: E402
from pycore.diffusion.load import detect_family, load_base  # noqa: E402
from pycore.spo.prompts import load_prompts  # noqa: E402
from tests.kit.diffusion import save_tiny_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("spo_base")
    pipe = save_tiny_pipeline(root / "sdxl", sdxl=True, full_layout=True)
    save_tiny_pipeline(root / "sd15", sdxl=False)
    from pycore.lora.checkpoint import save_single_file

    comps = {"unet": pipe.unet.state_dict(), "text_encoder": pipe.text_encoder.state_dict(),
             "text_encoder_2": pipe.text_encoder_2.state_dict()}  # fmt: skip
    save_single_file(comps, root / "single.safetensors")  # A1111 layout, saved without its VAE
    return root


def _unet_out(base):
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, base.unet.config.cross_attention_dim, generator=g)
    add = {"text_embeds": torch.randn(1, 16, generator=g), "time_ids": torch.zeros(1, 6)}
    with torch.no_grad():
        return base.unet(x, torch.tensor([501]), encoder_hidden_states=e, added_cond_kwargs=add).sample


def test_folder_loads_sdxl_and_sd15(folders):
    assert detect_family(str(folders / "sdxl")) == "sdxl" and detect_family(str(folders / "sd15")) == "sd15"
    b = load_base(str(folders / "sdxl"))
    assert b.family == "sdxl" and b.text_encoder_2 is not None and b.force_zeros_for_empty_prompt
    assert b.latent_shape(8) == (4, 8, 8) and not any(p.requires_grad for p in b.unet.parameters())
    s = load_base(str(folders / "sd15"))
    assert s.family == "sd15" and s.text_encoder_2 is None and not s.force_zeros_for_empty_prompt
    with pytest.raises(HwError, match="configuration is for sd15"):
        load_base(str(folders / "sdxl"), family="sd15")


def test_single_file_equals_the_folder(folders):
    """The A1111-layout file, read by diffusers' from_single_file with the folder's configs, gives the same models."""
    assert detect_family(str(folders / "single.safetensors")) == "sdxl"
    with pytest.raises(HwError, match="cannot load the pipeline"):  # no VAE inside: a one-line error, then --vae
        load_base(str(folders / "single.safetensors"), single_file_config=str(folders / "sdxl"))
    a = load_base(str(folders / "sdxl"))
    b = load_base(str(folders / "single.safetensors"), single_file_config=str(folders / "sdxl"), vae=str(folders / "sdxl"))
    assert torch.equal(_unet_out(a), _unet_out(b))
    ids = a.tokenizer(["a red car"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(a.text_encoder(ids)[0], b.text_encoder(ids)[0])
        assert torch.equal(a.text_encoder_2(ids)[0], b.text_encoder_2(ids)[0])


def test_vae_override_and_dtypes(folders):
    b = load_base(str(folders / "sdxl"), vae=str(folders / "sdxl" / "vae"), dtype=torch.bfloat16, vae_dtype=torch.float32)
    assert b.unet.dtype == torch.bfloat16 and b.vae.dtype == torch.float32 and b.text_encoder.dtype == torch.bfloat16


def test_bad_bases_are_one_line_errors(folders, tmp_path):
    cases = {
        str(tmp_path / "missing"): "no such file or folder",
        "./nope/model": "no such file or folder",
        "someone/not-cached-model": "not in the Hugging Face cache",
    }
    (tmp_path / "m.ckpt").write_bytes(b"\x80\x04pickle")
    cases[str(tmp_path / "m.ckpt")] = "pickled checkpoints are not loaded"
    (tmp_path / "empty").mkdir()
    cases[str(tmp_path / "empty")] = "no model_index.json"
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    cases[str(tmp_path / "bad.safetensors")] = "not a safetensors file"
    for name, msg in cases.items():
        with pytest.raises(HwError, match=msg):
            load_base(name)


def test_other_schedules_are_refused(folders, tmp_path):
    import shutil

    v = tmp_path / "vpred"
    shutil.copytree(folders / "sdxl", v)
    p = v / "scheduler" / "scheduler_config.json"
    cfg = json.loads(p.read_text())
    p.write_text(json.dumps({**cfg, "prediction_type": "v_prediction"}))
    with pytest.raises(HwError, match="ε-prediction"):
        load_base(str(v))
    p.write_text(json.dumps({**cfg, "beta_end": 0.02}))
    with pytest.raises(HwError, match="noise schedule"):
        load_base(str(v))


def test_prompt_files(tmp_path):
    import polars as pl

    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert load_prompts(tmp_path / "p.txt").prompts == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a tree"}\n"a house"\nnot json\n{"other": 1}\n{"prompt": ""}\n\n')
    ps = load_prompts(tmp_path / "p.jsonl")
    assert ps.prompts == ["a tree", "a house"] and [r for r, _ in ps.skipped] == [3, 4, 5]
    assert "not JSON" in ps.skipped[0][1]
    pl.DataFrame({"path": ["a", "b", "c", "d"], "caption": ["hw, a cat ||| fur, grass ||| inspired by X, good", None, "a dog", "x"],
                  "caption_status": ["ok", "failed", "ok", "pending"]}).write_parquet(tmp_path / "m.parquet")  # fmt: skip
    ps = load_prompts(tmp_path / "m.parquet", "caption")
    assert ps.prompts == ["hw, a cat, fur, grass, inspired by X, good", "a dog"]
    assert ps.skipped == [(2, "caption_status failed"), (4, "caption_status pending")]
    pl.DataFrame({"text": ["one", "two"]}).write_csv(tmp_path / "t.csv")
    assert load_prompts(tmp_path / "t.csv").prompts == ["one", "two"] and load_prompts(tmp_path / "t.csv").unique == 2
    with pytest.raises(HwError, match="no column 'caption'"):
        load_prompts(tmp_path / "t.csv", "caption")
    (tmp_path / "e.txt").write_text("\n \n")
    with pytest.raises(HwError, match="no prompts in"):
        load_prompts(tmp_path / "e.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(HwError, match="not UTF-8"):
        load_prompts(tmp_path / "bin.txt")
    with pytest.raises(HwError, match="not found"):
        load_prompts(tmp_path / "missing.txt")


def test_family_comes_from_the_configs_not_class_names(folders, tmp_path):
    import shutil

    from pycore.diffusion.load import family_of_configs

    for fam, wrong in (("sdxl", "MyCustomPipeline"), ("sd15", "StableDiffusionXLPipeline")):
        d = tmp_path / fam
        shutil.copytree(folders / fam, d)
        idx = d / "model_index.json"
        idx.write_text(json.dumps({**json.loads(idx.read_text()), "_class_name": wrong}))
        assert detect_family(str(d)) == fam
    # SDXL's added text_time conditioning in the UNet config is enough, even without text_encoder_2
    assert family_of_configs({"unet": ["diffusers", "UNet2DConditionModel"]}, {"addition_embed_type": "text_time"}, "x") == "sdxl"
    with pytest.raises(HwError, match="neither an SDXL nor an SD1.5 pipeline"):
        family_of_configs({"_class_name": "StableDiffusionPipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
                           "vae": ["diffusers", "AutoencoderKL"]}, None, "sd3")  # fmt: skip
