"""The weight shape a LoRA module targets when no checkpoint is at hand.

LoHa and LoKr store conv layers flattened ((out, in·k·k)); a LoRA file written from them needs the
real (out, in, k, k). The layer's name says which kind it is: ResNet conv1/conv2, down/upsampler
convs and conv_in/conv_out are 3×3; conv_shortcut (and SD1.5's attention proj_in/proj_out) 1×1.
"""

from __future__ import annotations

import re
from typing import Any

from pycore.lora import formats as fm
from pycore.lora.io import LoraError

_CONV3 = re.compile(r"(resnets\.\d+\.conv[12]|samplers\.0\.conv|^conv_in|^conv_out)$")
_CONV1 = re.compile(r"(conv_shortcut)$")
_PROJ = re.compile(r"attentions\.\d+\.proj_(in|out)$")


def natural_shape(ad: Any) -> tuple[int, ...]:
    """The shape ΔW has as the file stores it (flattened for LoHa/LoKr conv without Tucker)."""
    import torch

    if hasattr(ad, "delta_shape"):
        return tuple(ad.delta_shape)
    if hasattr(ad, "diff"):
        return tuple(ad.diff.shape)
    if hasattr(ad, "_factors"):
        a, b = ad._factors("meta")
        return tuple((a * b).shape) if ad.family == "loha" else tuple(torch.kron(a, b).shape)
    if hasattr(ad, "inner"):
        return natural_shape(ad.inner)
    raise LoraError(f"a {getattr(ad, 'family', '?')} layer has no shape of its own")


def module_shape(target: str, ad: Any, base: str = "unknown") -> tuple[int, ...]:
    """The layer's weight shape: the natural shape, unflattened for conv layers named as such."""
    shape = natural_shape(ad)
    if len(shape) != 2 or target.endswith("@bias"):
        return shape
    comp, path = fm.split_canonical(target)
    if comp != "unet":
        return shape
    out, flat = shape
    if _CONV3.search(path):
        if flat % 9:
            raise LoraError(f"{target}: a 3×3 conv layer, but ΔW has {flat} columns (not a multiple of 9)")
        return (out, flat // 9, 3, 3)
    if _CONV1.search(path) or (base == "sd15" and _PROJ.search(path)):
        return (out, flat, 1, 1)
    return shape
