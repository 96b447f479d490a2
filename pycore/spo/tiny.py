"""Tiny SDXL-/SD1.5-shaped models built from configs in code (tests and CPU demos; no downloads).

The UNet has SDXL's text_time conditioning; the two CLIP text encoders use the character-level
tokenizer of :func:`pycore.spo.preference.write_tiny_clip_tokenizer` so any prompt tokenizes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

TE_HIDDEN = 16
POOLED_DIM = 16
TIME_EMBED_DIM = 4


TE2_HIDDEN_FULL = 24


def tiny_unet_config(sdxl: bool = True, full_layout: bool = False) -> dict[str, Any]:
    """``full_layout``: SDXL's two layers per block and a second text encoder wider than the first (as 1280 vs 768),
    so kohya key names and diffusers' single-file conversion map as for the real model; smaller and faster without."""
    te2 = TE2_HIDDEN_FULL if full_layout else TE_HIDDEN
    cfg: dict[str, Any] = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2 if full_layout else 1, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True,
    )  # fmt: skip
    if sdxl:
        cfg.update(cross_attention_dim=TE_HIDDEN + te2, addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
                   projection_class_embeddings_input_dim=POOLED_DIM + 6 * TIME_EMBED_DIM)  # fmt: skip
    else:
        cfg.update(cross_attention_dim=TE_HIDDEN)
    return cfg


def _text_config(tokenizer, projection: bool, hidden: int = TE_HIDDEN):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, projection_dim=POOLED_DIM,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.eos_token_id)  # fmt: skip


@dataclass
class TinyModels:
    """Components in the layout of StableDiffusionXLPipeline (text_encoder_2 etc. None for SD1.5)."""

    unet: Any
    vae: Any
    tokenizer: Any
    text_encoder: Any
    tokenizer_2: Any = None
    text_encoder_2: Any = None


def build_tiny_models(tokenizer_dir: str | os.PathLike[str], *, sdxl: bool = True, seed: int = 0, full_layout: bool = False) -> TinyModels:
    """Randomly initialised tiny UNet, VAE and CLIP text encoder(s), seeded; latents are 4×h×w."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from pycore.spo.preference import write_tiny_clip_tokenizer

    tok = write_tiny_clip_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(sdxl, full_layout))
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))  # fmt: skip
    te1 = CLIPTextModel(_text_config(tok, False))
    if not sdxl:
        return TinyModels(unet=unet, vae=vae, tokenizer=tok, text_encoder=te1)
    te2 = CLIPTextModelWithProjection(_text_config(tok, True, TE2_HIDDEN_FULL if full_layout else TE_HIDDEN))
    return TinyModels(unet=unet, vae=vae, tokenizer=tok, text_encoder=te1, tokenizer_2=tok, text_encoder_2=te2)


def save_tiny_pipeline(folder: str | os.PathLike[str], *, sdxl: bool = True, seed: int = 0, full_layout: bool = False) -> Any:
    """Save the tiny models as a diffusers pipeline folder (model_index.json, SPO's DDIM scheduler); returns the pipeline.

    What `hw spo-train --base FOLDER` loads in tests and in the demo, exactly as it loads a real model.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = os.fspath(folder)
    m = build_tiny_models(os.path.join(folder, "_tokenizer_src"), sdxl=sdxl, seed=seed, full_layout=full_layout)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading",
                          steps_offset=1, clip_sample=False, set_alpha_to_one=False)  # fmt: skip
    if sdxl:
        pipe = StableDiffusionXLPipeline(vae=m.vae, text_encoder=m.text_encoder, text_encoder_2=m.text_encoder_2, tokenizer=m.tokenizer,
                                         tokenizer_2=m.tokenizer_2, unet=m.unet, scheduler=sched)  # fmt: skip
    else:
        pipe = StableDiffusionPipeline(vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    pipe.save_pretrained(folder)
    import shutil

    shutil.rmtree(os.path.join(folder, "_tokenizer_src"), ignore_errors=True)
    return pipe


def save_tiny_spm(folder: str | os.PathLike[str], *, seed: int = 0) -> Any:
    """A tiny random step-aware preference model saved as an `hw spm-train` folder (loads with --spm FOLDER)."""
    from pycore.spo.preference import StepAwarePreferenceModel, tiny_spm_config, write_tiny_clip_tokenizer

    tok = write_tiny_clip_tokenizer(folder)
    spm = StepAwarePreferenceModel.from_config(tiny_spm_config(tok), tok, seed=seed)
    spm.save_pretrained(folder, overwrite=True)
    return spm
