"""Every LoRA family as the exact weight difference it encodes (fp32).

One module of a LoRA file stores one family; each class here turns its tensors into ΔW for the
layer's weight (or bias) of a given shape, and checks that the tensors fit that shape:

* :class:`~pycore.lora.layers.LoraLayer` — LoRA / LoCon: (alpha/r)·up@down (conv flattened).
  A Tucker/CP ``lora_mid`` is folded into ``down`` when the file is read (exact).
* :class:`LohaLayer` — LoHa: (alpha/r)·(w1a@w1b)⊙(w2a@w2b), or the Tucker form with t1/t2.
* :class:`LokrLayer` — LoKr: scale·kron(w1, w2), each factor full, a@b, or Tucker (t2).
* :class:`FullDiff` — ``.diff`` / ``.diff_b`` / ``w_norm`` / ``b_norm``: ΔW stored whole.
* :class:`SetWeight` — ``.set_weight``: replacement, ΔW = W_set − W.
* :class:`Ia3Layer` — IA3: ΔW = W ⊙ w along the output (or, ``on_input``, the input) axis.
* :class:`DoraLayer` — DoRA around any additive family: W' = m·V/‖V‖, V = W + ΔW_inner;
  ΔW = W' − W. The norm is per output channel (PEFT, LyCORIS ``wd_on_out``) or per input channel
  (a LyCORIS ``dora_scale`` of shape (1, in, …)), taken of V as in the DoRA paper, PEFT and
  LyCORIS.

Formulas follow ComfyUI's ``comfy/weight_adapter`` loaders (the ones ComfyUI and Forge users
run), LyCORIS's modules and PEFT's ``tuners/lora/dora.py``. Where they disagree hw follows the
paper: ComfyUI divides by ‖W‖ instead of ‖W + ΔW‖ for output-axis DoRA.

``delta_for(w, shape)`` is the ΔW at strength 1; a merge adds strength·ΔW computed against the *base*
weight for every file, so the result is base + Σ wᵢ·ΔWᵢ regardless of file order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pycore.lora.io import LoraError

if TYPE_CHECKING:
    import torch

#: Suffix of a target id that means "the layer's bias" rather than its weight.
BIAS = "@bias"


def _f32(t: torch.Tensor, device: Any = None) -> torch.Tensor:
    import torch

    return t.to(device=device, dtype=torch.float32)


def fit(d: torch.Tensor, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """Reshape a ΔW to the target shape; linear ↔ 1×1 conv and flattened conv factors allowed."""
    shape = tuple(shape)
    if tuple(d.shape) == shape:
        return d
    if d.numel() == math.prod(shape) and d.dim() >= 1 and len(shape) >= 1 and d.shape[0] == shape[0]:
        return d.reshape(shape)
    raise LoraError(f"{what}: ΔW {list(d.shape)} does not fit the weight {list(shape)}")


def tucker(t: torch.Tensor, wb: torch.Tensor, wa: torch.Tensor) -> torch.Tensor:
    """LyCORIS Tucker rebuild, as ComfyUI writes it: einsum('ijkl,jr,ip->prkl', t, wb, wa)."""
    import torch

    return torch.einsum("i j k l, j r, i p -> p r k l", t, wb.flatten(1), wa.flatten(1))


@dataclass(eq=False)
class LohaLayer:
    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    alpha: float | None = None
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    family = "loha"
    needs_base = False

    @property
    def rank(self) -> int:
        return int(self.w1b.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.alpha is not None else 1.0

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"hada_w1_a": self.w1a, "hada_w1_b": self.w1b, "hada_w2_a": self.w2a, "hada_w2_b": self.w2b}
        if self.t1 is not None and self.t2 is not None:
            out |= {"hada_t1": self.t1, "hada_t2": self.t2}
        return out

    def _factors(self, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        w1a, w1b, w2a, w2b = (_f32(t, device) for t in (self.w1a, self.w1b, self.w2a, self.w2b))
        if self.t1 is not None and self.t2 is not None:
            return tucker(_f32(self.t1, device), w1b, w1a), tucker(_f32(self.t2, device), w2b, w2a)
        return w1a.flatten(1) @ w1b.flatten(1), w2a.flatten(1) @ w2b.flatten(1)

    def validate(self, name: str) -> None:
        if (self.t1 is None) != (self.t2 is None):
            raise LoraError(f"{name}: LoHa with only one of hada_t1/hada_t2")
        try:
            m1, m2 = self._factors("meta")
        except RuntimeError:
            raise LoraError(f"{name}: LoHa factor shapes do not multiply (hada_w1_a {list(self.w1a.shape)}, hada_w1_b {list(self.w1b.shape)}, "
                            f"hada_w2_a {list(self.w2a.shape)}, hada_w2_b {list(self.w2b.shape)})") from None  # fmt: skip
        if m1.shape != m2.shape:
            raise LoraError(f"{name}: LoHa halves differ in shape ({list(m1.shape)} vs {list(m2.shape)})")

    def delta_for(self, w: torch.Tensor | None, shape: tuple[int, ...], device: Any = None) -> torch.Tensor:
        m1, m2 = self._factors(device)
        return fit(self.scale * (m1 * m2), shape, "LoHa")

    def out_features(self) -> int:
        return int(self.w1a.shape[1] if self.t1 is not None else self.w1a.shape[0])


@dataclass(eq=False)
class LokrLayer:
    w1: torch.Tensor | None = None
    w1a: torch.Tensor | None = None
    w1b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2a: torch.Tensor | None = None
    w2b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    alpha: float | None = None
    family = "lokr"
    needs_base = False

    @property
    def rank(self) -> int | None:
        dim = None
        if self.w1 is None and self.w1b is not None:
            dim = int(self.w1b.shape[0])
        if self.w2 is None and self.w2b is not None:
            dim = int(self.w2b.shape[0])
        return dim

    @property
    def scale(self) -> float:
        dim = self.rank
        return self.alpha / dim if self.alpha is not None and dim else 1.0

    def tensors(self) -> dict[str, torch.Tensor]:
        names = {"lokr_w1": self.w1, "lokr_w1_a": self.w1a, "lokr_w1_b": self.w1b, "lokr_w2": self.w2,
                 "lokr_w2_a": self.w2a, "lokr_w2_b": self.w2b, "lokr_t2": self.t2}  # fmt: skip
        return {k: v for k, v in names.items() if v is not None}

    def _factors(self, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.w1 is not None:
            w1 = _f32(self.w1, device)
        else:
            w1 = _f32(self.w1a, device) @ _f32(self.w1b, device)  # type: ignore[arg-type]
        if self.w2 is not None:
            w2 = _f32(self.w2, device)
        elif self.t2 is not None:
            w2 = tucker(_f32(self.t2, device), _f32(self.w2b, device), _f32(self.w2a, device))  # type: ignore[arg-type]
        else:
            w2 = _f32(self.w2a, device).flatten(1) @ _f32(self.w2b, device).flatten(1)  # type: ignore[arg-type]
        if w2.dim() == 4 and w1.dim() == 2:
            w1 = w1[:, :, None, None]
        return w1, w2

    def validate(self, name: str) -> None:
        if (self.w1 is None) == (self.w1a is None or self.w1b is None):
            raise LoraError(f"{name}: LoKr needs lokr_w1 or both lokr_w1_a and lokr_w1_b")
        if (self.w2 is None) == (self.w2a is None or self.w2b is None):
            raise LoraError(f"{name}: LoKr needs lokr_w2 or both lokr_w2_a and lokr_w2_b")
        try:
            self._factors("meta")
        except RuntimeError:
            shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in self.tensors().items())
            raise LoraError(f"{name}: LoKr factor shapes do not multiply ({shapes})") from None

    def delta_for(self, w: torch.Tensor | None, shape: tuple[int, ...], device: Any = None) -> torch.Tensor:
        import torch

        w1, w2 = self._factors(device)
        k = torch.kron(w1, w2)
        if k.numel() != math.prod(shape) or k.shape[0] != shape[0]:
            raise LoraError(f"LoKr: kron of the factors is {list(k.shape)}, which does not multiply to the weight {list(shape)}")
        return self.scale * k.reshape(shape)

    def out_features(self) -> int:
        w1 = self.w1 if self.w1 is not None else self.w1a
        w2 = self.w2 if self.w2 is not None else (self.w2a if self.t2 is None else None)
        a = int(w1.shape[0])  # type: ignore[union-attr]
        b = int(w2.shape[0]) if w2 is not None else int(self.w2a.shape[1])  # type: ignore[union-attr]
        return a * b


@dataclass(eq=False)
class FullDiff:
    """A whole ΔW: ``.diff`` (weight), ``.diff_b`` (bias), ``w_norm`` / ``b_norm`` (norm layers)."""

    diff: torch.Tensor
    suffix: str = "diff"
    family = "full"
    needs_base = False
    rank = None
    alpha = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {self.suffix: self.diff}

    def validate(self, name: str) -> None:
        pass

    def delta_for(self, w: torch.Tensor | None, shape: tuple[int, ...], device: Any = None) -> torch.Tensor:
        return fit(_f32(self.diff, device), shape, f".{self.suffix}")

    def out_features(self) -> int:
        return int(self.diff.shape[0])


@dataclass(eq=False)
class SetWeight:
    """``.set_weight``: the layer's new weight; ΔW = W_set − W."""

    value: torch.Tensor
    family = "set"
    needs_base = True
    rank = None
    alpha = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"set_weight": self.value}

    def validate(self, name: str) -> None:
        pass

    def delta_for(self, w: torch.Tensor | None, shape: tuple[int, ...], device: Any = None) -> torch.Tensor:
        assert w is not None
        return fit(_f32(self.value, device), shape, ".set_weight") - w

    def out_features(self) -> int:
        return int(self.value.shape[0])


