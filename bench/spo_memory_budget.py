"""Paper estimate of the accelerator memory of `hw spo-train` on real SDXL at 1024², per option set.

    python bench/spo_memory_budget.py [--no-check-autocast]

Nothing is downloaded and no real memory is used: every model is built from its published
configuration on PyTorch's ``meta`` device (shapes and dtypes, no data), so

* **weights** are exact parameter counts × bytes per parameter: the SDXL UNet, CLIP ViT-L/14 and
  OpenCLIP bigG/14 text encoders (tests.kit.sdxl_arch), the SDXL VAE, the step-aware preference model
  (PickScore_v1 = CLIP ViT-H/14, vision + text towers, plus the t_embedder and the adaLN layers of
  pycore.spm.model), and the rank-64 LoRA that pycore.spo.train_step.add_spo_lora adds with
  peft (to_q, to_k, to_v, to_out.0);
* **activations** are *simulated*: each phase of a run (one rollout UNet call, the decode + SPM
  scoring of the k × batch candidates, one training micro-step: reference forward, policy forward,
  loss, backward) is executed on meta tensors while a TorchDispatchMode follows every tensor
  storage the phase allocates and frees (weak references on the storages, as PyTorch's own
  MemTracker does). The peak of live bytes is what the phase needs on top of the resident weights.
  Backward and gradient-checkpoint recomputation run for real on meta tensors.

What the simulation has to assume, since meta tensors have no CUDA kernels:

* **Attention** is computed as on a GPU with PyTorch ≥ 2.0's scaled_dot_product_attention: the
  flash kernel (fp16/bf16, head dim ≤ 256: the UNet's 64-wide heads) or the memory-efficient one
  (fp32, or the VAE's single 512-wide head); both keep O(tokens) state for backward, never the
  tokens² score matrix. (Without them — old PyTorch, no xformers — the math path would need e.g.
  8 × 10 × 4096² × 2 bytes = 2.7 GB per attention layer at 1024², and would not fit anything.)
* **Mixed precision** (``--mixed-precision fp16/bf16``: accelerate's autocast) is emulated with a
  TorchFunctionMode that applies CUDA autocast's cast lists (matmul/linear/conv/attention in half;
  group_norm, layer_norm, softmax, upsampling, exp/pow/sum etc. in fp32) *above* autograd, so the
  casts are recorded and saved exactly as real autocast's are. A check (skipped with
  ``--no-check-autocast``) compares the bytes saved for backward by a full SDXL UNet forward under
  the emulation with real CUDA autocast on fake CUDA tensors (FakeTensorMode: no GPU is needed for
  a forward); they agree exactly.
* The official code (RockeyCoss/SPO, train_spo_sdxl.py + the SDXL config) is modelled as it runs:
  fp16 UNet with the LoRA upcast to fp32 and a fp16 deep copy as the reference; its own
  ``autocast`` is a no-op for LoRA training, but ``accelerator.prepare(unet)`` wraps the policy
  UNet's forward in fp16 autocast anyway (sampling and training), while the copy, the VAE and the
  SPM run without it; win and lose in two CFG forwards of 2 × train batch each; text encoders fp16
  on the GPU; the fp16-fix VAE in fp16 decoding all k × batch candidates at once; the SPM in fp32;
  no gradient checkpointing (``use_checkpointing = False``); torch AdamW.

The same meta models also give the **compute** of one SPO batch (torch.utils.flop_counter: matmuls,
convolutions and attention, forward and backward) split into sampling, decoding, scoring and
training, and the throughput the paper's 29.5 A100-hours imply.

Ignored (so real peaks are higher): the CUDA context and cuBLAS/cuDNN workspaces (~0.5–1 GB),
the caching allocator's fragmentation and rounding (often 5–15 %), the optimizer step's own
temporaries (after backward, when activations are freed), and what other processes hold.
Stored transitions and prompt embeddings are a few MB at these batch sizes.

Also tabulated: the decode + score peak of the 4 candidates at 1024² for VAE dtypes, slicing,
tiling (diffusers' default tile and 512² tiles) and with or without autocast around the scorer.

Output: markdown tables on stdout and in bench/out/spo_budget.md, every figure in
bench/out/spo_budget.json. Takes about 3 minutes of one core and ~1.3 GB of RAM.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import platform
import sys
import time
import weakref
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from torch.utils.weak import WeakIdKeyDictionary  # noqa: E402

from pycore.spo.config import from_preset  # noqa: E402
from tests.kit.sdxl_arch import CLIP_G, CLIP_L, UNET, VAE  # noqa: E402

GiB = 2**30
META = torch.device("meta")
#: The real SDXL VAE config.json also has these (tests.kit.sdxl_arch.VAE leaves them at diffusers' defaults);
#: sample_size sets the tile size of enable_tiling().
VAE_EXTRA = dict(sample_size=1024, scaling_factor=0.13025)
#: PickScore_v1 = laion/CLIP-ViT-H-14-laion2B-s32B-b79K's architecture (transformers CLIPConfig).
PICKSCORE = dict(
    text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, vocab_size=49408,
                     max_position_embeddings=77, hidden_act="gelu"),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
                       patch_size=14, hidden_act="gelu"),
    projection_dim=1024,
)  # fmt: skip


def log(msg: str = "") -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ tracking


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storages allocated inside the context and still alive; keeps the peak.

    Every op output's storage is recorded once with a weak reference whose callback subtracts its
    size when PyTorch frees it (after its last view and its last use by autograd are gone). Outputs
    that share an input's storage (views such as a weight's transpose, in-place results) are not
    allocations and are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.cur = 0
        self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def _freed(self, n: int, _ref: Any) -> None:
        self.cur -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        inputs = {id(a.untyped_storage()) for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st in self._seen or id(st) in inputs:  # known, or a view / in-place result of an input (e.g. a weight's .t())
                    continue
                n = st.nbytes()
                self._seen[st] = weakref.ref(st, functools.partial(self._freed, n))
                self.cur += n
                self.peak = max(self.peak, self.cur)
        return out


_LOWER = {"linear", "conv1d", "conv2d", "conv3d", "conv_transpose2d", "matmul", "__matmul__", "mm", "bmm", "baddbmm", "addmm",
          "addbmm", "einsum", "prelu", "scaled_dot_product_attention"}  # fmt: skip
_FP32 = {"group_norm", "layer_norm", "exp", "expm1", "log", "log1p", "log2", "log10", "pow", "__pow__", "rsqrt", "reciprocal",
         "interpolate", "softplus", "logsumexp", "mse_loss", "cosine_similarity", "norm", "acos", "asin", "cosh", "sinh", "tan",
         "erfinv"}  # fmt: skip
_FP32_OUT = {"softmax", "log_softmax", "sum", "prod", "cumsum", "cumprod", "vector_norm"}
_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


class GPUSemantics(TorchFunctionMode):
    """What meta tensors lack to behave like an SDXL run on a GPU.

    * attention: scaled_dot_product_attention → the flash (half, head dim ≤ 256) or memory-efficient
      aten kernel, whose autograd saves O(tokens) state, as on a CUDA device;
    * ``autocast=dtype``: CUDA autocast's per-op casts (lists as in ATen's autocast_mode), applied
      above autograd so the casts are recorded and saved as real autocast's are.
    """

    def __init__(self, autocast: torch.dtype | None = None):
        super().__init__()
        self.autocast = autocast

    def fresh(self) -> GPUSemantics:
        return GPUSemantics(self.autocast)

    @contextlib.contextmanager
    def autocast_off(self):
        """Run a block without the autocast casts (a module that is not under autocast, e.g. the official reference copy)."""
        saved, self.autocast = self.autocast, None
        try:
            yield
        finally:
            self.autocast = saved

    def _cast(self, args: Any, kwargs: dict, dtype: torch.dtype) -> tuple[Any, dict]:
        def c(x: Any) -> Any:
            if isinstance(x, torch.Tensor) and x.dtype in _FLOAT and x.dtype != dtype:
                return x.to(dtype)
            if isinstance(x, (list, tuple)):
                return type(x)(c(v) for v in x)
            return x

        return c(args), {k: c(v) for k, v in kwargs.items()}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if self.autocast is not None:
            first = next((a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)), None)
            if name in _LOWER:
                args, kwargs = self._cast(args, kwargs, self.autocast)
            elif name in _FP32_OUT:  # autocast's "fp32_set_opt_dtype": computed and returned in fp32, input not copied
                if first is not None and first.dtype in (torch.float16, torch.bfloat16) and kwargs.get("dtype") is None:
                    kwargs["dtype"] = torch.float32
            elif name in _FP32:
                args, kwargs = self._cast(args, kwargs, torch.float32)
        if func is F.scaled_dot_product_attention:
            a = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"), args), **kwargs)
            q, k, v = a["query"], a["key"], a["value"]
            if a.get("attn_mask") is None and not a.get("is_causal") and not a.get("dropout_p") and not a.get("enable_gqa"):
                if q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
                    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=a.get("scale"))[0]
                need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
                return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, need_grad, scale=a.get("scale"))[0]
        return func(*args, **kwargs)


def checkpoint_func(sem: GPUSemantics):
    """diffusers' gradient-checkpointing function (non-reentrant torch checkpoint) with the same GPU semantics on recompute."""
    from torch.utils.checkpoint import checkpoint

    def run(module: Any, *args: Any) -> Any:
        return checkpoint(module.__call__, *args, use_reentrant=False, preserve_rng_state=False,
                          context_fn=lambda: (contextlib.nullcontext(), sem.fresh()))  # fmt: skip

    return run


