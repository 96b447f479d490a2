"""The step-aware preference model: layout, loading, identity init, time embedding, preprocessing."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from pycore.spm.model import (  # noqa: E402
    CLIP_MEAN,
    CLIP_STD,
    SPMLoadError,
    StepAwarePreferenceModel,
    preprocess_images,
    timestep_embedding,
)
from tests.kit.clip import save_tiny_clip, tiny_spm  # noqa: E402
from tests.kit.tokenizer import write_tiny_clip_tokenizer  # noqa: E402

PROMPTS = ["a red square on grey", "a photo of a cat"]


@pytest.fixture(autouse=True)
def _offline_one_thread(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread beats two on a shared CPU
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tiny_clip_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(tok_dir))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, tok):
    """A tiny plain CLIP in HF format (config.json + weights + tokenizer), like PickScore_v1 on disk."""
    return save_tiny_clip(tmp_path_factory.mktemp("clip"), seed=1, tokenizer=tok)


def images(n=2, h=240, w=320, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g) * 2 - 1


def randomize_time_modules(spm, seed=3, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in spm.named_parameters():
            if "adaLN_modulation" in name or "t_embedder" in name:
                p.add_(torch.randn(p.shape, generator=g) * std)


def test_timestep_embedding_matches_formula_cos_first():
    t = torch.tensor([0, 1, 17, 251, 501, 999])
    emb = timestep_embedding(t)
    assert emb.shape == (6, 256) and emb.dtype == torch.float32
    # the formula, written out term by term in the same float32 arithmetic: exactly equal
    k = torch.arange(128, dtype=torch.float32)
    f = torch.exp(-math.log(10000) * k / 128)
    args = t.to(torch.float32)[:, None] * f[None]
    assert torch.equal(emb[:, :128], torch.cos(args))
    assert torch.equal(emb[:, 128:], torch.sin(args))
    # t = 0: cos half is 1, sin half is 0 (cos first)
    assert torch.equal(emb[0, :128], torch.ones(128)) and torch.equal(emb[0, 128:], torch.zeros(128))
    # and it agrees with the float64 formula to float32 precision
    for row, tv in enumerate(t.tolist()):
        ref = [math.cos(tv * math.exp(-math.log(10000) * kk / 128)) for kk in range(128)]
        ref += [math.sin(tv * math.exp(-math.log(10000) * kk / 128)) for kk in range(128)]
        assert torch.allclose(emb[row].double(), torch.tensor(ref, dtype=torch.float64), atol=2e-4)


def test_preprocessing_matches_spec_on_non_square_image():
    import torchvision.transforms.functional as TF

    x = images(1, 300, 200, seed=5)  # H=300, W=200: shortest side 200 → 224, H → int(300·1.12+0.5) = 336
    got = preprocess_images(x)
    assert got.shape == (1, 3, 224, 224)
    ref = TF.resize(x, [336, 224], interpolation=TF.InterpolationMode.BICUBIC, antialias=False)
    ref = TF.center_crop(ref, [224, 224])  # rows 56..280
    ref = TF.normalize((ref / 2 + 0.5).clamp(0, 1), CLIP_MEAN, CLIP_STD)
    assert torch.allclose(got, ref, atol=1e-6)
    # the crop is centred: a 448×224 image keeps rows 112..335, so a stripe at rows 200..247 lands at 88..135
    y = torch.full((1, 3, 448, 224), -1.0)
    y[:, :, 200:248] = 1.0
    rows = (preprocess_images(y)[0, 0] > 0).all(dim=1).nonzero().flatten()
    assert rows.tolist() == list(range(88, 136))


def test_preprocessing_pil_input_matches_tensor(tok):
    import numpy as np
    from PIL import Image

    spm = tiny_spm(tok)
    arr = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    t = torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    assert torch.allclose(spm.preprocess([Image.fromarray(arr)]), spm.preprocess(t), atol=1e-6)


def test_identity_init_scores_equal_plain_clip_for_every_t(clip_dir, tok):
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(str(clip_dir)).eval()
    spm = StepAwarePreferenceModel.from_pretrained(clip_dir)
    x = images()
    pix = preprocess_images(x)
    ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = clip(input_ids=ids, pixel_values=pix).logits_per_image.diagonal()
        for t in (0, 1, 251, 500, 951, 999):
            got = spm.score(x, PROMPTS, t)
            assert torch.allclose(got, ref, atol=1e-5, rtol=0), (t, got, ref)
    # the time modules start as specified: adaLN zero except gates one, final adaLN zero
    h = clip.config.vision_config.hidden_size
    b = spm.model.vision_model.encoder.layers[0].adaLN_modulation[1].bias.detach()
    assert torch.equal(b[2 * h : 3 * h], torch.ones(h)) and torch.equal(b[5 * h :], torch.ones(h))
    assert float(b[:2 * h].abs().sum() + b[3 * h : 5 * h].abs().sum()) == 0
    assert float(spm.model.vision_model.adaLN_modulation[1].weight.detach().abs().sum()) == 0


def test_nonzero_adaln_makes_score_depend_on_t(tok):
    spm = tiny_spm(tok)
    randomize_time_modules(spm)
    x = images()
    with torch.no_grad():
        s0, s500, s999 = (spm.score(x, PROMPTS, t) for t in (0, 500, 999))
    assert not torch.allclose(s0, s500, atol=1e-4) and not torch.allclose(s500, s999, atol=1e-4)
    # per-sample timesteps: each image uses its own t
    mixed = spm.score(x, PROMPTS, torch.tensor([0, 999]))
    assert torch.allclose(mixed, torch.stack([s0[0], s999[1]]), atol=1e-5)


def _released_bin(tmp_path, tok, sd_edit=None):
    spm = tiny_spm(tok)
    randomize_time_modules(spm)
    sd = {k: v.clone() for k, v in spm.state_dict().items()}
    assert all(k.startswith("model.") for k in sd)
    if sd_edit:
        sd_edit(sd)
    path = tmp_path / "spm.bin"
    torch.save(sd, path)
    return spm, path


def test_released_layout_checkpoint_loads_every_key(tmp_path, tok, tok_dir, clip_dir):
    spm, path = _released_bin(tmp_path, tok)
    keys = set(spm.state_dict())
    # the released layout: HF CLIP keys + t_embedder + per-layer and final adaLN, under "model."
    assert "model.t_embedder.mlp.0.weight" in keys and "model.t_embedder.mlp.2.bias" in keys
    assert "model.vision_model.encoder.layers.1.adaLN_modulation.1.weight" in keys
    assert "model.vision_model.adaLN_modulation.1.bias" in keys and "model.logit_scale" in keys
    assert "model.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    h = 32
    assert spm.state_dict()["model.vision_model.encoder.layers.0.adaLN_modulation.1.weight"].shape == (6 * h, h)
    assert spm.state_dict()["model.vision_model.adaLN_modulation.1.weight"].shape == (2 * h, h)
    assert spm.state_dict()["model.t_embedder.mlp.0.weight"].shape == (h, 256)
    loaded = StepAwarePreferenceModel.from_pretrained(path, base=str(clip_dir), processor=str(tok_dir))
    for k, v in spm.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = images()
    with torch.no_grad():
        assert torch.allclose(loaded.score(x, PROMPTS, [3, 700]), spm.score(x, PROMPTS, [3, 700]), atol=1e-6)


def test_legacy_position_ids_keys_are_accounted_for(tmp_path, tok, tok_dir, clip_dir):
    def add(sd):
        sd["model.vision_model.embeddings.position_ids"] = torch.arange(50)[None]
        sd["model.text_model.embeddings.position_ids"] = torch.arange(77)[None]

    _, path = _released_bin(tmp_path, tok, add)
    StepAwarePreferenceModel.from_pretrained(path, base=str(clip_dir), processor=str(tok_dir))


@pytest.mark.parametrize(
    "edit,words",
    [
        (lambda sd: sd.pop("model.vision_model.encoder.layers.1.adaLN_modulation.1.weight"),
         ["1 missing key", "layers.1.adaLN_modulation.1.weight"]),
        (lambda sd: sd.__setitem__("model.vision_model.extra_head.weight", torch.zeros(3)),
         ["1 unexpected key", "model.vision_model.extra_head.weight"]),
        (lambda sd: sd.__setitem__("model.t_embedder.mlp.0.weight", torch.zeros(32, 128)),
         ["model.t_embedder.mlp.0.weight has shape (32, 128), expected (32, 256)"]),
    ],
)  # fmt: skip
def test_bad_checkpoint_keys_are_clear_errors(tmp_path, tok, tok_dir, clip_dir, edit, words):
    _, path = _released_bin(tmp_path, tok, edit)
    with pytest.raises(SPMLoadError) as ei:
        StepAwarePreferenceModel.from_pretrained(path, base=str(clip_dir), processor=str(tok_dir))
    msg = str(ei.value)
    assert "\n" not in msg and str(path) in msg
    for w in words:
        assert w in msg


class Payload:
    """An arbitrary pickled object: torch.load(weights_only=True) must refuse to build it."""


def test_pickled_non_tensor_checkpoint_is_refused(tmp_path, tok_dir, clip_dir):
    path = tmp_path / "evil.bin"
    torch.save({"model.x": torch.zeros(1), "obj": Payload()}, path)
    with pytest.raises(SPMLoadError, match="weights_only"):
        StepAwarePreferenceModel.from_pretrained(path, base=str(clip_dir), processor=str(tok_dir))


def test_save_pretrained_roundtrip_safetensors(tmp_path, tok):
    from safetensors.torch import load_file

    spm = tiny_spm(tok)
    randomize_time_modules(spm)
    spm.save_pretrained(tmp_path / "m")
    keys = set(load_file(str(tmp_path / "m" / "model.safetensors")))
    assert keys == set(spm.state_dict())
    back = StepAwarePreferenceModel.from_pretrained(tmp_path / "m")
    x = images()
    with torch.no_grad():
        assert torch.equal(back.score(x, PROMPTS, 400), spm.score(x, PROMPTS, 400))
    with pytest.raises(Exception, match="overwrite"):
        spm.save_pretrained(tmp_path / "m")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_scores_close_to_fp32(tmp_path, tok, dtype):
    spm = tiny_spm(tok)
    randomize_time_modules(spm)
    spm.save_pretrained(tmp_path / "m")
    half = StepAwarePreferenceModel.from_pretrained(tmp_path / "m", dtype=dtype)
    assert half.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    x = images()
    with torch.no_grad():
        ref = spm.score(x, PROMPTS, 300)
        got = half.score(x, PROMPTS, 300)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert torch.allclose(got, ref, atol=0.15 * float(ref.abs().max()) + 0.05)


def test_score_latents_decodes_and_keeps_no_graph(tok):
    from tests.kit.diffusion import near_identity_vae

    torch.manual_seed(0)
    vae = near_identity_vae(32).eval()
    spm = tiny_spm(tok)
    randomize_time_modules(spm)
    lat = torch.randn(2, 4, 16, 16, requires_grad=True)
    got = spm.score_latents(lat, vae, PROMPTS, [100, 900], decode_batch_size=1)
    assert not got.requires_grad and got.shape == (2,)
    with torch.no_grad():
        imgs = vae.decode(lat / vae.config.scaling_factor).sample
        ref = spm.score(imgs, PROMPTS, [100, 900])
    assert torch.allclose(got, ref, atol=1e-5)


def test_unknown_local_path_is_a_clear_error(tmp_path):
    from pycore.errors import HwError

    with pytest.raises(HwError, match="no such file or folder"):
        StepAwarePreferenceModel.from_pretrained(tmp_path / "nope.bin")
