"""SDXL LoRA key maps: SGM (single-file) <-> diffusers <-> kohya <-> PEFT names.

Inside hw a LoRA layer is named by its *canonical module*: the component (``unet``,
``text_encoder`` = CLIP-L, ``text_encoder_2`` = OpenCLIP-G) and the diffusers/transformers module
path, e.g. ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``.

* kohya / webui:   lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight
                   (SGM layout; the diffusers layout lora_unet_down_blocks_1_... is read too)
* diffusers:       unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight
* PEFT:            base_model.model.down_blocks.1....to_q.lora_A.weight (one component per file)
* single-file SGM: model.diffusion_model.input_blocks.4.1....to_q.weight,
                   conditioner.embedders.0.transformer.text_model...,  (CLIP-L)
                   conditioner.embedders.1.model.transformer.resblocks.N.attn.in_proj_weight (fused q/k/v)

The SGM <-> diffusers UNet rules follow diffusers' convert_diffusers_to_original_sdxl script
(layers_per_block = 2: three SGM input/output blocks per resolution level).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pycore.lora.io import LoraError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
#: kohya prefixes read (lora_te_ is the SD1.x single text encoder)
KOHYA_READ_PREFIX = (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"), ("lora_te_", "text_encoder"))
#: up_blocks that carry attentions in SDXL (their upsampler is SGM child 2, not 1)
SDXL_UP_ATTN = frozenset({0, 1})

_RES_SGM2D = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
              "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}  # fmt: skip
_RES_D2SGM = {v: k for k, v in _RES_SGM2D.items()}
_TOP_SGM2D = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
              "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
              "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}  # fmt: skip
_TOP_D2SGM = {v: k for k, v in _TOP_SGM2D.items()}


def _resnet_sgm2d(rest: str) -> str | None:
    for k, v in _RES_SGM2D.items():
        if rest == k or rest.startswith(k + "."):
            return v + rest[len(k) :]
    return None


def _resnet_d2sgm(rest: str) -> str | None:
    for k, v in _RES_D2SGM.items():
        if rest == k or rest.startswith(k + "."):
            return v + rest[len(k) :]
    return None


def unet_sgm_to_diffusers(path: str) -> str | None:
    """SGM UNet path (no 'model.diffusion_model.' prefix) -> diffusers path, or None if unknown."""
    for k, v in _TOP_SGM2D.items():
        if path == k or path.startswith(k + "."):
            return v + path[len(k) :]
    parts = path.split(".")
    if len(parts) >= 3 and parts[0] == "middle_block" and parts[1].isdigit():
        parts = ["middle_block", "0", *parts[1:]]
    if len(parts) < 3 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    block, n, k, rest = parts[0], int(parts[1]), int(parts[2]), ".".join(parts[3:])
    if block == "input_blocks" and n >= 1:
        i, j = (n - 1) // 3, (n - 1) % 3
        if j == 2:
            return f"down_blocks.{i}.downsamplers.0.conv" + rest[2:] if k == 0 and (rest == "op" or rest.startswith("op.")) else None
        if k == 0:
            r = _resnet_sgm2d(rest)
            return f"down_blocks.{i}.resnets.{j}.{r}" if r else None
        return f"down_blocks.{i}.attentions.{j}.{rest}" if k == 1 and rest else None
    if block == "middle_block":
        if k in (0, 2):
            r = _resnet_sgm2d(rest)
            return f"mid_block.resnets.{k // 2}.{r}" if r else None
        return f"mid_block.attentions.0.{rest}" if k == 1 and rest else None
    if block == "output_blocks":
        i, j = n // 3, n % 3
        if k == 0:
            r = _resnet_sgm2d(rest)
            return f"up_blocks.{i}.resnets.{j}.{r}" if r else None
        if (k == 2 or (k == 1 and (rest == "conv" or rest.startswith("conv.")))) and j == 2:
            return f"up_blocks.{i}.upsamplers.0.{rest}"
        return f"up_blocks.{i}.attentions.{j}.{rest}" if k == 1 and rest else None
    return None


def unet_diffusers_to_sgm(path: str, up_attn: frozenset[int] = SDXL_UP_ATTN) -> str | None:
    """diffusers UNet path -> SGM path (SDXL layout by default), or None if unknown."""
    for k, v in _TOP_D2SGM.items():
        if path == k or path.startswith(k + "."):
            return v + path[len(k) :]
    m = re.match(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$", path)
    if m:
        block, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5) or ""
        if block == "down_blocks":
            if kind == "resnets":
                r = _resnet_d2sgm(rest)
                return f"input_blocks.{3 * i + j + 1}.0.{r}" if r else None
            if kind == "attentions" and rest:
                return f"input_blocks.{3 * i + j + 1}.1.{rest}"
            if kind == "downsamplers" and (rest == "conv" or rest.startswith("conv.")):
                return f"input_blocks.{3 * (i + 1)}.0.op{rest[4:]}"
            return None
        if kind == "resnets":
            r = _resnet_d2sgm(rest)
            return f"output_blocks.{3 * i + j}.0.{r}" if r else None
        if kind == "attentions" and rest:
            return f"output_blocks.{3 * i + j}.1.{rest}"
        if kind == "upsamplers" and rest:
            return f"output_blocks.{3 * i + 2}.{2 if i in up_attn else 1}.{rest}"
        return None
    m = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", path)
    if m:
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "resnets":
            r = _resnet_d2sgm(rest)
            return f"middle_block.{2 * j}.{r}" if r else None
        return f"middle_block.1.{rest}" if j == 0 else None
    return None


# --- kohya underscore names -------------------------------------------------------------------

#: Tokens that contain underscores; matched greedily (longest first) when splitting kohya names.
_COMPOUND = sorted(
    {
        "down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks", "middle_block",
        "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in", "proj_out", "time_emb_proj",
        "conv_shortcut", "in_layers", "out_layers", "emb_layers", "skip_connection", "time_embed",
        "label_emb", "conv_in", "conv_out", "conv_norm_out", "time_embedding", "add_embedding",
        "linear_1", "linear_2", "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
        "text_projection", "final_layer_norm", "layer_norm1", "layer_norm2", "token_embedding",
        "position_embedding", "to_add_out", "add_q_proj", "add_k_proj", "add_v_proj",
    },
    key=lambda s: -s.count("_"),
)  # fmt: skip
_SIMPLE = {
    "attn1", "attn2", "ff", "net", "proj", "norm", "norm1", "norm2", "norm3", "resnets", "attentions",
    "downsamplers", "upsamplers", "conv", "conv1", "conv2", "op", "out", "encoder", "layers", "mlp",
    "fc1", "fc2", "embeddings", "attn", "in_proj", "lora",
}  # fmt: skip


def split_kohya(body: str) -> str | None:
    """'down_blocks_1_attentions_0_proj_in' -> 'down_blocks.1.attentions.0.proj_in' (None if unknown)."""
    parts = body.split("_")
    out: list[str] = []
    i = 0
    while i < len(parts):
        for n in (3, 2):
            cand = "_".join(parts[i : i + n])
            if i + n <= len(parts) and cand in _COMPOUND:
                out.append(cand)
                i += n
                break
        else:
            p = parts[i]
            if not (p.isdigit() or p in _SIMPLE):
                return None
            out.append(p)
            i += 1
    return ".".join(out)


def kohya_to_canonical(module: str) -> str | None:
    """'lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q' -> canonical module (None if unknown)."""
    for prefix, comp in KOHYA_READ_PREFIX:
        if module.startswith(prefix):
            path = split_kohya(module[len(prefix) :])
            if path is None:
                return None
            if comp == "unet":
                if path.split(".")[0] in ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out"):
                    path = unet_sgm_to_diffusers(path)
                    if path is None:
                        return None
                elif not _is_diffusers_unet_path(path):
                    return None
            elif not path.startswith("text_model.") and path != "text_projection":
                return None
            return f"{comp}.{path}"
    return None


def _is_diffusers_unet_path(path: str) -> bool:
    head = path.split(".")[0]
    return head in ("down_blocks", "up_blocks", "mid_block", "time_embedding", "add_embedding", "conv_in", "conv_out", "conv_norm_out")


#: up_blocks whose upsampler is SGM child 2 (they carry attentions), per model family
UP_ATTN = {"sdxl": SDXL_UP_ATTN, "sd15": frozenset({1, 2, 3})}


def canonical_to_kohya(canonical: str, layout: str = "sgm", up_attn: frozenset[int] | None = None, base: str = "sdxl") -> str:
    """kohya name of a canonical module; SD1.5's single text encoder is ``lora_te_``."""
    comp, path = split_canonical(canonical)
    if comp == "unet" and layout == "sgm":
        sgm = unet_diffusers_to_sgm(path, up_attn or UP_ATTN.get(base, SDXL_UP_ATTN))
        if sgm is None:
            raise LoraError(f"no SGM name for UNet module {path!r}; use --kohya-layout diffusers")
        path = sgm
    prefix = "lora_te_" if comp == "text_encoder" and base == "sd15" else KOHYA_PREFIX[comp]
    return prefix + path.replace(".", "_")