# ------------------------------------------------------------------------------------------ models


def count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def build_unet(dtype: torch.dtype):
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    with META:
        return UNet2DConditionModel(**UNET).to(dtype)


def build_text_encoders():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with META:
        return CLIPTextModel(CLIPTextConfig(**CLIP_L)), CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))


def build_vae(dtype: torch.dtype):
    from diffusers import AutoencoderKL

    with META:
        return AutoencoderKL(**VAE, **VAE_EXTRA).to(dtype)


def build_spm(dtype: torch.dtype):
    from transformers import CLIPConfig, CLIPModel

    from pycore.spm.model import StepAwarePreferenceModel, TimeConditionedCLIP

    with META:
        clip = CLIPModel(CLIPConfig(**PICKSCORE))
        spm = StepAwarePreferenceModel(TimeConditionedCLIP(clip), tokenizer=None).to(dtype)
    return spm.eval()


def add_lora(unet, cfg):
    from pycore.spo.train_step import add_spo_lora

    return add_spo_lora(unet, cfg)


def parameter_counts(cfg) -> dict[str, Any]:
    unet = build_unet(torch.float16)
    te1, te2 = build_text_encoders()
    vae = build_vae(torch.float16)
    spm = build_spm(torch.float32)
    tc = spm.model
    time_params = count(tc.t_embedder) + sum(count(layer.adaLN_modulation) for layer in tc.vision_model.encoder.layers)
    time_params += count(tc.vision_model.adaLN_modulation)
    n_unet = count(unet)
    lora = add_lora(unet, cfg)
    lora_modules = sum(1 for n, _ in unet.named_modules() if n.endswith(".lora_A"))
    return {
        "unet": n_unet, "text_encoder (CLIP ViT-L/14)": count(te1), "text_encoder_2 (OpenCLIP bigG/14 + projection)": count(te2),
        "vae": count(vae), "vae_decoder (+ post_quant_conv)": count(vae.decoder) + count(vae.post_quant_conv),
        "spm (PickScore_v1 CLIP ViT-H/14 + time modules)": count(spm), "spm_vision_tower (with its adaLN)": count(tc.vision_model) + count(tc.visual_projection),
        "spm_text_tower": count(tc.text_model) + count(tc.text_projection), "spm_time_modules (t_embedder + adaLN)": time_params,
        f"lora (rank {cfg.lora_rank}, {len(cfg.lora_targets)} targets)": sum(p.numel() for p in lora), "lora_wrapped_linears": lora_modules,
    }  # fmt: skip


