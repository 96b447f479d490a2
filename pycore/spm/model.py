"""The step-aware preference model (SPM): CLIP with DiT-style adaLN timestep conditioning.

Architecture (SPO paper, official code RockeyCoss/SPO): a Hugging Face ``CLIPModel`` whose vision
tower is conditioned on the diffusion timestep t (0 = clean image, up to 999):

* ``t_embedder``: sinusoidal embedding of t, 256 dims, ``[cos(t·f_k), sin(t·f_k)]`` (cos first) with
  ``f_k = exp(-ln(10000)·k/128)``, then Linear(256→H), SiLU, Linear(H→H) → c.
* every vision encoder layer: ``adaLN_modulation = Sequential(SiLU, Linear(H, 6H))`` giving
  shift/scale/gate for attention and MLP; ``h = x + gate_msa·Attn(modulate(LN1(x)))``,
  ``out = h + gate_mlp·MLP(modulate(LN2(h)))``.
* pooled output: ``post_layernorm(token 0)`` then a final ``adaLN_modulation`` (SiLU, Linear(H, 2H);
  shift first): ``pooled·(1+scale)+shift``, then ``visual_projection``.

The modules here reuse the CLIP submodules (attention, MLP, layer norms, embeddings, text tower) so
state-dict keys are the HF ``CLIPModel`` keys 1:1 plus the added ones; the wrapper keeps them under
``model.`` like the released ``.bin`` checkpoints. Score = ``logit_scale.exp() · cos(image, text)``.

Loading and saving (``from_pretrained`` / ``save_pretrained``) live in :mod:`pycore.spm.checkpoints`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from pycore.errors import HwError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image as PILImage

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FREQ_DIM = 256
MAX_PERIOD = 10000
#: Timesteps at which the SPO authors report SPM accuracy.
EVAL_TIMESTEPS = (0, 251, 501, 701, 951)

DEFAULT_BASE = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class SPMLoadError(HwError):
    """A checkpoint that is not a step-aware preference model matching the configuration."""


# --------------------------------------------------------------------------------------------- math


def timestep_embedding(t: torch.Tensor, dim: int = FREQ_DIM, max_period: int = MAX_PERIOD) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t·f_k), sin(t·f_k)]``, ``f_k = exp(-ln(max_period)·k/half)``; fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.reshape(-1).to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x·(1+scale)+shift`` on every token (shift/scale are per sample: [B, H])."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def preprocess_images(
    images: torch.Tensor,
    size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """The official SPM preprocessing on a [B, 3, H, W] batch in [-1, 1] (any device), → fp32.

    Resize the shortest side to ``size`` (bicubic, align_corners=False, sides rounded half up),
    centre-crop ``size``×``size`` (torchvision's offsets), map to [0, 1] (clamped), normalise.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise HwError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
    x = images.float()
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False)
    if new_h != new_w or new_h != size:
        top = int(round((new_h - size) / 2.0))
        left = int(round((new_w - size) / 2.0))
        x = x[..., top : top + size, left : left + size]
    x = (x / 2 + 0.5).clamp(0, 1)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def pil_to_tensor(images: Sequence[PILImage.Image]) -> list[torch.Tensor]:
    """PIL images → list of [3, H, W] fp32 tensors in [-1, 1] (RGB)."""
    import numpy as np

    out = []
    for im in images:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)
        out.append(torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0)
    return out


# -------------------------------------------------------------------------------------------- modules


