"""Batch sampling for aspect-ratio-bucketed training data.

`BucketBatchSampler` turns a per-image bucket assignment (one bucket key per dataset index,
e.g. the manifest's ``bucket_width``/``bucket_height`` columns) into batches that never mix
buckets, so every batch can be stacked into one tensor. It is a plain iterable of ``list[int]``
with a ``__len__``, which is all ``torch.utils.data.DataLoader(batch_sampler=...)`` needs; this
module does not import torch.

Steps and ranks
---------------
One *global step* consumes ``batch_size * world_size`` indices (a *global batch*), all from ONE
bucket. Rank ``r`` gets the slice ``[r * batch_size:(r + 1) * batch_size]`` of it. Every rank
therefore sees the same bucket, i.e. the same image shape, on every step -- ranks that disagree
on shapes make a multi-GPU run hang. All ranks compute the same plan independently from the
same seed; nothing is communicated.

Epochs and determinism
----------------------
Call ``set_epoch(e)`` before iterating, as with torch's ``DistributedSampler`` (iterating does
not advance the epoch). For epoch ``e`` a generator ``numpy.random.default_rng([seed, e])``
shuffles each bucket's indices (buckets are taken in order of first appearance in
``bucket_ids``) and then the order in which the buckets' global batches are interleaved.
Within one bucket the batches keep their queue order, so a bucket's first batch of the epoch
holds whatever that bucket carried in (see below). The plan for epoch ``e`` depends only on
``(seed, bucket_ids, batch_size, world_size, leftover, shuffle, e)``: a fresh sampler given
``set_epoch(5)`` yields exactly what a sampler stepped through epochs 0..5 yields, so resuming
from a checkpoint needs only the epoch number.

Leftovers: the policy
---------------------
A bucket's size is rarely a multiple of the global batch. Its remainder is never dropped
silently; ``leftover`` picks what happens to it:

``"carry"`` (default)
    Each bucket is a queue: the indices carried in from the previous epoch first, then this
    epoch's shuffle of the whole bucket. Full global batches are cut from the front; the
    remainder (fewer than a global batch) is *carried out* to the front of the bucket's queue
    next epoch, so it is seen first there. In effect each bucket is one endless stream of
    per-epoch shuffles cut into global batches, and over ``k`` epochs every image is seen
    exactly ``k`` times except those still pending. If carried + fresh indices still cannot
    fill a global batch (a bucket smaller than a global batch) they carry again, until enough
    have accumulated -- such a bucket is seen every few epochs, with repeats inside its batch.
    When a bucket holds at least one global batch, the batch that joins carried and fresh
    indices is arranged to contain no index twice. Replaying epoch ``e`` needs the carry-over
    of epochs ``0..e-1``; it is recomputed (cheap index shuffling, no image I/O), not stored,
    and the last computed epoch is cached so moving forward epoch by epoch costs one epoch.
    ``pending()`` lists the indices carried out after the current epoch: if training stops
    after this epoch, these are exactly the images whose turn did not come.

``"pad"``
    Every index is seen every epoch: the last global batch of a bucket is completed with
    indices of the same bucket chosen at random (seeded; none of them already in that batch
    when the bucket is large enough, an even spread of repeats when it is smaller than a
    global batch). Nothing is carried.

Counters for the current epoch: ``carried_in`` (indices carried in from the previous epoch),
``carried_out`` (carried to the next; ``len(pending())``), ``padded`` (repeat slots added)
and ``excluded`` (indices with no bucket: ``None``, NaN or a negative key -- images the
bucketer rejected -- which are never sampled).

With ``shuffle=False`` indices are taken in ascending order, buckets one after another, and
padding repeats a bucket's first indices; the carry-over works the same way.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["BucketBatchSampler"]

_LEFTOVER_POLICIES = ("carry", "pad")


@dataclass(frozen=True)
class _Epoch:
    """The computed plan of one epoch (global batches as arrays, bucket positions)."""

    epoch: int
    batches: list[tuple[int, np.ndarray]]
    carry_in: list[np.ndarray]
    carry_out: list[np.ndarray]
    padded: int


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _normalize_scalar(value: Any) -> tuple[bool, Any]:
    """Return (valid, key) for one scalar bucket key component."""
    if value is None:
        return False, None
    if isinstance(value, numbers.Integral):
        v = int(value)
        return (v >= 0), v
    if isinstance(value, numbers.Real):
        v = float(value)
        if not math.isfinite(v) or v < 0:
            return False, None
        return True, (int(v) if v.is_integer() else v)
    return True, value


def _normalize_key(value: Any, index: int) -> tuple[bool, Hashable]:
    """Return (valid, key) for one entry of ``bucket_ids``; tuples are normalized per item."""
    if isinstance(value, (tuple, list, np.ndarray)):
        parts = []
        for item in value:
            ok, part = _normalize_scalar(item)
            if not ok:
                return False, None
            parts.append(part)
        return True, tuple(parts)
    ok, key = _normalize_scalar(value)
    if ok:
        try:
            hash(key)
        except TypeError:
            raise ValueError(
                f"bucket id at index {index} is not hashable: {value!r}"
            ) from None
    return ok, key


def _group_numeric(arr: np.ndarray) -> tuple[list[Hashable], list[np.ndarray], int]:
    """Fast path: group a 1-D (scalar keys) or 2-D (tuple keys, one per row) numeric array."""
    n = arr.shape[0]
    if arr.ndim == 1:
        valid = arr >= 0
        if arr.dtype.kind == "f":
            valid &= np.isfinite(arr)
    else:
        valid = np.all(arr >= 0, axis=1)
        if arr.dtype.kind == "f":
            valid &= np.all(np.isfinite(arr), axis=1)
    positions = np.flatnonzero(valid)
    vals = arr[valid]
    if vals.dtype.kind == "f" and np.all(vals == np.floor(vals)):
        vals = vals.astype(np.int64)
    if vals.shape[0] == 0:
        return [], [], n
    if arr.ndim == 1:
        uniq, first, inverse = np.unique(vals, return_index=True, return_inverse=True)
    else:
        uniq, first, inverse = np.unique(
            vals, axis=0, return_index=True, return_inverse=True
        )
    inverse = np.asarray(inverse).reshape(-1)
    order = np.argsort(first, kind="stable")  # buckets in order of first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    codes = rank[inverse]
    sorted_positions = positions[np.argsort(codes, kind="stable")]
    counts = np.bincount(codes, minlength=order.size)
    groups = np.split(sorted_positions.astype(np.int64), np.cumsum(counts)[:-1])
    if arr.ndim == 1:
        keys = [uniq[i].item() for i in order]
    else:
        keys = [tuple(v.item() for v in uniq[i]) for i in order]
    return keys, groups, int(n - positions.size)


def _group(bucket_ids: Any) -> tuple[list[Hashable], list[np.ndarray], int]:
    """Group dataset indices by bucket key: (keys, index arrays, number excluded)."""
    if isinstance(bucket_ids, (str, bytes)):
        raise ValueError("bucket_ids must be a sequence with one bucket key per index")
    try:
        arr = np.asarray(bucket_ids)
    except (ValueError, TypeError):  # ragged tuples, mixed types
        arr = None
    if arr is not None and arr.dtype.kind in "iuf":
        if arr.ndim == 0:
            raise ValueError("bucket_ids must be a sequence, not a scalar")
        if arr.ndim == 1 or (arr.ndim == 2 and arr.shape[1] > 0):
            return _group_numeric(arr)
        raise ValueError(
            f"bucket_ids must be 1-D (one key per index) or 2-D (one tuple per row), "
            f"got shape {arr.shape}"
        )
    groups: dict[Hashable, list[int]] = {}
    excluded = 0
    for i, value in enumerate(bucket_ids):
        ok, key = _normalize_key(value, i)
        if not ok:
            excluded += 1
            continue
        groups.setdefault(key, []).append(i)
    keys = list(groups)
    return keys, [np.asarray(groups[k], dtype=np.int64) for k in keys], excluded


def _to_size_array(values: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)  # None becomes NaN
    except (ValueError, TypeError) as err:
        raise ValueError(f"{name} must be numbers (or None for a missing size): {err}") from None
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


class BucketBatchSampler:
    """Yield batches of dataset indices that never mix buckets, identical buckets on all ranks.

    Args:
        bucket_ids: one hashable bucket key per dataset index (ints, ``(w, h)`` tuples, a
            NumPy array of either). ``None``, NaN or negative keys exclude that index.
        batch_size: per-rank batch size (>= 1).
        seed: non-negative integer; all ranks must pass the same one.
        world_size: number of data-parallel ranks (>= 1).
        rank: this process's rank, ``0 <= rank < world_size``.
        leftover: ``"carry"`` or ``"pad"``; see the module docstring.
        shuffle: shuffle indices and batch order (seeded); ``False`` for a fixed order.
    """

    def __init__(
        self,
        bucket_ids: Sequence[Hashable] | np.ndarray,
        batch_size: int,
        *,
        seed: int = 0,
        world_size: int = 1,
        rank: int = 0,
        leftover: str = "carry",
        shuffle: bool = True,
    ) -> None:
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(
                f"rank must satisfy 0 <= rank < world_size, got rank={self.rank} "
                f"with world_size={self.world_size}"
            )
        self.seed = _check_int("seed", seed, 0)
        if leftover not in _LEFTOVER_POLICIES:
            raise ValueError(
                f"leftover must be one of {', '.join(map(repr, _LEFTOVER_POLICIES))}, "
                f"got {leftover!r}"
            )
        self.leftover = leftover
        self.shuffle = bool(shuffle)
        self._keys, self._groups, self._excluded = _group(bucket_ids)
        self._epoch = 0
        self._cache: _Epoch | None = None

    @classmethod
    def from_sizes(
        cls, widths: Any, heights: Any, batch_size: int, **kwargs: Any
    ) -> BucketBatchSampler:
        """Build a sampler keyed by ``(width, height)``, e.g. from a manifest's
        ``bucket_width``/``bucket_height`` columns. A row whose width or height is missing
        (None/NaN), negative or zero is excluded and counted in ``excluded``."""
        w = _to_size_array(widths, "widths")
        h = _to_size_array(heights, "heights")
        if w.shape != h.shape:
            raise ValueError(
                f"widths and heights must have the same length, got {w.size} and {h.size}"
            )
        sizes = np.stack([w, h], axis=1)
        sizes[np.any(sizes <= 0, axis=1)] = np.nan
        return cls(sizes, batch_size, **kwargs)

    # -- configuration -------------------------------------------------------------------

    @property
    def global_batch_size(self) -> int:
        """Indices consumed per step across all ranks: ``batch_size * world_size``."""
        return self.batch_size * self.world_size

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose plan ``__iter__`` yields (call it before every epoch)."""
        self._epoch = _check_int("epoch", epoch, 0)

    def bucket_counts(self) -> dict[Hashable, int]:
        """Number of (non-excluded) indices per bucket, in order of first appearance."""
        return {k: int(g.size) for k, g in zip(self._keys, self._groups)}

    # -- counters for the current epoch --------------------------------------------------

    @property
    def excluded(self) -> int:
        """Indices without a bucket (None, NaN or negative key); never sampled."""
        return self._excluded

    @property
    def carried_in(self) -> int:
        """Indices carried in from the previous epoch (always 0 with ``leftover="pad"``)."""
        return sum(int(c.size) for c in self._current().carry_in)

    @property
    def carried_out(self) -> int:
        """Indices carried out to the next epoch; ``len(pending())``."""
        return sum(int(c.size) for c in self._current().carry_out)

    @property
    def padded(self) -> int:
        """Repeat slots added this epoch to complete global batches (``leftover="pad"``)."""
        return self._current().padded

    def pending(self) -> list[int]:
        """Indices carried out after the current epoch, bucket by bucket in queue order.

        These are the images not seen if training stops after this epoch; they open their
        bucket's queue next epoch. A bucket smaller than a global batch may list an index
        more than once (it has been queued in several epochs)."""
        return [int(i) for c in self._current().carry_out for i in c]

    # -- the plan ------------------------------------------------------------------------

    def epoch_plan(self) -> list[tuple[Hashable, list[int]]]:
        """The current epoch's global batches in step order: ``(bucket_key, indices)``, each
        with ``global_batch_size`` indices (rank ``r`` gets its ``r``-th slice)."""
        return [(self._keys[pos], batch.tolist()) for pos, batch in self._current().batches]

    def __len__(self) -> int:
        """Steps this epoch (the same on every rank)."""
        return len(self._current().batches)

    def __iter__(self) -> Iterator[list[int]]:
        lo = self.rank * self.batch_size
        hi = lo + self.batch_size
        for _, batch in self._current().batches:
            yield batch[lo:hi].tolist()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(buckets={len(self._keys)}, "
            f"indices={sum(g.size for g in self._groups)}, excluded={self._excluded}, "
            f"batch_size={self.batch_size}, world_size={self.world_size}, rank={self.rank}, "
            f"leftover={self.leftover!r}, seed={self.seed}, epoch={self._epoch})"
        )

    # -- internals -----------------------------------------------------------------------

    def _current(self) -> _Epoch:
        """The plan for ``self.epoch``, replaying carry-over from the cache or epoch 0."""
        target = self._epoch
        cache = self._cache
        if cache is not None and cache.epoch == target:
            return cache
        empty = [np.empty(0, dtype=np.int64) for _ in self._groups]
        if self.leftover == "pad":
            start, carry = target, empty
        elif cache is not None and cache.epoch < target:
            start, carry = cache.epoch + 1, cache.carry_out
        else:
            start, carry = 0, empty
        for e in range(start, target):
            carry = self._plan(e, carry).carry_out
        self._cache = self._plan(target, carry)
        return self._cache

    def _plan(self, epoch: int, carry_in: list[np.ndarray]) -> _Epoch:
        gbs = self.global_batch_size
        rng = np.random.default_rng([self.seed, epoch])
        per_bucket: list[np.ndarray] = []
        carry_out: list[np.ndarray] = []
        padded = 0
        for idx, carry in zip(self._groups, carry_in):
            fresh = rng.permutation(idx) if self.shuffle else idx
            if self.leftover == "carry":
                if carry.size and idx.size >= gbs:
                    fresh = _separate_from_carry(carry, fresh, gbs)
                queue = np.concatenate([carry, fresh])
            else:
                queue = fresh
            n_full = queue.size // gbs
            full = queue[: n_full * gbs].reshape(n_full, gbs)
            rest = queue[n_full * gbs :]
            if self.leftover == "pad" and rest.size:
                fill = self._padding(rng, idx, rest, gbs - rest.size)
                padded += fill.size
                full = np.concatenate([full, np.concatenate([rest, fill])[None, :]])
                rest = rest[:0]
            per_bucket.append(full)
            carry_out.append(rest.copy())
        labels = np.repeat(np.arange(len(per_bucket)), [b.shape[0] for b in per_bucket])
        if self.shuffle:
            rng.shuffle(labels)
        cursor = [0] * len(per_bucket)
        batches: list[tuple[int, np.ndarray]] = []
        for pos in labels.tolist():
            batches.append((pos, per_bucket[pos][cursor[pos]]))
            cursor[pos] += 1
        return _Epoch(epoch, batches, list(carry_in), carry_out, padded)

    def _padding(
        self, rng: np.random.Generator, idx: np.ndarray, rest: np.ndarray, need: int
    ) -> np.ndarray:
        """``need`` indices of this bucket to complete its last global batch ``rest``."""
        if idx.size - rest.size >= need:  # enough distinct indices not already in the batch
            candidates = idx[~np.isin(idx, rest)]
            if self.shuffle:
                return rng.choice(candidates, size=need, replace=False)
            return candidates[:need]
        reps = -(-need // idx.size)  # bucket smaller than a global batch: spread repeats
        if self.shuffle:
            return np.concatenate([rng.permutation(idx) for _ in range(reps)])[:need]
        return np.tile(idx, reps)[:need]


def _separate_from_carry(carry: np.ndarray, fresh: np.ndarray, gbs: int) -> np.ndarray:
    """Reorder ``fresh`` so the batch ``carry + fresh[:gbs - len(carry)]`` has no repeats.

    Carried indices found in that head are swapped with the first non-carried indices of the
    (already random) tail. Requires ``len(fresh) >= gbs`` and distinct carried indices, which
    hold whenever a bucket has at least one global batch."""
    head = gbs - carry.size
    clash = np.flatnonzero(np.isin(fresh[:head], carry))
    if clash.size == 0:
        return fresh
    free = head + np.flatnonzero(~np.isin(fresh[head:], carry))[: clash.size]
    out = fresh.copy()
    out[clash], out[free] = fresh[free], fresh[clash]
    return out
