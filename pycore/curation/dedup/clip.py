"""open_clip image embeddings for ``--method clip`` (imported only then: torch is heavy)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pycore.errors import HwError

def clip_embeddings(
    paths: Sequence[str],
    model: Any,
    preprocess: Callable[[Any], Any],
    device: str = "cpu",
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, list[str | None]]:
    """L2-normalised open_clip image embeddings (rows of zeros and an error where a file fails)."""
    import torch
    from pycore.sources import open_image

    embs: list[np.ndarray | None] = [None] * len(paths)
    errors: list[str | None] = [None] * len(paths)
    dim = None
    dev = torch.device(device)
    use_amp = dev.type == "cuda"
    model = model.to(dev).eval()
    for start in range(0, len(paths), batch_size):
        idx, tensors = [], []
        for i in range(start, min(start + batch_size, len(paths))):
            try:
                with open_image(paths[i]) as im:  # a file, tar member or Parquet cell
                    tensors.append(preprocess(im.convert("RGB")))
                idx.append(i)
            except Exception as e:  # noqa: BLE001 - a bad file is a row with a reason
                errors[i] = f"cannot decode image: {type(e).__name__}: {e}"
        if tensors:
            x = torch.stack(tensors).to(dev)
            with torch.inference_mode(), torch.autocast(dev.type, enabled=use_amp):
                f = model.encode_image(x).float()
            f = torch.nn.functional.normalize(f, dim=-1).cpu().numpy()
            dim = f.shape[1]
            for k, i in enumerate(idx):
                embs[i] = f[k]
        if progress:
            progress(min(batch_size, len(paths) - start))
    out = np.zeros((len(paths), dim or 1), np.float32)
    for i, vec in enumerate(embs):
        if vec is not None:
            out[i] = vec
    return out, errors


def load_clip(name: str, pretrained: str | None, device: str) -> tuple[Any, Callable[[Any], Any]]:
    """An open_clip model and its image transform, by model name and pretrained tag or path."""
    import open_clip  # type: ignore[import-untyped]

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    except Exception as e:  # noqa: BLE001 - unknown names, missing weights, no network
        raise HwError(f"cannot load open_clip model {name!r} (pretrained={pretrained!r}): {e}") from None
    return model, preprocess