class TimestepEmbedder(nn.Module):
    """t → c: sinusoidal features (256), Linear, SiLU, Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = FREQ_DIM):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class AdaLNEncoderLayer(nn.Module):
    """A CLIP encoder layer (its own attention/MLP/norm modules) with adaLN modulation from c."""

    def __init__(self, clip_layer: nn.Module, hidden_size: int):
        super().__init__()
        self.self_attn = clip_layer.self_attn
        self.layer_norm1 = clip_layer.layer_norm1
        self.mlp = clip_layer.mlp
        self.layer_norm2 = clip_layer.layer_norm2
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        h, _ = self.self_attn(hidden_states=modulate(self.layer_norm1(x), shift_msa, scale_msa), attention_mask=None)
        x = x + gate_msa.unsqueeze(1) * h
        h = self.mlp(modulate(self.layer_norm2(x), shift_mlp, scale_mlp))
        return x + gate_mlp.unsqueeze(1) * h


class AdaLNEncoder(nn.Module):
    def __init__(self, layers: list[AdaLNEncoderLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class AdaLNVisionTransformer(nn.Module):
    """CLIP's vision tower with adaLN on every layer and on the pooled output."""

    def __init__(self, clip_vision: nn.Module, hidden_size: int):
        super().__init__()
        self.embeddings = clip_vision.embeddings
        self.pre_layrnorm = clip_vision.pre_layrnorm
        self.encoder = AdaLNEncoder([AdaLNEncoderLayer(layer, hidden_size) for layer in clip_vision.encoder.layers])
        self.post_layernorm = clip_vision.post_layernorm
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))
        self.gradient_checkpointing = False

    def forward(self, pixel_values: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.encoder.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                x = checkpoint(layer, x, c, use_reentrant=False)
            else:
                x = layer(x, c)
        pooled = self.post_layernorm(x[:, 0, :])
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return pooled * (1 + scale) + shift


class TimeConditionedCLIP(nn.Module):
    """HF CLIPModel's modules rearranged: unchanged text tower, time-conditioned vision tower."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.config = clip.config
        hidden = clip.config.vision_config.hidden_size
        self.text_model = clip.text_model
        self.vision_model = AdaLNVisionTransformer(clip.vision_model, hidden)
        self.visual_projection = clip.visual_projection
        self.text_projection = clip.text_projection
        self.logit_scale = clip.logit_scale
        self.t_embedder = TimestepEmbedder(hidden)

    @torch.no_grad()
    def init_time_modules(self, seed: int | None = 0) -> None:
        """Identity init: adaLN weights/biases zero except gate biases one; t_embedder N(0, 0.02)."""
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(seed)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            w = torch.empty(lin.weight.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen)
            lin.weight.copy_(w)
            lin.bias.zero_()
        for layer in self.vision_model.encoder.layers:
            lin = layer.adaLN_modulation[1]
            h = lin.weight.shape[1]
            lin.weight.zero_()
            lin.bias.zero_()
            lin.bias[2 * h : 3 * h] = 1
            lin.bias[5 * h :] = 1
        final = self.vision_model.adaLN_modulation[1]
        final.weight.zero_()
        final.bias.zero_()

    def get_image_features(self, pixel_values: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        c = self.t_embedder(timesteps.to(pixel_values.device))
        pooled = self.vision_model(pixel_values.to(self.visual_projection.weight.dtype), c)
        return self.visual_projection(pooled)

    def get_text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.text_model(input_ids=input_ids)
        return self.text_projection(out.pooler_output)


# -------------------------------------------------------------------------------------------- the model


def _short_list(keys: Sequence[str], n: int = 4) -> str:
    keys = sorted(keys)
    more = f", … {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


class StepAwarePreferenceModel(nn.Module):
    """The SPM plus its tokenizer and preprocessing. Keys live under ``model.`` (released layout)."""

    def __init__(self, model: TimeConditionedCLIP, tokenizer, *, image_size: int | None = None,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):  # fmt: skip
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.image_size = int(image_size or model.config.vision_config.image_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.max_length = int(model.config.text_config.max_position_embeddings)

    # ---- construction

    @classmethod
    def from_clip(cls, clip: nn.Module, tokenizer, *, seed: int | None = 0) -> StepAwarePreferenceModel:
        """Wrap a HF CLIPModel (its modules are reused, not copied) with identity-initialised time modules."""
        param = next(clip.parameters())
        tc = TimeConditionedCLIP(clip)
        tc.t_embedder.to(device=param.device)
        for layer in tc.vision_model.encoder.layers:
            layer.adaLN_modulation.to(device=param.device)
        tc.vision_model.adaLN_modulation.to(device=param.device)
        tc.init_time_modules(seed)
        return cls(tc.to(dtype=param.dtype), tokenizer)

    @classmethod
    def from_config(cls, clip_config, tokenizer, *, seed: int | None = 0) -> StepAwarePreferenceModel:
        """A randomly initialised CLIP from ``clip_config`` at identity time conditioning."""
        from transformers import CLIPModel

        if seed is not None:
            torch.manual_seed(seed)
        return cls.from_clip(CLIPModel(clip_config).eval(), tokenizer, seed=seed)

    @classmethod
    def from_state_dict(cls, clip_config, tokenizer, state_dict: dict[str, torch.Tensor], *,
                        source: str = "checkpoint") -> StepAwarePreferenceModel:  # fmt: skip
        """Build the model on the meta device and take every tensor from ``state_dict`` (strictly)."""
        from transformers import CLIPModel

        with torch.device("meta"):
            clip = CLIPModel(clip_config)
            spm = cls(TimeConditionedCLIP(clip), tokenizer)
        spm.load_spm_state_dict(state_dict, source=source, assign=True)
        spm._restore_buffers()
        return spm.eval()

    def _restore_buffers(self) -> None:
        """Non-persistent buffers (position_ids) are not in checkpoints; rebuild them after a meta build."""
        for name, mod in self.named_modules():
            buf = getattr(mod, "position_ids", None)
            if isinstance(buf, torch.Tensor) and buf.is_meta:
                n = buf.shape[-1]
                mod.register_buffer("position_ids", torch.arange(n).expand((1, -1)), persistent=False)
        left = [n for n, t in list(self.named_parameters()) + list(self.named_buffers()) if t.is_meta]
        if left:
            raise SPMLoadError(f"tensors left uninitialised after loading: {_short_list(left)}")

    def load_spm_state_dict(self, state_dict: dict[str, torch.Tensor], *, source: str = "checkpoint",
                            assign: bool = False) -> None:  # fmt: skip
        """Load released-layout keys (``model.`` prefix optional); every key must be accounted for."""
        if not state_dict:
            raise SPMLoadError(f"{source} holds no tensors")
        if not any(k.startswith("model.") for k in state_dict):
            state_dict = {f"model.{k}": v for k, v in state_dict.items()}
        expected = self.state_dict()
        # transformers < 4.31 saved the position_ids buffers; they are accounted for, not loaded.
        legacy = {k for k in state_dict if k.endswith("embeddings.position_ids") and k not in expected}
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected and k not in legacy]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing key(s): {_short_list(missing)}")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected key(s): {_short_list(unexpected)}")
            raise SPMLoadError(f"{source} is not a step-aware preference model for this CLIP config ({'; '.join(parts)})")
        for k, v in expected.items():
            if tuple(state_dict[k].shape) != tuple(v.shape):
                raise SPMLoadError(f"{source}: {k} has shape {tuple(state_dict[k].shape)}, expected {tuple(v.shape)} "
                                   "(wrong base config? pass the CLIP the checkpoint was trained from)")  # fmt: skip
        sd = {k: v for k, v in state_dict.items() if k not in legacy}
        self.load_state_dict(sd, strict=True, assign=assign)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str], **kw: Any) -> StepAwarePreferenceModel:
        """Load an SPM or a plain CLIP; see :func:`pycore.spm.checkpoints.load_spm` for names and options."""
        from pycore.spm.checkpoints import load_spm

        return load_spm(name_or_path, **kw)

    def save_pretrained(self, folder: str | os.PathLike[str], *, extra: dict[str, Any] | None = None,
                        overwrite: bool = False) -> Path:  # fmt: skip
        """Write an hw SPM folder; see :func:`pycore.spm.checkpoints.save_spm`."""
        from pycore.spm.checkpoints import save_spm

        return save_spm(self, folder, extra=extra, overwrite=overwrite)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.visual_projection.weight.dtype

    def set_gradient_checkpointing(self, on: bool = True) -> None:
        self.model.vision_model.gradient_checkpointing = on

    # ---- inputs

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt").input_ids  # fmt: skip
        return ids.to(self.device)

    def preprocess(self, images: torch.Tensor | Sequence[Any]) -> torch.Tensor:
        """[B,3,H,W] in [-1, 1] (or a list of PIL images / [3,H,W] tensors) → normalised 224² pixels."""
        if isinstance(images, torch.Tensor):
            return preprocess_images(images.to(self.device), self.image_size, self.mean, self.std)
        items = list(images)
        tensors = [t if isinstance(t, torch.Tensor) else pil_to_tensor([t])[0] for t in items]
        out = [preprocess_images(t.unsqueeze(0).to(self.device), self.image_size, self.mean, self.std) for t in tensors]
        return torch.cat(out) if out else torch.empty(0, 3, self.image_size, self.image_size, device=self.device)

    def _timesteps(self, timesteps: int | Sequence[int] | torch.Tensor, n: int) -> torch.Tensor:
        t = torch.as_tensor(timesteps, device=self.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(n)
        if t.numel() != n:
            raise HwError(f"got {t.numel()} timesteps for {n} images")
        return t

    def _prompts(self, prompts: str | Sequence[str], n: int) -> list[str]:
        ps = [prompts] * n if isinstance(prompts, str) else list(prompts)
        if len(ps) == 1 and n > 1:
            ps = ps * n
        if len(ps) != n:
            raise HwError(f"got {len(ps)} prompts for {n} images")
        return ps

    # ---- features and scores

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings (fp32); reuse them across candidates of the same prompts."""
        f = self.model.get_text_features(self.tokenize(prompts)).float()
        return f / f.norm(dim=-1, keepdim=True)

    def image_embeds(self, pixel_values: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings (fp32) of preprocessed pixels at timesteps t."""
        f = self.model.get_image_features(pixel_values, timesteps).float()
        return f / f.norm(dim=-1, keepdim=True)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Scores for preprocessed pixels, token ids and timesteps (the differentiable training path).

        ``pixel_values`` may hold k×B images for B prompts (k stacked batches sharing the prompts).
        """
        img = self.image_embeds(pixel_values, timesteps)
        txt = self.model.get_text_features(input_ids).float()
        txt = txt / txt.norm(dim=-1, keepdim=True)
        if img.shape[0] != txt.shape[0]:
            if img.shape[0] % txt.shape[0]:
                raise HwError(f"got {img.shape[0]} images for {txt.shape[0]} prompts")
            txt = txt.repeat(img.shape[0] // txt.shape[0], 1)  # [img0 batch, img1 batch] share the prompts
        return self.model.logit_scale.float().exp() * (img * txt).sum(-1)

    def score(
        self,
        images: torch.Tensor | Sequence[Any],
        prompts: str | Sequence[str],
        timesteps: int | Sequence[int] | torch.Tensor = 0,
        *,
        text_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``logit_scale.exp()·cos(image, text)`` per image (fp32, shape [B]); images in [-1, 1] or PIL."""
        pixels = self.preprocess(images)
        n = pixels.shape[0]
        t = self._timesteps(timesteps, n)
        txt = text_embeds if text_embeds is not None else self.text_embeds(self._prompts(prompts, n))
        if txt.shape[0] == 1 and n > 1:
            txt = txt.expand(n, -1)
        img = self.image_embeds(pixels, t)
        return self.model.logit_scale.float().exp() * (img * txt.to(img.device)).sum(-1)

    @torch.no_grad()
    def score_latents(
        self,
        latents: torch.Tensor,
        vae: nn.Module,
        prompts: str | Sequence[str],
        timesteps: int | Sequence[int] | torch.Tensor,
        *,
        text_embeds: torch.Tensor | None = None,
        decode_batch_size: int | None = None,
    ) -> torch.Tensor:
        """Decode scaled latents (x̂0) with ``vae`` and score them at ``timesteps``; no graph is kept."""
        from pycore.diffusion.vae import decode_latents

        images = decode_latents(vae, latents, batch_size=decode_batch_size)
        return self.score(images, prompts, timesteps, text_embeds=text_embeds)