@dataclass(eq=False)
class Ia3Layer:
    """IA3: W' = W ⊙ (1 + s·w) along the output axis (or the input axis with ``on_input``)."""

    w: torch.Tensor
    on_input: bool = False
    family = "ia3"
    needs_base = True
    rank = None
    alpha = None

    def tensors(self) -> dict[str, torch.Tensor]:
        import torch

        return {"weight": self.w, "on_input": torch.tensor(self.on_input)}

    def validate(self, name: str) -> None:
        pass

    def delta_for(self, w: torch.Tensor | None, shape: tuple[int, ...], device: Any = None) -> torch.Tensor:
        assert w is not None
        v = _f32(self.w, device).reshape(-1)
        axis = 1 if self.on_input else 0
        if len(shape) <= axis or v.numel() != shape[axis]:
            raise LoraError(f"IA3: {v.numel()} scales do not match the weight {list(shape)} on the {'input' if self.on_input else 'output'} axis")
        view = [1] * len(shape)
        view[axis] = v.numel()
        return w * v.reshape(view)

    def out_features(self) -> int:
        return -1


@dataclass(eq=False)
class DoraLayer:
    """DoRA around an additive family: W' = m · V / ‖V‖ with V = W + ΔW_inner."""

    inner: Any  # LoraLayer | LohaLayer | LokrLayer
    magnitude: torch.Tensor
    style: str = "lycoris"  # 'lycoris' (dora_scale) | 'peft' (lora_magnitude_vector, always per output row)
    family = "dora"
    needs_base = True

    @property
    def rank(self) -> int | None:
        return self.inner.rank

    @property
    def alpha(self) -> float | None:
        return self.inner.alpha

    def on_output(self, shape: tuple[int, ...]) -> bool:
        m = self.magnitude
        if self.style == "peft" or (m.shape[0] == shape[0] and m.numel() == shape[0]):
            return True
        return False

    def validate(self, name: str) -> None:
        self.inner.validate(name)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**self.inner.tensors(), "dora_scale" if self.style == "lycoris" else "lora_magnitude_vector": self.magnitude}

    def check_magnitude(self, shape: tuple[int, ...]) -> None:
        n = self.magnitude.numel()
        if self.on_output(shape):
            if n != shape[0]:
                raise LoraError(f"DoRA magnitude has {n} values; the weight {list(shape)} has {shape[0]} output channels")
        elif len(shape) < 2 or n != shape[1] or self.magnitude.dim() < 2 or self.magnitude.shape[1] != shape[1]:
            raise LoraError(f"DoRA dora_scale {list(self.magnitude.shape)} matches neither axis of the weight {list(shape)}")

    def delta_for(self, w: torch.Tensor | None, shape: tuple[int, ...], device: Any = None) -> torch.Tensor:
        assert w is not None
        self.check_magnitude(shape)
        v = w + self.inner.delta_for(None, shape, device)
        m = _f32(self.magnitude, device)
        if self.on_output(shape):
            norm = v.reshape(shape[0], -1).norm(dim=1).reshape(shape[0], *[1] * (len(shape) - 1))
            m = m.reshape(norm.shape)
        else:
            norm = v.transpose(0, 1).reshape(shape[1], -1).norm(dim=1).reshape(1, shape[1], *[1] * (len(shape) - 2))
            m = m.reshape(norm.shape)
        return m * v / norm.clamp_min(1e-30) - w

    def out_features(self) -> int:
        return self.inner.out_features()