def split_canonical(canonical: str) -> tuple[str, str]:
    comp, _, path = canonical.removesuffix("@bias").partition(".")
    if comp not in COMPONENTS or not path:
        raise LoraError(f"not a canonical module name: {canonical!r}")
    return comp, path


# --- checkpoint tensor names --------------------------------------------------------------------

SGM_UNET = "model.diffusion_model."
SGM_TE1 = "conditioner.embedders.0.transformer."
SGM_TE2 = "conditioner.embedders.1.model."
SGM_TE_SD15 = "cond_stage_model.transformer."
DIFFUSERS_FOLDERS = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}


@dataclass(frozen=True)
class Target:
    """Where a canonical module's weight lives in a checkpoint tensor."""

    canonical: str
    rows: tuple[int, int] | None = None  # a slice of dim 0 (fused q/k/v in OpenCLIP-G in_proj_weight)
    transpose: bool = False  # OpenCLIP's text_projection is stored transposed


_TE2_SGM = re.compile(r"^transformer\.resblocks\.(\d+)\.(attn\.in_proj|attn\.out_proj|mlp\.c_fc|mlp\.c_proj|ln_1|ln_2)[._](weight|bias)$")
_TE2_SGM_LEAF = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2", "ln_1": "layer_norm1", "ln_2": "layer_norm2"}
#: single-file text-encoder prefixes read as CLIP-L (SDXL's first embedder, SD1.5's only one)
SGM_TE1_PREFIXES = (SGM_TE1, SGM_TE_SD15)