# ------------------------------------------------------------------------------------------ phases


@dataclass(frozen=True)
class Phase:
    """Settings that change what a phase allocates."""

    unet_dtype: str = "float16"
    autocast: str | None = "float16"  # accelerate's autocast around the (prepared) policy UNet; None = fp32 weights
    checkpointing: bool = False
    official: bool = False  # official structure: win and lose in separate CFG forwards, reference = a copy without autocast
    vae_dtype: str = "float32"
    decode: str = "batched"  # batched | sliced | tiled (512² tiles) | tiled_default (diffusers' default tile = 1024²)
    spm_dtype: str = "float32"
    train_batch_size: int = 2
    score_autocast: bool = True  # hw scores inside the rollout's autocast (official: outside)


def _dt(name: str | None) -> torch.dtype | None:
    return None if name is None else {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def _cond(n: int, unet: Any):
    """Zero conditioning for ``n`` latents, shaped for ``unet`` (SDXL: embeddings 77 × 2048, pooled 1280, 6 time ids)."""
    from pycore.diffusion.text import Conditioning, sdxl_time_ids

    c = unet.config
    d, pooled = c.cross_attention_dim, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    return Conditioning(embeds=torch.zeros(n, 77, d, device=META), neg_embeds=torch.zeros(1, 77, d, device=META),
                        pooled=torch.zeros(n, pooled, device=META), neg_pooled=torch.zeros(1, pooled, device=META),
                        time_ids=sdxl_time_ids(1024, 1024, n).to(META))  # fmt: skip


def sim_sampling(unet, cfg, ph: Phase, latent: tuple[int, ...]) -> dict[str, float]:
    """One rollout UNet call at a branch (k × sample batch latents, CFG doubles the UNet batch), no grad."""
    from pycore.diffusion.text import cfg_eps
    from pycore.diffusion.schedule import NoiseSchedule, ddim_step, sample_prev

    n = cfg.num_candidates * cfg.sample_batch_size
    cond = _cond(n, unet)
    x = torch.zeros(n, *latent, device=META)
    ac = NoiseSchedule().alphas_cumprod()
    sem = GPUSemantics(_dt(ph.autocast))
    with torch.no_grad(), sem, LiveBytes() as tr:
        eps = cfg_eps(unet, x, 551, cond, cfg.guidance_scale)
        x = sample_prev(ddim_step(eps, x, 551, ac, cfg.step_ratio, cfg.eta))
        del eps
    return {"peak": tr.peak, "unet_batch": 2 * n}


def sim_scoring(vae, spm, cfg, ph: Phase, latent: tuple[int, ...]) -> dict[str, float]:
    """Decode the k × batch candidates' x̂0 with the VAE and score them with the SPM (pycore's scorer path)."""
    n = cfg.num_candidates * cfg.sample_batch_size
    x0 = torch.zeros(n, *latent, device=META)
    text = torch.zeros(n, spm.model.config.projection_dim, device=META)
    vae.use_tiling = "tiled" in ph.decode
    if ph.decode.endswith("tiled"):  # 512² tiles (64² latents); diffusers' default is the VAE's sample_size (1024² for SDXL)
        vae.tile_sample_min_size, vae.tile_latent_min_size = 512, 64
    else:
        vae.tile_sample_min_size, vae.tile_latent_min_size = VAE_EXTRA["sample_size"], VAE_EXTRA["sample_size"] // 8
    bs = 1 if ph.decode.startswith("sliced") else None
    sem = GPUSemantics(_dt(ph.autocast) if ph.score_autocast else None)  # hw scores inside the rollout's autocast; the official code outside it
    from pycore.diffusion.vae import decode_latents

    with torch.no_grad(), sem, LiveBytes() as dec:
        images = decode_latents(vae, x0, batch_size=bs)
        after_decode = dec.cur
    with torch.no_grad(), sem, LiveBytes() as sc:
        spm.score(images, ["p"] * n, torch.full((n,), 551, device=META), text_embeds=text)
    del images
    vae.use_tiling = False
    return {"decode_peak": dec.peak, "images": after_decode, "spm_peak": sc.peak, "peak": max(dec.peak, after_decode + sc.peak),
            "decoded_images": n}  # fmt: skip


def sim_training(unet, ref, params, cfg, ph: Phase, latent: tuple[int, ...]) -> dict[str, float]:
    """One training micro-step on train_batch_size transitions: reference, policy, loss, backward.

    Gradients of the LoRA are allocated beforehand (outside the count) — the state of the second
    micro-step of gradient accumulation; they are budgeted with the LoRA.
    """
    from pycore.diffusion.text import cfg_eps
    from pycore.diffusion.schedule import NoiseSchedule, ddim_step, log_prob
    from pycore.spo.losses import spo_dpo_loss
    from pycore.spo.train_step import adapters_disabled, transition_logprob

    cfg = cfg.replace(train_batch_size=ph.train_batch_size)
    n = cfg.train_batch_size
    ac = NoiseSchedule().alphas_cumprod()
    sem = GPUSemantics(_dt(ph.autocast))
    if ph.checkpointing:
        unet.enable_gradient_checkpointing(checkpoint_func(sem))
    else:
        unet.disable_gradient_checkpointing()
    unet.train()
    for p in params:
        p.grad = torch.zeros_like(p)
    xs = {k: torch.zeros(n, *latent, device=META) for k in ("x_t_w", "x_n_w", "x_t_l", "x_n_l")}
    t = torch.full((n,), 551, device=META, dtype=torch.long)
    out: dict[str, float] = {}
    with sem, LiveBytes() as tr:
        if not ph.official:  # hw: pycore.spo.train_step.spo_loss without its finiteness checks (no values on meta)
            x_t = torch.cat([xs["x_t_w"], xs["x_t_l"]])
            x_next = torch.cat([xs["x_n_w"], xs["x_n_l"]])
            c2 = _cond(2 * n, unet)
            tt = torch.cat([t, t])
            with torch.no_grad(), adapters_disabled(unet):
                lp_ref = transition_logprob(unet, x_t, x_next, tt, c2, cfg, ac)
            lp = transition_logprob(unet, x_t, x_next, tt, c2, cfg, ac)
            loss, _ = spo_dpo_loss(lp[:n], lp_ref[:n], lp[n:], lp_ref[n:], beta=cfg.beta, clip=cfg.clip_range)
            out["unet_batch_with_grad"] = 4 * n
        else:  # RockeyCoss/SPO train_spo_sdxl.py: policy and copy, win then lose, each one CFG forward of 2n
            c = _cond(n, unet)
            lps = []
            for xt, xn in ((xs["x_t_w"], xs["x_n_w"]), (xs["x_t_l"], xs["x_n_l"])):
                pol = ddim_step(cfg_eps(unet, xt, t, c, cfg.guidance_scale), xt, t, ac, cfg.step_ratio, cfg.eta)
                with sem.autocast_off():  # the copy is not accelerate-prepared: no autocast, and nothing in it needs grad
                    refs = ddim_step(cfg_eps(ref, xt, t, c, cfg.guidance_scale), xt, t, ac, cfg.step_ratio, cfg.eta)
                lps.append((log_prob(xn, pol), log_prob(xn, refs)))
                del pol, refs
            (w, wr), (lo, lr) = lps
            loss, _ = spo_dpo_loss(w, wr, lo, lr, beta=cfg.beta, clip=cfg.clip_range)
            out["unet_batch_with_grad"] = 2 * n
            out["forwards_with_grad"] = 2
        out["after_forward"] = tr.cur
        loss.backward()
        del loss
    unet.disable_gradient_checkpointing()
    for p in params:
        p.grad = None
    out["peak"] = tr.peak
    return out


def rollout_calls(cfg) -> list[int]:
    """Latents per UNet call of one spo_rollout (CFG doubles each), following its control flow."""
    b, k, inner, steps = cfg.sample_batch_size, cfg.num_candidates, cfg.num_inner_step, cfg.num_inference_steps
    calls = [b] * cfg.divert_start_step
    branches = cfg.branch_steps()
    i, cached = cfg.divert_start_step, False
    while i < steps:
        if i not in branches:  # tail step; reuses the last judge's ε
            if not cached:
                calls.append(b)
            cached, i = False, i + 1
            continue
        if not cached:
            calls.append(b * k)
        calls += [b * k] * inner
        nxt = i + inner + 1
        cached = nxt < steps
        if cached:  # x̂0 of the candidates at the next segment start (reused for the next step)
            calls.append(b * k)
        i = nxt
    return calls


def compute_split(unet, params, vae, spm, cfg, latent: tuple[int, ...], autocast: torch.dtype | None = torch.float16,
                  acceptance: float = 1.0) -> dict[str, Any]:  # fmt: skip
    """FLOPs of one SPO batch (one rollout of sample_batch_size prompts + the training pass over its pairs).

    Counted with torch.utils.flop_counter on meta tensors (matmuls, convolutions, attention; forward
    and backward): one UNet call per latent, one VAE decode and one SPM image pass per image, one
    training micro-step; multiplied by the rollout's call structure (``rollout_calls``), the judged
    images (branches × batch × k) and the trained transitions (branches × (1 + inner) × batch ×
    ``acceptance``), micro-batches of train_batch_size.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from pycore.diffusion.text import cfg_eps

    sem = GPUSemantics(autocast)

    def flops(fn) -> int:
        fc = FlopCounterMode(display=False)
        with sem, fc:
            fn()
        return fc.get_total_flops()

    with torch.no_grad():
        unet_latent = flops(lambda: cfg_eps(unet, torch.zeros(1, *latent, device=META), 551, _cond(1, unet), cfg.guidance_scale))
        img = torch.zeros(1, *latent, device=META)
        from pycore.diffusion.vae import decode_latents

        vae.use_tiling = False

        decode_image = flops(lambda: decode_latents(vae, img))
        pix = torch.zeros(1, 3, spm.image_size, spm.image_size, device=META)
        spm_image = flops(lambda: spm.image_embeds(pix, torch.full((1,), 551, device=META)))
    ph = Phase(autocast=None if autocast is None else str(autocast).split(".")[-1], checkpointing=False)
    train = {}
    for ck in (False, True):
        fc = FlopCounterMode(display=False)
        ph2 = replace(ph, checkpointing=ck)
        train[ck] = _train_flops(unet, params, cfg, ph2, latent, fc)
    calls = rollout_calls(cfg)
    branches = len(cfg.branch_steps())
    images = branches * cfg.sample_batch_size * cfg.num_candidates
    transitions = branches * (1 + cfg.num_inner_step) * cfg.sample_batch_size * acceptance
    micro = transitions / cfg.train_batch_size
    out = {
        "per_unit": {"unet_call_per_latent_cfg": unet_latent, "vae_decode_per_image": decode_image, "spm_per_image": spm_image,
                     "train_micro_step": train[False], "train_micro_step_checkpointing": train[True]},
        "counts": {"unet_calls": len(calls), "unet_latents": sum(calls), "images_judged": images, "transitions": transitions,
                   "micro_steps": micro, "acceptance": acceptance},
        "flops": {"sampling": sum(calls) * unet_latent, "decode": images * decode_image, "spm": images * spm_image,
                  "training": micro * train[False], "training_checkpointing": micro * train[True]},
    }  # fmt: skip
    return out


def _train_flops(unet, params, cfg, ph: Phase, latent, counter) -> int:
    """FLOPs of one hw training micro-step (reference forward, policy forward, backward), counted by ``counter``."""
    import torch.utils.flop_counter  # noqa: F401

    from pycore.diffusion.schedule import NoiseSchedule
    from pycore.spo.losses import spo_dpo_loss
    from pycore.spo.train_step import adapters_disabled, transition_logprob

    n = cfg.train_batch_size
    ac = NoiseSchedule().alphas_cumprod()
    sem = GPUSemantics(_dt(ph.autocast))
    if ph.checkpointing:
        unet.enable_gradient_checkpointing(checkpoint_func(sem))
    unet.train()
    x = torch.zeros(2 * n, *latent, device=META)
    t = torch.full((2 * n,), 551, device=META, dtype=torch.long)
    c2 = _cond(2 * n, unet)
    try:
        with sem, counter:
            with torch.no_grad(), adapters_disabled(unet):
                lp_ref = transition_logprob(unet, x, x, t, c2, cfg, ac)
            lp = transition_logprob(unet, x, x, t, c2, cfg, ac)
            loss, _ = spo_dpo_loss(lp[:n], lp_ref[:n], lp[n:], lp_ref[n:], beta=cfg.beta, clip=cfg.clip_range)
            loss.backward()
    finally:
        unet.disable_gradient_checkpointing()
        for p in params:
            p.grad = None
    return counter.get_total_flops()


def check_autocast(cfg) -> dict[str, Any]:
    """Bytes saved for backward by one SDXL UNet training forward (batch 1, 128² latents): emulated vs real CUDA autocast."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from pycore.diffusion.text import cfg_eps

    res: dict[str, Any] = {}

    def saved_bytes(unet, cond, x, t, sem_mode):
        seen: dict[int, int] = {}
        params = {id(p.untyped_storage()) for p in unet.parameters()}

        def pack(tensor):
            sid = id(tensor.untyped_storage())
            if sid not in params:
                seen.setdefault(sid, tensor.untyped_storage().nbytes())
            return tensor

        with sem_mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
            eps = cfg_eps(unet, x, t, cond, 1.0)
        del eps
        return sum(seen.values())

    latent = (4, cfg.resolution // 8, cfg.resolution // 8)
    # emulation on meta
    unet = build_unet(torch.float16)
    add_lora(unet, cfg)
    res["emulated_bytes"] = saved_bytes(unet, _cond(1, unet), torch.zeros(1, *latent, device=META), 551,
                                        GPUSemantics(torch.float16))  # fmt: skip
    # real autocast on fake CUDA tensors (same model, parameters swapped for fake CUDA twins)
    fm = FakeTensorMode()
    cuda = torch.device("cuda")
    for m in unet.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(FakeTensor(fm, torch.empty(p.shape, dtype=p.dtype, device=META), cuda),
                                                         requires_grad=p.requires_grad)  # fmt: skip
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = FakeTensor(fm, torch.empty(b.shape, dtype=b.dtype, device=META), cuda)
    try:
        with fm:
            from pycore.diffusion.text import Conditioning, sdxl_time_ids

            cond = Conditioning(embeds=torch.zeros(1, 77, 2048, device=cuda), neg_embeds=torch.zeros(1, 77, 2048, device=cuda),
                                pooled=torch.zeros(1, 1280, device=cuda), neg_pooled=torch.zeros(1, 1280, device=cuda),
                                time_ids=sdxl_time_ids(1024, 1024, 1).to(cuda))  # fmt: skip
            x = torch.zeros(1, *latent, device=cuda)
            prev = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
            torch.set_autocast_enabled("cuda", True)  # torch.autocast() refuses without a GPU; the dispatch keys work on fake tensors
            torch.set_autocast_dtype("cuda", torch.float16)
            try:
                res["real_autocast_bytes"] = saved_bytes(unet, cond, x, 551, GPUSemantics(None))
            finally:
                torch.set_autocast_enabled("cuda", prev[0])
                torch.set_autocast_dtype("cuda", prev[1])
                torch.clear_autocast_cache()
        res["ratio"] = res["emulated_bytes"] / res["real_autocast_bytes"]
    except Exception as e:  # no CUDA build of torch, or fake-tensor limits: the emulation stays unchecked
        res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return res


# ------------------------------------------------------------------------------------------ budget


@dataclass
class Option:
    """One row of the budget table: the memory-relevant settings of a run."""

    name: str
    phase: Phase
    second_unet: bool = False
    text_encoders_resident: bool = True
    text_encoder_dtype: str = "float16"
    adam_bytes: float = 8.0  # optimizer state bytes per LoRA parameter (AdamW fp32: 8; 8-bit AdamW: 2 + block statistics)
    flags: str = ""
    offload_scorer: bool = False  # the SPM and VAE on the CPU during the training micro-steps (pycore.spo.trainer moves them)


BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
#: The official SDXL run (shared/reference/SPO.md): 4,000 prompts × 10 epochs on 4 A100s in about 29.5 hours.
PAPER = {"prompts": 4000, "gpus": 4, "hours": 29.5, "gpu": "A100", "peak_tflops_fp16": 312}
#: What a card of "N GB" leaves for tensors: N GiB minus the CUDA context and library workspaces.
CONTEXT_RESERVE = 1.0
CARDS = (80, 24, 16, 12)


def options() -> list[Option]:
    official = Phase(unet_dtype="float16", autocast="float16", official=True, vae_dtype="float16", spm_dtype="float32",
                     score_autocast=False)  # fmt: skip
    same = Phase(unet_dtype="float16", autocast="float16", vae_dtype="float16", spm_dtype="float32", score_autocast=False)
    ck = replace(same, checkpointing=True)
    return [
        Option("official code (RockeyCoss/SPO, SDXL config)", official, second_unet=True,
               flags="accelerate fp16; use_checkpointing False; fp16-fix VAE in fp16; SPM fp32"),
        Option("hw without mixed precision (`--mixed-precision no --vae-dtype float32 --memory off`: fp32 UNet, VAE, SPM)",
               Phase(unet_dtype="float32", autocast=None, score_autocast=False), text_encoders_resident=False, text_encoder_dtype="float32",
               flags="--mixed-precision no --vae-dtype float32 --memory off"),
        Option("hw, the official settings (reference = LoRA disabled)", same,
               flags="--mixed-precision fp16 --vae madebyollin/sdxl-vae-fp16-fix --vae-dtype float16 --set cache_prompt_embeddings=false"),
        Option("+ cached prompt embeddings (text encoders offloaded)", same, text_encoders_resident=False,
               flags="--mixed-precision fp16 --vae madebyollin/sdxl-vae-fp16-fix --vae-dtype float16"),
        Option("+ gradient checkpointing", ck, text_encoders_resident=False, flags="+ --gradient-checkpointing"),
        Option("+ SPM fp16", replace(ck, spm_dtype="float16"), text_encoders_resident=False, flags="+ --spm-dtype float16"),
        Option("+ VAE slicing", replace(ck, spm_dtype="float16", decode="sliced"), text_encoders_resident=False, flags="+ --vae-slicing"),
        Option("+ 8-bit AdamW", replace(ck, spm_dtype="float16", decode="sliced"), text_encoders_resident=False, adam_bytes=2.0,
               flags="+ --8bit-adam (bitsandbytes, CUDA)"),
        Option("+ train batch 1 × accumulation 4 (same effective batch)", replace(ck, spm_dtype="float16", decode="sliced", train_batch_size=1),
               text_encoders_resident=False, adam_bytes=2.0, flags="+ --set train_batch_size=1 --set gradient_accumulation_steps=4"),
        Option("+ SPM and VAE on the CPU while training", replace(ck, spm_dtype="float16", decode="sliced", train_batch_size=1),
               text_encoders_resident=False, adam_bytes=2.0, offload_scorer=True, flags="+ --set offload_scorer=true"),
        *auto_options(),
    ]  # fmt: skip


AUTO_NOTES: list[str] = []


def auto_options(cards: tuple[int, ...] = CARDS) -> list[Option]:
    """hw's defaults on CUDA: what `--memory auto` chooses for each card (pycore.spo.memory.plan), simulated like the rows above."""
    from pycore.spo.memory import MemoryError_, decode_mode, plan

    rows = []
    for card in cards:
        try:
            p = plan(from_preset("sdxl"), card)
        except MemoryError_ as e:
            log(f"  --memory auto for {card} GiB: {e}")
            AUTO_NOTES.append(f"hw defaults, `--memory auto` for a {card} GiB card: no row — {e}")
            continue
        c = p.config
        ph = Phase(unet_dtype="float16", autocast="float16", checkpointing=c.gradient_checkpointing, vae_dtype=c.vae_dtype,
                   decode=decode_mode(c), spm_dtype=c.spm_dtype, train_batch_size=c.train_batch_size, score_autocast=False)  # fmt: skip
        rows.append(Option(f"hw defaults, `--memory auto` for a {card} GiB card (planned {p.estimate.peak / GiB:.1f} GiB)", ph,
                           text_encoders_resident=not c.cache_prompt_embeddings, adam_bytes=2.0 if c.use_8bit_adam else 8.0,
                           flags=" ".join(p.flags) or "(no flags)", offload_scorer=c.offload_scorer))  # fmt: skip
    return rows


#: Decode + score variants (k × batch = 4 candidates at 1024²) for the second table.
DECODE_VARIANTS = [
    ("fp32 VAE, batched (4 images)", dict(vae_dtype="float32", decode="batched"), False),
    ("fp32 VAE, batched, inside fp16 autocast (hw)", dict(vae_dtype="float32", decode="batched"), True),
    ("fp16 VAE, batched (official)", dict(vae_dtype="float16", decode="batched"), False),
    ("fp16 VAE, batched, inside fp16 autocast (hw)", dict(vae_dtype="float16", decode="batched"), True),
    ("fp16 VAE, sliced (1 image at a time)", dict(vae_dtype="float16", decode="sliced"), False),
    ("fp16 VAE, sliced, inside fp16 autocast (hw)", dict(vae_dtype="float16", decode="sliced"), True),
    ("fp16 VAE, `enable_tiling()` as diffusers sets it (1024² tiles: no tiling at 1024²)", dict(vae_dtype="float16", decode="tiled_default"), False),
    ("fp16 VAE, tiled with 512² tiles (overlap 0.25: 9 tiles), batched", dict(vae_dtype="float16", decode="tiled"), False),
    ("fp16 VAE, sliced + 512² tiles, inside fp16 autocast (hw)", dict(vae_dtype="float16", decode="sliced_tiled"), True),
]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-check-autocast", action="store_true", help="skip comparing the autocast emulation with real CUDA autocast on fake tensors")
    args = ap.parse_args()
    t_all = time.perf_counter()
    torch.set_num_threads(1)
    cfg = from_preset("sdxl")
    latent = (4, cfg.resolution // 8, cfg.resolution // 8)
    res: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__},
        "config": {k: getattr(cfg, k) for k in ("resolution", "sample_batch_size", "num_candidates", "train_batch_size",
                                                "gradient_accumulation_steps", "lora_rank", "guidance_scale")},
        "context_reserve_gib": CONTEXT_RESERVE,
    }  # fmt: skip
    log("parameter counts (meta device) …")
    counts = parameter_counts(cfg)
    res["parameters"] = counts
    for k, v in counts.items():
        log(f"  {k}: {v:,}")
    lora_n = next(v for k, v in counts.items() if k.startswith("lora ("))

    if not args.no_check_autocast:
        log("checking the autocast emulation against real CUDA autocast on fake tensors …")
        res["autocast_check"] = check_autocast(cfg)
        log(f"  {res['autocast_check']}")

    unets: dict[str, Any] = {}
    vaes: dict[str, Any] = {}
    spms: dict[str, Any] = {}
    cache: dict[tuple, dict] = {}

    def unet_for(dtype: str):
        if dtype not in unets:
            u = build_unet(_dt(dtype))
            ref = copy.deepcopy(u)
            ref.requires_grad_(False)
            unets[dtype] = (u, ref, add_lora(u, cfg))
        return unets[dtype]

    def phase(kind: str, ph: Phase) -> dict:
        key = {"sample": (kind, ph.unet_dtype, ph.autocast),
               "train": (kind, ph.unet_dtype, ph.autocast, ph.official, ph.checkpointing, ph.train_batch_size),
               "score": (kind, ph.vae_dtype, ph.decode, ph.spm_dtype, ph.autocast if ph.score_autocast else None)}[kind]  # fmt: skip
        if key not in cache:
            t0 = time.perf_counter()
            if kind == "sample":
                cache[key] = sim_sampling(unet_for(ph.unet_dtype)[0], cfg, ph, latent)
            elif kind == "train":
                u, ref, params = unet_for(ph.unet_dtype)
                cache[key] = sim_training(u, ref, params, cfg, ph, latent)
            else:
                if ph.vae_dtype not in vaes:
                    vaes[ph.vae_dtype] = build_vae(_dt(ph.vae_dtype))
                if ph.spm_dtype not in spms:
                    spms[ph.spm_dtype] = build_spm(_dt(ph.spm_dtype))
                cache[key] = sim_scoring(vaes[ph.vae_dtype], spms[ph.spm_dtype], cfg, ph, latent)
            cache[key]["sim_seconds"] = round(time.perf_counter() - t0, 1)
            log(f"  {key}: " + ", ".join(f"{k} {v / GiB:.2f} GiB" if isinstance(v, int) and v > 2**20 else f"{k} {v}" for k, v in cache[key].items()))
        return cache[key]

    log("simulating phases …")
    rows = []
    te_params = counts["text_encoder (CLIP ViT-L/14)"] + counts["text_encoder_2 (OpenCLIP bigG/14 + projection)"]
    for opt in options():
        ph = opt.phase
        ub = BYTES[ph.unet_dtype]
        w = {
            "unet": counts["unet"] * ub,
            "ref_unet": counts["unet"] * ub if opt.second_unet else 0,
            "text_encoders": te_params * BYTES[opt.text_encoder_dtype] if opt.text_encoders_resident else 0,
            "vae": counts["vae"] * BYTES[ph.vae_dtype],
            "spm": counts["spm (PickScore_v1 CLIP ViT-H/14 + time modules)"] * BYTES[ph.spm_dtype],
        }
        lora = {"params": lora_n * 4, "grads": lora_n * 4, "optimizer": int(lora_n * opt.adam_bytes)}
        s, tr, sc = phase("sample", ph), phase("train", ph), phase("score", ph)
        static = sum(w.values()) + lora["params"] + lora["optimizer"]
        off = w["vae"] + w["spm"] if opt.offload_scorer else 0  # not on the card while training
        peaks = {"rollout UNet call": static + s["peak"], "training micro-step": static - off + lora["grads"] + tr["peak"],
                 "decode + score": static + sc["peak"]}  # fmt: skip
        total = max(peaks.values())
        rows.append({"name": opt.name, "flags": opt.flags, "phase": asdict(ph), "weights": w, "lora": lora,
                     "sampling_activations": s["peak"], "training_activations": tr["peak"], "training_saved_after_forward": tr["after_forward"],
                     "decode_score_peak": sc["peak"], "decode_peak": sc["decode_peak"], "spm_peak": sc["spm_peak"],
                     "phase_totals": peaks, "total": total, "offload_scorer": opt.offload_scorer,
                     "pcie_bytes_per_prompt_batch": 2 * off, "peak_phase": max(peaks, key=peaks.get),
                     "fits_gb": {g: total + CONTEXT_RESERVE * GiB <= g * GiB for g in CARDS}})  # fmt: skip
    res["rows"] = rows
    log("decode + score variants …")
    dec = []
    for label, kw, auto in DECODE_VARIANTS:
        ph = Phase(autocast="float16", score_autocast=auto, spm_dtype="float16", **kw)
        r = phase("score", ph)
        dec.append({"variant": label, "decode_peak": r["decode_peak"], "spm_peak": r["spm_peak"], "peak": r["peak"]})
    res["decode_variants"] = dec
    log("compute of one SPO batch (FLOPs) …")
    u, _, params = unet_for("float16")
    if "float16" not in vaes:
        vaes["float16"] = build_vae(torch.float16)
    if "float16" not in spms:
        spms["float16"] = build_spm(torch.float16)
    comp = compute_split(u, params, vaes["float16"], spms["float16"], cfg, latent, torch.float16, acceptance=1.0)
    batches_per_gpu = cfg.num_epochs * PAPER["prompts"] / (PAPER["gpus"] * cfg.sample_batch_size)
    comp["paper"] = dict(PAPER, batches_per_gpu=batches_per_gpu, seconds_per_batch=PAPER["hours"] * 3600 / batches_per_gpu)
    res["compute"] = comp
    log(f"  {comp}")
    res["phases"] = {" / ".join(str(x) for x in k): v for k, v in cache.items()}
    res["total_seconds"] = round(time.perf_counter() - t_all, 1)
    report(res)


def gib(x: float) -> str:
    return f"{x / GiB:.1f}"


def report(res: dict) -> None:
    c = res["config"]
    p = res["parameters"]
    lines = [
        f"## `hw spo-train` memory budget, SDXL at {c['resolution']}² — paper estimate (simulated on the meta device)",
        "",
        f"Official SDXL settings: {c['sample_batch_size']} prompts × k = {c['num_candidates']} candidates per rollout "
        f"(UNet batch {2 * c['sample_batch_size'] * c['num_candidates']} with CFG), train batch {c['train_batch_size']} pairs "
        f"(win + lose with CFG: {4 * c['train_batch_size']} UNet samples with gradients per micro-step), LoRA rank {c['lora_rank']}. "
        f"GiB (2³⁰ bytes). A card \"fits\" when the total plus {res['context_reserve_gib']:.0f} GiB for the CUDA context and "
        "workspaces is within its size; allocator fragmentation is not included.",
        "",
        "| parameters | count | fp16 | fp32 |",
        "|---|---:|---:|---:|",
    ]
    for k, v in p.items():
        if k != "lora_wrapped_linears":
            lines.append(f"| {k} | {v:,} | {gib(2 * v)} | {gib(4 * v)} |")
    lines += [
        "",
        "| option set | UNet | ref UNet | text enc. | VAE | SPM | LoRA + grads + AdamW | training act. | rollout act. | decode + score | **peak** | 80 GB | 24 GB | 16 GB | 12 GB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|:-:|:-:|:-:|",
    ]
    for r in res["rows"]:
        w, lo = r["weights"], r["lora"]
        fit = ["yes" if r["fits_gb"][g] else "no" for g in CARDS]
        lines.append(f"| {r['name']} | {gib(w['unet'])} | {gib(w['ref_unet']) if w['ref_unet'] else '—'} | "
                     f"{gib(w['text_encoders']) if w['text_encoders'] else 'CPU'} | {gib(w['vae'])} | {gib(w['spm'])} | "
                     f"{gib(sum(lo.values()))} | {gib(r['training_activations'])} | {gib(r['sampling_activations'])} | "
                     f"{gib(r['decode_score_peak'])} | **{gib(r['total'])}** | {' | '.join(fit)} |")  # fmt: skip
    lines += ["", "Rows are cumulative from the third. Flags and the phase that sets each peak:", ""]
    for r in res["rows"]:
        pcie = (f"; {r['pcie_bytes_per_prompt_batch'] / GiB:.1f} GiB over PCIe per prompt batch (SPM + VAE off and back on)"
                if r.get("offload_scorer") else "")  # fmt: skip
        lines.append(f"- {r['name']}: `{r['flags']}` — peak in the {r['peak_phase']}{pcie}")
    lines += [f"- {n}" for n in AUTO_NOTES]
    lines += ["", "| decode + score of the 4 candidates at 1024² (SPM fp16) | VAE decode peak | then SPM | peak |", "|---|---:|---:|---:|"]
    for d in res["decode_variants"]:
        lines.append(f"| {d['variant']} | {d['decode_peak'] / GiB:.2f} | {d['spm_peak'] / GiB:.2f} | {d['peak'] / GiB:.2f} |")
    comp = res.get("compute")
    if comp:
        f, cn, pu, pp = comp["flops"], comp["counts"], comp["per_unit"], comp["paper"]

        def split(acc: float) -> dict[str, float]:
            return {"sampling": f["sampling"], "decode": f["decode"], "spm": f["spm"], "training": f["training"] * acc}

        s1, s5 = split(1.0), split(0.5)
        t1, t5 = sum(s1.values()), sum(s5.values())
        lines += [
            "",
            f"Compute of one SPO batch at {c['resolution']}² (FLOPs counted on meta tensors: matmuls, convolutions, attention, forward and "
            f"backward): {cn['unet_calls']} UNet calls on {cn['unet_latents']} latents (×2 for CFG), {cn['images_judged']} decoded and "
            f"scored images, and {cn['transitions']:.0f} transitions = {cn['micro_steps']:.0f} micro-steps when every pair is kept. "
            f"Per unit: UNet {pu['unet_call_per_latent_cfg'] / 1e12:.1f} TFLOP per latent with CFG, VAE decode "
            f"{pu['vae_decode_per_image'] / 1e12:.1f} TFLOP per image, SPM {pu['spm_per_image'] / 1e12:.2f} TFLOP per image, training "
            f"micro-step {pu['train_micro_step'] / 1e12:.0f} TFLOP ({pu['train_micro_step_checkpointing'] / 1e12:.0f} with gradient "
            "checkpointing).",
            "",
            "| phase | TFLOP per batch | share, all pairs kept | share, half the pairs kept |",
            "|---|---:|---:|---:|",
        ]
        for k, label in (("sampling", "sampling (rollout UNet calls)"), ("decode", "VAE decode of x̂0"), ("spm", "SPM scoring"),
                         ("training", "training (reference + policy forward, backward)")):  # fmt: skip
            lines.append(f"| {label} | {s1[k] / 1e12:,.0f} | {100 * s1[k] / t1:.0f}% | {100 * s5[k] / t5:.0f}% |")
        lines += [
            "",
            f"The official run ({pp['prompts']:,} prompts × 10 epochs on {pp['gpus']} {pp['gpu']}s in ~{pp['hours']} h) did "
            f"{pp['batches_per_gpu']:,.0f} batches per GPU, {pp['seconds_per_batch']:.0f} s each: {t1 / pp['seconds_per_batch'] / 1e12:.0f} "
            f"TFLOP/s per GPU if every pair was kept, {t5 / pp['seconds_per_batch'] / 1e12:.0f} at half (the {pp['gpu']}'s dense fp16 peak "
            f"is {pp['peak_tflops_fp16']}).",
        ]
    ac = res.get("autocast_check")
    if ac:
        if "ratio" in ac:
            lines += ["", f"Autocast emulation check (SDXL UNet training forward, batch 1, bytes saved for backward): emulated {gib(ac['emulated_bytes'])} GiB, "
                          f"real CUDA autocast on fake tensors {gib(ac['real_autocast_bytes'])} GiB (ratio {ac['ratio']:.3f})."]  # fmt: skip
        else:
            lines += ["", f"Autocast emulation check could not run: {ac.get('error')}"]
    lines += ["", f"Simulated in {res['total_seconds']} s (torch {res['machine']['torch']})."]
    text = "\n".join(lines) + "\n"
    print(text)
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "spo_budget.md").write_text(text)
    (out / "spo_budget.json").write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
