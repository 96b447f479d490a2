"""Tests for pycore.curation.sampler.BucketBatchSampler."""

from __future__ import annotations

import ast
import inspect
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pycore.curation import sampler as sampler_module
from pycore.curation.sampler import BucketBatchSampler

PROPERTY = settings(
    max_examples=40,
    deadline=None,
    database=None,  # keep the repo free of an example database
    suppress_health_check=[HealthCheck.too_slow],
)


def bucket_ids_for(sizes: list[int], seed: int = 0) -> list[int]:
    """Interleaved bucket ids: bucket b appears sizes[b] times, in a shuffled order."""
    ids = np.repeat(np.arange(len(sizes)), sizes)
    np.random.default_rng(seed).shuffle(ids)
    return ids.tolist()


def plan_of(s: BucketBatchSampler, epoch: int) -> list[tuple[object, list[int]]]:
    s.set_epoch(epoch)
    return s.epoch_plan()


def by_bucket(indices: list[int], ids: list[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i in indices:
        out.setdefault(ids[i], []).append(i)
    return out


def check_batches(s: BucketBatchSampler, ids: list[object]) -> None:
    """Every global batch is full and single-bucket; every rank batch has batch_size items."""
    for key, batch in s.epoch_plan():
        assert len(batch) == s.global_batch_size
        assert {ids[i] for i in batch} == {key}
    batches = list(s)
    assert len(batches) == len(s)
    assert all(len(b) == s.batch_size and all(type(i) is int for i in b) for b in batches)


configs = st.fixed_dictionaries(
    {
        "sizes": st.lists(st.integers(0, 40), min_size=1, max_size=4),
        "batch_size": st.integers(1, 4),
        "world_size": st.integers(1, 3),
        "seed": st.integers(0, 2**32),
        "order": st.integers(0, 1000),
    }
)


# -- no image lost ---------------------------------------------------------------------------


@PROPERTY
@given(cfg=configs, epochs=st.integers(1, 4))
def test_carry_loses_no_image(cfg: dict, epochs: int) -> None:
    ids = bucket_ids_for(cfg["sizes"], cfg["order"])
    s = BucketBatchSampler(
        ids, cfg["batch_size"], seed=cfg["seed"], world_size=cfg["world_size"]
    )
    previous_pending: list[int] = []
    for e in range(epochs):
        plan = plan_of(s, e)
        check_batches(s, ids)
        seen = [i for _, batch in plan for i in batch]
        # carried in + every index once == seen this epoch + carried out
        assert Counter(seen) + Counter(s.pending()) == Counter(previous_pending) + Counter(
            range(len(ids))
        )
        assert s.carried_in == len(previous_pending)
        assert s.carried_out == len(s.pending())
        assert s.padded == 0
        # what was pending opens its bucket's queue this epoch
        queue = by_bucket(seen + s.pending(), ids)
        for bucket, carried in by_bucket(previous_pending, ids).items():
            assert queue[bucket][: len(carried)] == carried
        previous_pending = s.pending()


@PROPERTY
@given(cfg=configs, epoch=st.integers(0, 5))
def test_pad_sees_every_index_every_epoch(cfg: dict, epoch: int) -> None:
    ids = bucket_ids_for(cfg["sizes"], cfg["order"])
    s = BucketBatchSampler(
        ids,
        cfg["batch_size"],
        seed=cfg["seed"],
        world_size=cfg["world_size"],
        leftover="pad",
    )
    plan = plan_of(s, epoch)
    check_batches(s, ids)
    seen = [i for _, batch in plan for i in batch]
    assert set(seen) == set(range(len(ids)))
    gbs = s.global_batch_size
    assert s.padded == sum(-n % gbs for n in cfg["sizes"])
    assert len(seen) == len(ids) + s.padded
    assert s.carried_in == s.carried_out == 0 and s.pending() == []
    # each bucket: every member once, plus exactly its padding as repeats
    for bucket, members in by_bucket(seen, ids).items():
        counts = Counter(members)
        assert sum(counts.values()) - len(counts) == -cfg["sizes"][bucket] % gbs


@PROPERTY
@given(
    cfg=configs.filter(lambda c: min(c["sizes"]) >= c["batch_size"] * c["world_size"]),
    leftover=st.sampled_from(["carry", "pad"]),
)
def test_no_repeats_within_a_batch_when_buckets_hold_a_global_batch(
    cfg: dict, leftover: str
) -> None:
    ids = bucket_ids_for(cfg["sizes"], cfg["order"])
    s = BucketBatchSampler(
        ids,
        cfg["batch_size"],
        seed=cfg["seed"],
        world_size=cfg["world_size"],
        leftover=leftover,
    )
    for e in range(4):
        for _, batch in plan_of(s, e):
            assert len(set(batch)) == len(batch)


# -- ranks ------------------------------------------------------------------------------------


@PROPERTY
@given(cfg=configs, leftover=st.sampled_from(["carry", "pad"]), epoch=st.integers(0, 3))
def test_every_rank_sees_the_same_bucket_each_step(
    cfg: dict, leftover: str, epoch: int
) -> None:
    ids = bucket_ids_for(cfg["sizes"], cfg["order"])
    ws, bs = cfg["world_size"], cfg["batch_size"]
    ranks = [
        BucketBatchSampler(
            ids, bs, seed=cfg["seed"], world_size=ws, rank=r, leftover=leftover
        )
        for r in range(ws)
    ]
    for s in ranks:
        s.set_epoch(epoch)
    assert len({len(s) for s in ranks}) == 1
    plan = ranks[0].epoch_plan()
    per_rank = [list(s) for s in ranks]
    for step, (key, global_batch) in enumerate(plan):
        rank_batches = [batches[step] for batches in per_rank]
        assert all({ids[i] for i in b} == {key} for b in rank_batches)
        # the ranks' batches are the consecutive slices of the global batch
        assert [i for b in rank_batches for i in b] == global_batch
        for r, b in enumerate(rank_batches):
            assert b == global_batch[r * bs : (r + 1) * bs]
    # every rank computes the same plan
    assert all(s.epoch_plan() == plan for s in ranks)


def test_ranks_get_disjoint_slices_in_a_large_bucket() -> None:
    ids = [7] * 64
    ranks = [BucketBatchSampler(ids, 4, world_size=4, rank=r) for r in range(4)]
    for step in zip(*ranks):
        flat = [i for b in step for i in b]
        assert len(flat) == len(set(flat)) == 16


# -- determinism ------------------------------------------------------------------------------


def test_same_seed_same_plan_and_epochs_differ() -> None:
    ids = bucket_ids_for([50, 37, 20, 9], seed=1)
    a = BucketBatchSampler(ids, 4, seed=123, world_size=2)
    b = BucketBatchSampler(list(ids), 4, seed=123, world_size=2)
    assert plan_of(a, 0) == plan_of(b, 0)
    assert plan_of(a, 1) == plan_of(b, 1)
    assert plan_of(a, 0) != plan_of(a, 1)
    c = BucketBatchSampler(ids, 4, seed=124, world_size=2)
    assert plan_of(c, 0) != plan_of(a, 0)


@PROPERTY
@given(cfg=configs, target=st.integers(0, 6), leftover=st.sampled_from(["carry", "pad"]))
def test_set_epoch_on_fresh_sampler_equals_stepping(
    cfg: dict, target: int, leftover: str
) -> None:
    ids = bucket_ids_for(cfg["sizes"], cfg["order"])
    kw = dict(seed=cfg["seed"], world_size=cfg["world_size"], leftover=leftover)
    stepped = BucketBatchSampler(ids, cfg["batch_size"], **kw)
    for e in range(target + 1):
        plan = plan_of(stepped, e)
    fresh = BucketBatchSampler(ids, cfg["batch_size"], **kw)
    assert plan_of(fresh, target) == plan
    assert fresh.pending() == stepped.pending()
    assert fresh.carried_in == stepped.carried_in
    # going back recomputes from scratch and still agrees
    again = BucketBatchSampler(ids, cfg["batch_size"], **kw)
    assert plan_of(stepped, 0) == plan_of(again, 0)


def test_set_epoch_3_equals_stepping_0_to_3() -> None:
    ids = bucket_ids_for([23, 11, 5], seed=3)
    stepped = BucketBatchSampler(ids, 3, seed=7, world_size=2)
    for e in range(4):
        stepped.set_epoch(e)
        stepped_batches = list(stepped)
    fresh = BucketBatchSampler(ids, 3, seed=7, world_size=2)
    fresh.set_epoch(3)
    assert list(fresh) == stepped_batches
    assert fresh.carried_in > 0 or fresh.carried_out > 0  # the carry actually mattered


def test_iteration_does_not_advance_the_epoch() -> None:
    s = BucketBatchSampler(bucket_ids_for([20, 20]), 4)
    assert list(s) == list(s)
    assert s.epoch == 0


# -- small buckets ----------------------------------------------------------------------------


def test_small_bucket_with_carry_is_eventually_seen() -> None:
    ids = [0] * 40 + [1] * 3  # bucket 1 holds 3 images, a global batch is 8
    s = BucketBatchSampler(ids, 4, world_size=2, seed=5)
    small = set(range(40, 43))
    seen_small: list[int] = []
    for e in range(3):
        plan = plan_of(s, e)
        seen_small += [i for key, batch in plan if key == 1 for i in batch]
        if e < 2:  # 3, then 6 queued: not yet a global batch
            assert seen_small == []
            assert set(s.pending()) >= small
    assert len(seen_small) == 8 and set(seen_small) == small
    assert Counter(s.pending())[40] + Counter(s.pending())[41] + Counter(s.pending())[42] == 1


def test_small_bucket_with_pad_is_padded() -> None:
    ids = [0] * 40 + [1] * 3
    s = BucketBatchSampler(ids, 4, world_size=2, leftover="pad")
    for e in range(3):
        plan = plan_of(s, e)
        small = [batch for key, batch in plan if key == 1]
        assert len(small) == 1 and set(small[0]) == {40, 41, 42}
        assert s.padded == 5  # bucket 1: 8 - 3; bucket 0: 40 is a multiple of 8
        # repeats are spread evenly: no index more than once over the others
        counts = Counter(small[0]).values()
        assert max(counts) - min(counts) <= 1


# -- inputs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -2}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"world_size": 0}, "world_size"),
        ({"rank": -1}, "rank"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"leftover": "drop"}, "leftover"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_arguments_raise_value_error(kwargs: dict, message: str) -> None:
    args = {"batch_size": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        BucketBatchSampler([0, 0, 1], args.pop("batch_size"), **args)


def test_invalid_epoch_raises() -> None:
    s = BucketBatchSampler([0, 1], 1)
    with pytest.raises(ValueError, match="epoch"):
        s.set_epoch(-1)


def test_excluded_keys_are_counted_and_never_sampled() -> None:
    ids = [0, None, 1, -1, 0, float("nan"), 1, 0]
    s = BucketBatchSampler(ids, 1, leftover="pad")
    assert s.excluded == 3
    assert s.bucket_counts() == {0: 3, 1: 2}
    assert sorted(i for b in s for i in b) == [0, 2, 4, 6, 7]
    arr = BucketBatchSampler(np.array([0, -1, 1, 0, -5]), 1)
    assert arr.excluded == 2 and arr.bucket_counts() == {0: 2, 1: 1}


def test_tuple_keys_and_numpy_rows_agree() -> None:
    sizes = [(832, 1216), (1024, 1024), (832, 1216), None, (1024, 1024), (832, 1216)]
    as_list = BucketBatchSampler(sizes, 1, seed=3)
    rows = np.array([s if s else (-1, -1) for s in sizes])
    as_rows = BucketBatchSampler(rows, 1, seed=3)
    assert as_list.bucket_counts() == as_rows.bucket_counts() == {
        (832, 1216): 3,
        (1024, 1024): 2,
    }
    assert as_list.excluded == as_rows.excluded == 1
    assert plan_of(as_list, 2) == plan_of(as_rows, 2)
    # keys are plain Python values
    assert all(type(v) is int for key in as_rows.bucket_counts() for v in key)


def test_from_sizes_keys_by_width_height_and_excludes_null_sizes() -> None:
    widths = [832, None, 1024, 832, float("nan"), 1024, -1, 832, 0]
    heights = [1216, 1024, 1024, 1216, 1024, 1024, 1024, None, 1024]
    s = BucketBatchSampler.from_sizes(widths, heights, 2, seed=1, leftover="pad")
    assert s.excluded == 5  # None, NaN, negative, missing height, zero width
    assert s.bucket_counts() == {(832, 1216): 2, (1024, 1024): 2}
    for key, batch in s.epoch_plan():
        assert all((widths[i], heights[i]) == key for i in batch)
    w = np.array([832.0, 1024.0, np.nan, 832.0])
    h = np.array([1216, 1024, 1024, 1216])
    t = BucketBatchSampler.from_sizes(w, h, 1)
    assert t.excluded == 1 and t.bucket_counts() == {(832, 1216): 2, (1024, 1024): 1}
    with pytest.raises(ValueError, match="same length"):
        BucketBatchSampler.from_sizes([1, 2], [1], 1)


def test_empty_and_fully_excluded_datasets() -> None:
    for ids in ([], [None, -1]):
        s = BucketBatchSampler(ids, 2)
        assert len(s) == 0 and list(s) == [] and s.pending() == []


def test_no_shuffle_is_ascending_and_bucket_by_bucket() -> None:
    ids = [0, 1, 0, 1, 0, 1, 0, 1, 0]
    s = BucketBatchSampler(ids, 2, shuffle=False)
    assert s.epoch_plan() == [(0, [0, 2]), (0, [4, 6]), (1, [1, 3]), (1, [5, 7])]
    assert s.pending() == [8]
    s.set_epoch(1)
    assert s.epoch_plan()[0] == (0, [8, 0])


def test_usable_as_a_dataloader_batch_sampler_without_torch() -> None:
    s = BucketBatchSampler(bucket_ids_for([10, 6]), 2)
    # DataLoader(batch_sampler=...) only needs iter() and len()
    assert len(list(iter(s))) == len(s) == 8
    tree = ast.parse(inspect.getsource(sampler_module))
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert "torch" not in imported