def _param(key: str) -> tuple[str, str] | None:
    """'x.weight' -> ('x', ''), 'x.bias' -> ('x', '@bias'), else None."""
    for leaf, suffix in ((".weight", ""), (".bias", "@bias")):
        if key.endswith(leaf):
            return key[: -len(leaf)], suffix
    return None


def sgm_targets(key: str) -> list[Target]:
    """Target ids whose tensor is (part of) this single-file SDXL / SD1.5 tensor."""
    if key.startswith(SGM_UNET):
        mp = _param(key[len(SGM_UNET) :])
        d = unet_sgm_to_diffusers(mp[0]) if mp else None
        return [Target(f"unet.{d}{mp[1]}")] if d and mp else []
    for pre in SGM_TE1_PREFIXES:
        if key.startswith(pre):
            mp = _param(key[len(pre) :])
            return [Target(f"text_encoder.{te_path(mp[0])}{mp[1]}")] if mp else []
    if key.startswith(SGM_TE2):
        rest = key[len(SGM_TE2) :]
        if rest == "text_projection":
            return [Target("text_encoder_2.text_projection", transpose=True)]
        if rest.startswith("ln_final."):
            mp = _param(rest)
            return [Target(f"text_encoder_2.text_model.final_layer_norm{mp[1]}")] if mp else []
        m = _TE2_SGM.match(rest)
        if not m:
            return []
        base = f"text_encoder_2.text_model.encoder.layers.{m.group(1)}."
        what, suffix = m.group(2), "" if m.group(3) == "weight" else "@bias"
        if what == "attn.in_proj":
            return [Target(base + f"self_attn.{p}_proj{suffix}", rows=(i, 3)) for i, p in enumerate("qkv")]
        return [Target(base + _TE2_SGM_LEAF[what] + suffix)]
    return []


