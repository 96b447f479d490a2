"""Tiny SDXL-/SD1.5-shaped models built from configs in code (tests, benchmarks and the demo; no downloads).

The UNet has SDXL's text_time conditioning; the two CLIP text encoders use the character-level
tokenizer of :func:`tests.kit.tokenizer.write_tiny_clip_tokenizer` so any prompt tokenizes.
:func:`save_tiny_sd15_denoiser` is an SD1.5 pipeline with a near-identity VAE and an ε ≈ 0 UNet, for
training the step-aware preference model on images whose content survives the noising.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TE_HIDDEN = 16
POOLED_DIM = 16
TIME_EMBED_DIM = 4


TE2_HIDDEN_FULL = 24


def tiny_unet_config(sdxl: bool = True, full_layout: bool = False, levels: int = 2) -> dict[str, Any]:
    """``full_layout``: SDXL's two layers per block and a second text encoder wider than the first (as 1280 vs 768),
    so kohya key names and diffusers' single-file conversion map as for the real model; smaller and faster without.
    ``levels=3``: SDXL's three resolution levels, the deepest with two transformer blocks per attention (SDXL: 10)."""
    te2 = TE2_HIDDEN_FULL if full_layout else TE_HIDDEN
    cfg: dict[str, Any] = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2 if full_layout else 1, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True,
    )  # fmt: skip
    if levels == 3:
        cfg.update(block_out_channels=(8, 16, 16), attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 1, 2),
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))  # fmt: skip
    elif levels != 2:
        raise ValueError(f"levels must be 2 or 3, got {levels}")
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


def build_tiny_models(tokenizer_dir: str | os.PathLike[str], *, sdxl: bool = True, seed: int = 0, full_layout: bool = False,
                      levels: int = 2) -> TinyModels:  # fmt: skip
    """Randomly initialised tiny UNet, VAE and CLIP text encoder(s), seeded; latents are 4×h×w."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from tests.kit.tokenizer import write_tiny_clip_tokenizer

    tok = write_tiny_clip_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(sdxl, full_layout, levels))
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))  # fmt: skip
    te1 = CLIPTextModel(_text_config(tok, False))
    if not sdxl:
        return TinyModels(unet=unet, vae=vae, tokenizer=tok, text_encoder=te1)
    te2 = CLIPTextModelWithProjection(_text_config(tok, True, TE2_HIDDEN_FULL if full_layout else TE_HIDDEN))
    return TinyModels(unet=unet, vae=vae, tokenizer=tok, text_encoder=te1, tokenizer_2=tok, text_encoder_2=te2)


def save_tiny_pipeline(folder: str | os.PathLike[str], *, sdxl: bool = True, seed: int = 0, full_layout: bool = False,
                       levels: int = 2, vae: str = "random") -> Any:  # fmt: skip
    """Save the tiny models as a diffusers pipeline folder (model_index.json, SPO's DDIM scheduler); returns the pipeline.

    What `hw spo-train --base FOLDER` loads in tests and in the demo, exactly as it loads a real model.
    ``vae="near_identity"`` swaps the random VAE for :func:`near_identity_vae` (latent channels 0–2 decode to
    RGB pixel by pixel), so a preference on image content (e.g. brightness) is one the UNet can move.
    """
    if vae not in ("random", "near_identity"):
        raise ValueError(f"vae must be 'random' or 'near_identity', got {vae!r}")
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = os.fspath(folder)
    m = build_tiny_models(os.path.join(folder, "_tokenizer_src"), sdxl=sdxl, seed=seed, full_layout=full_layout, levels=levels)
    if vae == "near_identity":
        m.vae = near_identity_vae(m.unet.config.sample_size)
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


def near_identity_vae(sample_size: int = 16) -> Any:
    """A tiny AutoencoderKL (no downsampling) whose decode(encode(x)) is a monotone per-pixel map of x,
    as a trained VAE's reconstruction is close to x — a random one scrambles images beyond recognition.

    Every resnet passes its input through (conv2 = 0); channels 3.. carry large constants so that the
    GroupNorm statistics hardly depend on the image, and its affine part undoes the normalisation.
    """
    import torch
    from diffusers import AutoencoderKL

    ch = 32
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(ch,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=1, sample_size=sample_size, scaling_factor=1.0,
                        mid_block_add_attention=False)  # fmt: skip
    const = torch.zeros(ch)
    const[3:] = torch.tensor([50.0 if i % 2 == 0 else -50.0 for i in range(ch - 3)])
    mean, std = const.mean(), (const.pow(2).mean() - const.mean() ** 2).sqrt()
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        for m in vae.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.fill_(float(std))
                m.bias.fill_(float(mean))
        for conv in (vae.encoder.conv_in, vae.encoder.conv_out, vae.quant_conv, vae.post_quant_conv,
                     vae.decoder.conv_in, vae.decoder.conv_out):  # fmt: skip
            k = conv.weight.shape[-1] // 2
            for c in range(3):
                conv.weight[c, c, k, k] = 1.0
        vae.encoder.conv_in.bias.copy_(const)
        vae.decoder.conv_in.bias.copy_(const)
        vae.encoder.conv_out.bias[4:] = -30.0  # log-variance: a (near) deterministic latent
        vae.quant_conv.weight[4:, 4:, 0, 0] = torch.eye(4)
    return vae


def save_tiny_sd15_denoiser(folder: str | os.PathLike[str], *, resolution: int = 16) -> Path:
    """A tiny SD1.5-shaped diffusers pipeline (UNet, near-identity VAE, CLIP text encoder, tokenizer, DDIM)
    saved to ``folder``; its UNet predicts ε ≈ 0, so x̂0 keeps the clean latent plus the shared noise, as a
    good denoiser would at low t. The base model of `hw spm-train` tests."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tests.kit.tokenizer import write_tiny_clip_tokenizer

    d = Path(folder)
    write_tiny_clip_tokenizer(d / "_tok")
    tok = CLIPTokenizer.from_pretrained(str(d / "_tok"))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=resolution, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8)  # fmt: skip
    vae = near_identity_vae(resolution)
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.01)
        unet.conv_out.bias.zero_()
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id))  # fmt: skip
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    pipe.save_pretrained(d)
    return d
