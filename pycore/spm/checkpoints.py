"""Loading and saving step-aware preference models.

:func:`load_spm` accepts

* a folder written by :func:`save_spm` (``hw_spm.json`` + ``model.safetensors`` + tokenizer
  files), as ``hw spm-train`` writes — local or a hub repository holding one;
* a released checkpoint (``.bin`` pickle, loaded with ``torch.load(weights_only=True)``, or the
  same keys in ``.safetensors``): a local file, a hub file ``owner/repo/file.bin``, or the aliases
  ``spo-sdxl`` / ``spo-sd15``; its CLIP config comes from ``base`` (PickScore_v1 by default);
* a plain CLIP / PickScore checkpoint in HF format (hub name or folder): the time modules are
  initialised so the model is exactly the plain CLIP scorer (adaLN zero, gate biases one).

Names go through :mod:`pycore.hub`: a path-looking name that does not exist is a local error at
once (no hub retries), and hub failures are one line (offline and not cached → how to pre-download).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from pycore.checks import parse_dtype
from pycore.errors import HwError, first_line
from pycore.hub import PICKLE_SUFFIXES, SAFE_SUFFIXES, check_local, hub_file, offline
from pycore.spm.model import DEFAULT_BASE, DEFAULT_PROCESSOR, SPMLoadError, StepAwarePreferenceModel

RELEASED_REPO = "SPO-Diffusion-Models/Step-Aware_Preference_Models"
#: Short names for the released step-aware preference models (hub files).
ALIASES = {
    "spo-sdxl": f"{RELEASED_REPO}/sdxl_step-aware_preference_model.bin",
    "spo-sd15": f"{RELEASED_REPO}/sd-v1-5_step-aware_preference_model.bin",
}
HW_META = "hw_spm.json"
WEIGHTS = "model.safetensors"
FORMAT = "hw-step-aware-preference-model"
WHAT = "preference model"


def load_spm(
    name_or_path: str | os.PathLike[str],
    *,
    base: str | None = None,
    processor: str | None = None,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    local_files_only: bool | None = None,
) -> StepAwarePreferenceModel:
    """Load an SPM (hw folder, released .bin/.safetensors, hub file or alias) or a plain CLIP.

    ``base``: HF CLIP name/path whose config a released checkpoint was trained from
    (default yuvalkirstain/PickScore_v1). ``processor``: where the tokenizer comes from
    (default: the model's own folder/repo, else laion/CLIP-ViT-H-14-laion2B-s32B-b79K).
    """
    dt = parse_dtype(dtype, "dtype")
    name = str(name_or_path)
    name = ALIASES.get(name.lower(), name)
    off = offline(local_files_only)
    p = check_local(name, WHAT)
    if p is not None:
        if p.is_dir() and (p / HW_META).is_file():
            spm = _from_hw_folder(p, processor=processor, local_files_only=off)
        elif p.is_file():
            spm = _from_released_file(p, base=base, processor=processor, local_files_only=off)
        else:
            spm = _from_plain_clip(str(p), processor=processor, local_files_only=off)
    elif Path(name).suffix.lower() in SAFE_SUFFIXES + PICKLE_SUFFIXES:  # a hub file: owner/repo/path/in/repo.bin
        owner, repo, filename = name.split("/", 2)
        local = hub_file(f"{owner}/{repo}", filename, what=WHAT, local_files_only=off)
        spm = _from_released_file(local, base=base, processor=processor, local_files_only=off)  # type: ignore[arg-type]
    elif _hub_has(name, HW_META, off):
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(name, local_files_only=off)
        except Exception as e:
            from pycore.hub import hub_error

            raise hub_error(e, name, WHAT) from None
        spm = _from_hw_folder(Path(folder), processor=processor, local_files_only=off)
    else:
        hub_file(name, "config.json", what=WHAT, local_files_only=off)  # not cached / no such repo: one line now
        spm = _from_plain_clip(name, processor=processor, local_files_only=off)
    spm = spm.to(dtype=dt)
    if device is not None:
        spm = spm.to(device)
    return spm.eval()


def _hub_has(repo: str, filename: str, off: bool) -> bool:
    """Whether hub repo ``repo`` has ``filename`` (offline: whether the cache has it)."""
    if off:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo, filename), str)
    return hub_file(repo, filename, what=WHAT, local_files_only=False, missing_ok=True) is not None


def _from_hw_folder(folder: Path, *, processor: str | None, local_files_only: bool = True) -> StepAwarePreferenceModel:
    from safetensors.torch import load_file
    from transformers import CLIPConfig

    try:
        meta = json.loads((folder / HW_META).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SPMLoadError(f"{folder / HW_META}: cannot read ({first_line(e)})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SPMLoadError(f"{folder / HW_META}: not an hw step-aware preference model")
    config = CLIPConfig.from_dict(meta["clip_config"])
    tokenizer = _load_tokenizer(str(folder), local_files_only=True) if processor is None else \
        _load_tokenizer(processor, local_files_only=local_files_only)  # fmt: skip
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise SPMLoadError(f"{folder}: {WEIGHTS} is missing")
    try:
        sd = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types
        raise SPMLoadError(f"{weights}: cannot read safetensors ({first_line(e)})") from None
    spm = StepAwarePreferenceModel.from_state_dict(config, tokenizer, sd, source=str(weights))
    spm.image_size = int(meta.get("image_size", spm.image_size))
    spm.mean = tuple(meta.get("mean", spm.mean))
    spm.std = tuple(meta.get("std", spm.std))
    return spm


def _from_released_file(path: Path, *, base: str | None, processor: str | None, local_files_only: bool) -> StepAwarePreferenceModel:
    sd = load_checkpoint_file(path)
    config = _load_clip_config(base or DEFAULT_BASE, local_files_only)
    tokenizer = _load_tokenizer(processor or DEFAULT_PROCESSOR, local_files_only=local_files_only)
    return StepAwarePreferenceModel.from_state_dict(config, tokenizer, sd, source=str(path))


def _from_plain_clip(name: str, *, processor: str | None, local_files_only: bool) -> StepAwarePreferenceModel:
    from transformers import CLIPModel

    config = _load_clip_config(name, local_files_only)
    try:
        clip = CLIPModel.from_pretrained(name, config=config, local_files_only=local_files_only)
    except OSError as e:
        raise SPMLoadError(f"cannot load CLIP weights from {name}: {first_line(e)}") from None
    if processor is not None:
        tokenizer = _load_tokenizer(processor, local_files_only=local_files_only)
    else:
        try:
            tokenizer = _load_tokenizer(name, local_files_only=local_files_only)
        except SPMLoadError:  # PickScore_v1 ships no tokenizer; it uses the laion ViT-H one
            tokenizer = _load_tokenizer(DEFAULT_PROCESSOR, local_files_only=local_files_only)
    return StepAwarePreferenceModel.from_clip(clip.eval(), tokenizer)


def save_spm(spm: StepAwarePreferenceModel, folder: str | os.PathLike[str], *, extra: dict[str, Any] | None = None,
             overwrite: bool = False) -> Path:  # fmt: skip
    """Write ``hw_spm.json`` + ``model.safetensors`` (released-layout keys) + tokenizer files.

    Each file is written atomically into ``folder`` (created if needed); an existing model there
    is only replaced with ``overwrite=True``.
    """
    import shutil
    import tempfile

    from safetensors.torch import save_file

    from pycore.io import atomic_path, write_text_atomic

    folder = Path(folder)
    if (folder / HW_META).exists() and not overwrite:
        raise HwError(f"{folder} already holds a model; pass --overwrite to replace it")
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in spm.state_dict().items()}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt"})
    tok_tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=folder))
    try:
        spm.tokenizer.save_pretrained(tok_tmp)
        for f in tok_tmp.iterdir():
            os.replace(f, folder / f.name)
    finally:
        shutil.rmtree(tok_tmp, ignore_errors=True)
    meta = {"format": FORMAT, "version": 1, "clip_config": spm.model.config.to_dict(),
            "image_size": spm.image_size, "mean": list(spm.mean), "std": list(spm.std),
            "layout": "released SPO keys (model.-prefixed HF CLIPModel keys + t_embedder/adaLN_modulation)"}  # fmt: skip
    if extra:
        meta["extra"] = extra
    write_text_atomic(folder / HW_META, json.dumps(meta, indent=2, default=str))  # last: marks the folder complete
    return folder


def load_checkpoint_file(path: Path) -> dict[str, torch.Tensor]:
    """A released checkpoint: pickle via ``torch.load(weights_only=True)`` or safetensors."""
    if path.suffix.lower() in SAFE_SUFFIXES:
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise SPMLoadError(f"{path}: cannot read safetensors ({first_line(e)})") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for anything but tensors/containers, zip errors, ...
        raise SPMLoadError(f"{path}: cannot load with torch.load(weights_only=True): {first_line(e)}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise SPMLoadError(f"{path}: expected a dict of tensors (a state dict)")
    return obj


def _load_clip_config(name: str, local_files_only: bool) -> Any:
    from transformers import CLIPConfig

    try:
        cfg = CLIPConfig.from_pretrained(name, local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        raise SPMLoadError(f"cannot load a CLIP config from {name}: {first_line(e)}") from None
    if getattr(cfg, "model_type", "") != "clip":
        raise SPMLoadError(f"{name} is a {cfg.model_type!r} model, not a CLIP model")
    return cfg


def _load_tokenizer(name: str, *, local_files_only: bool) -> Any:
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(name, local_files_only=local_files_only)
    except (OSError, ValueError, TypeError) as e:
        raise SPMLoadError(f"cannot load a CLIP tokenizer from {name}: {first_line(e)}") from None