def te_path(path: str) -> str:
    """CLIP text-encoder module path with the 'text_model.' level that SDXL files and kohya names use.

    transformers 5 saves CLIPTextModel without it (encoder.layers.0…); older files and
    CLIPTextModelWithProjection have it (text_model.encoder.layers.0…).
    """
    return "text_model." + path if path.startswith(("encoder.", "embeddings.", "final_layer_norm.")) else path


def component_targets(component: str, key: str) -> list[Target]:
    """Targets of a tensor in a diffusers folder's component file (unet/, text_encoder/, ...)."""
    mp = _param(key) if component in COMPONENTS else None
    if mp:
        return [Target(f"{component}.{mp[0] if component == 'unet' else te_path(mp[0])}{mp[1]}")]
    return []


def kohya_count_modules(canonicals: list[str]) -> dict[str, int]:
    out = {c: 0 for c in COMPONENTS}
    for c in sorted(set(canonicals)):
        out[split_canonical(c)[0]] += 1
    return out


# --- whole-checkpoint names (diffusers components -> SGM single file) ---------------------------

_TE2_LEAF = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def diffusers_to_sgm_key(component: str, key: str) -> tuple[str, int | None, bool] | None:
    """Name of a diffusers component tensor in a single-file SDXL checkpoint.

    Returns (sgm key, q/k/v index to fuse into OpenCLIP's in_proj or None, transposed?), or None
    for tensors the single file does not store (e.g. CLIP position_ids).
    """
    if component == "unet":
        mod, _, leaf = key.rpartition(".")
        sgm = unet_diffusers_to_sgm(mod)
        return (f"{SGM_UNET}{sgm}.{leaf}", None, False) if sgm else None
    if component in ("text_encoder", "text_encoder_2"):
        key = te_path(key)
    if component == "text_encoder":
        return (SGM_TE1 + key, None, False) if not key.endswith("position_ids") else None
    if component == "text_encoder_2":
        if key == "text_projection.weight":
            return SGM_TE2 + "text_projection", None, True
        if key == "text_model.embeddings.token_embedding.weight":
            return SGM_TE2 + "token_embedding.weight", None, False
        if key == "text_model.embeddings.position_embedding.weight":
            return SGM_TE2 + "positional_embedding", None, False
        if key.startswith("text_model.final_layer_norm."):
            return SGM_TE2 + "ln_final." + key.rsplit(".", 1)[1], None, False
        m = re.match(r"^text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
        if not m:
            return None
        n, mod, leaf = m.groups()
        pre = f"{SGM_TE2}transformer.resblocks.{n}."
        qkv = re.match(r"^self_attn\.([qkv])_proj$", mod)
        if qkv:
            return f"{pre}attn.in_proj_{leaf}", "qkv".index(qkv.group(1)), False
        return (f"{pre}{_TE2_LEAF[mod]}.{leaf}", None, False) if mod in _TE2_LEAF else None
    return None
