"""Streaming safetensors I/O: read one tensor at a time, write the header first.

The safetensors format is an 8-byte little-endian header length, a JSON header mapping each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the end
of the header, plus an optional ``"__metadata__"`` dict of strings), then the raw bytes.

:class:`SafeReader` reads tensors with plain ``readinto`` calls (no mmap), so the bytes it has
read do not stay in the process's resident set; :class:`SafeWriter` takes every name, dtype and
shape up front, writes the header, then accepts the tensors one by one in that order. Together
they keep peak memory near the largest tensor instead of the model size.

Pickle files (.ckpt/.pt/.pth/.bin) are refused unless the caller opts in with
``trust_pickle=True``; even then they are loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pycore.errors import HwError, first_line
from pycore.hub import PICKLE_SUFFIXES  # one list of pickle suffixes (re-exported for pycore.lora.checkpoint)
from pycore.io import atomic_path

if TYPE_CHECKING:
    import torch

#: safetensors dtype name -> (torch dtype attribute name, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
MAX_HEADER = 100 * 1024 * 1024


class LoraError(HwError):
    """A LoRA or checkpoint file that cannot be read, mapped or merged."""


def torch_dtype(name: str) -> torch.dtype:
    import torch

    if name not in DTYPES:
        raise LoraError(f"unsupported safetensors dtype {name!r}")
    return getattr(torch, DTYPES[name][0])


def st_dtype(dtype: torch.dtype) -> str:
    for k, (tn, _) in DTYPES.items():
        if str(dtype) == f"torch.{tn}":
            return k
    raise LoraError(f"dtype {dtype} cannot be stored in safetensors")


def parse_dtype_option(name: str) -> str:
    """'fp16'/'float16'/'F16' -> 'F16' etc."""
    aliases = {"fp16": "F16", "float16": "F16", "half": "F16", "bf16": "BF16", "bfloat16": "BF16",
               "fp32": "F32", "float32": "F32", "float": "F32"}  # fmt: skip
    key = aliases.get(name.lower(), name.upper())
    if key not in ("F16", "BF16", "F32"):
        raise LoraError(f"--dtype must be fp16, bf16 or fp32, not {name!r}")
    return key


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and validate a safetensors header: (tensors, metadata, start of data)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise LoraError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise LoraError(f"{path}: not a safetensors file (bad header length {n})")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise LoraError(f"{path}: not a safetensors file (header is not an object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise LoraError(f"{path}: __metadata__ is not an object")
    start = 8 + n
    infos: dict[str, TensorInfo] = {}
    for name, h in header.items():
        try:
            dtype, shape, (b, e) = h["dtype"], tuple(int(s) for s in h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise LoraError(f"{path}: malformed header entry for {name!r}") from None
        if dtype not in DTYPES:
            raise LoraError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        if e - b != math.prod(shape) * DTYPES[dtype][1] or b < 0 or start + e > size:
            raise LoraError(f"{path}: tensor {name!r} has offsets that do not match its shape or the file size")
        infos[name] = TensorInfo(name, dtype, shape, b, e)
    return infos, {str(k): str(v) for k, v in meta.items()}, start


class SafeReader:
    """Read tensors from a safetensors file one at a time, with plain reads (no mmap)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.infos, self.metadata, self._start = read_header(self.path)
        self._f = open(self.path, "rb")

    def __enter__(self) -> SafeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    def keys(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def get(self, name: str) -> torch.Tensor:
        import torch

        info = self.infos[name]
        buf = bytearray(info.nbytes)
        self._f.seek(self._start + info.begin)
        if self._f.readinto(buf) != info.nbytes:
            raise LoraError(f"{self.path}: truncated data for tensor {name!r}")
        dt = torch_dtype(info.dtype)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dt)
        return torch.frombuffer(buf, dtype=dt).reshape(info.shape)

    def iter_in_file_order(self) -> Iterator[tuple[str, torch.Tensor]]:
        for info in sorted(self.infos.values(), key=lambda i: i.begin):
            yield info.name, self.get(info.name)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor (any dtype, bf16 included), without a copy if contiguous."""
    import torch

    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class SafeWriter:
    """Write a safetensors file whose header is known up front; tensors arrive one by one, in order.

    ``entries`` is an ordered list of (name, safetensors dtype, shape). Call :meth:`write` (or
    :meth:`write_bytes`) once per entry in that order, then :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike[str], entries: Iterable[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self._order: list[tuple[str, str, tuple[int, ...], int]] = []
        off = 0
        for name, dtype, shape in entries:
            if dtype not in DTYPES:
                raise LoraError(f"unsupported dtype {dtype!r} for {name!r}")
            if name in header or name == "__metadata__":
                raise LoraError(f"duplicate tensor name {name!r}")
            shape = tuple(int(s) for s in shape)
            nb = math.prod(shape) * DTYPES[dtype][1]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + nb]}
            self._order.append((name, dtype, shape, nb))
            off += nb
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # pad so the data starts 8-byte aligned, as safetensors does
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._i = 0

    def __enter__(self) -> SafeWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._f.close()

    def _next(self, name: str) -> tuple[str, str, tuple[int, ...], int]:
        if self._i >= len(self._order):
            raise LoraError(f"unexpected extra tensor {name!r}")
        want = self._order[self._i]
        if want[0] != name:
            raise LoraError(f"tensor written out of order: expected {want[0]!r}, got {name!r}")
        return want

    def write(self, name: str, t: torch.Tensor) -> None:
        _, dtype, shape, nb = self._next(name)
        if st_dtype(t.dtype) != dtype or tuple(t.shape) != shape:
            raise LoraError(f"tensor {name!r} is {st_dtype(t.dtype)}{list(t.shape)}, header says {dtype}{list(shape)}")
        self._f.write(tensor_bytes(t))
        self._i += 1

    def write_bytes(self, name: str, data: bytes | memoryview) -> None:
        _, _, _, nb = self._next(name)
        if len(data) != nb:
            raise LoraError(f"tensor {name!r}: {len(data)} bytes, header says {nb}")
        self._f.write(data)
        self._i += 1

    def close(self) -> None:
        if self._i != len(self._order):
            self._f.close()
            raise LoraError(f"only {self._i} of {len(self._order)} tensors were written")
        self._f.close()


def body_sha256(tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 of the data section (kohya's sshs_model_hash) for tensors written in this order."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(tensor_bytes(t))
    return h.hexdigest()


def file_body_sha256(path: str | os.PathLike[str]) -> str:
    """kohya's sshs_model_hash of an existing file: SHA-256 of everything after the header."""
    _, _, start = read_header(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def save_tensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *, overwrite: bool = False) -> None:
    """Write an in-memory dict of tensors (in the given order) atomically."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        with SafeWriter(tmp, [(k, st_dtype(v.dtype), tuple(v.shape)) for k, v in tensors.items()], metadata) as w:
            for k, v in tensors.items():
                w.write(k, v)


def load_tensors(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor of a (small) file: safetensors, or a pickle only with trust_pickle."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"{path} does not exist or is not a file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return load_pickle(path, trust_pickle), {}
    with SafeReader(path) as r:
        return {k: r.get(k) for k in r.keys()}, r.metadata


def load_pickle(path: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    import torch

    if not trust_pickle:
        raise LoraError(f"{path} is a pickle file, which can run code when loaded; convert it to .safetensors or pass --trust-pickle (loads with weights_only=True)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad pickles
        raise LoraError(f"{path}: cannot load with weights_only=True: {first_line(e)}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LoraError(f"{path}: not a state dict of tensors")
    return dict(obj)
