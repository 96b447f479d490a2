"""LoRA tools for SDXL: exact streaming merge, SVD extraction and format conversion.

    from pycore.lora import load_lora, save_lora, convert_lora, merge_into_checkpoint, merge_loras, extract_lora

Heavy imports (torch) happen inside the functions, so importing this package is cheap.
"""

from __future__ import annotations

from pycore.lora.convert import convert_lora, load_lora, save_lora
from pycore.lora.extract import SvdOptions, extract_lora, factorize
from pycore.lora.io import LoraError, SafeReader, SafeWriter
from pycore.lora.layers import LoraLayer, LoraSet, to_state_dict
from pycore.lora.read import parse_lora
from pycore.lora.combine import concat_loras, merge_loras
from pycore.lora.merge import LoraSpec, merge_into_checkpoint

__all__ = [
    "LoraError", "LoraLayer", "LoraSet", "LoraSpec", "SafeReader", "SafeWriter", "SvdOptions", "concat_loras",
    "convert_lora", "extract_lora", "factorize", "load_lora", "merge_into_checkpoint", "merge_loras", "parse_lora",
    "save_lora", "to_state_dict",
]  # fmt: skip
