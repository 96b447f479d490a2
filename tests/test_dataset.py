"""The training dataset loads the same pixels from files, tar members and Parquet cells, cropped
as the manifest says, in bucket-pure batches from the bucket sampler."""

from __future__ import annotations

import polars as pl
import pytest
import torch

from pycore.curation.dataset import ManifestDataset, collate
from pycore.errors import HwError
from tests.kit.shards import bucketed_sets, samples


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    made = bucketed_sets(root, 10, ("--table", "generated", "--max-area", "4096", "--step", "16", "--min-side", "16"))
    return samples(10), {name: ManifestDataset(m) for name, m in made.items()}


def test_same_pixels_from_every_source(sets):
    items, ds = sets
    assert len(ds["loose"]) == len(ds["shards"]) == len(ds["table"]) == len(items)
    loose_by_name = {p.rpartition("/")[2]: i for i, p in enumerate(ds["loose"].paths)}
    n_ok = 0
    for name in ("shards", "table"):
        d = ds[name]
        for i, p in enumerate(d.paths):
            item_name = p.rpartition("::")[2] if name == "shards" else items[int(p.rpartition("/")[2])][0]
            j = loose_by_name[item_name]
            if d.frame["status"][i] != "ok":
                with pytest.raises(HwError, match="no bucket"):
                    d[i]
                continue
            a, b = d[i], ds["loose"][j]
            assert torch.equal(a["pixel_values"], b["pixel_values"])
            assert a["target_size"] == b["target_size"] and a["crop_top_left"] == b["crop_top_left"]
            h, w = a["target_size"]
            assert a["pixel_values"].shape == (3, h, w)
            n_ok += 1
    assert n_ok >= 20


def test_loader_batches_are_bucket_pure(sets):
    _, ds = sets
    d = ds["shards"]
    sampler = d.sampler(batch_size=2, seed=0, leftover="pad")
    loader = torch.utils.data.DataLoader(d, batch_sampler=sampler, collate_fn=collate, num_workers=0)
    seen = set()
    for batch in loader:
        x = batch["pixel_values"]
        assert x.ndim == 4 and x.shape[0] == 2 and x.min() >= -1 and x.max() <= 1
        assert len(set(batch["target_size"])) == 1
        seen.update(batch["index"])
    ok = set(d.frame.with_row_index().filter(pl.col("status") == "ok")["index"].to_list())
    assert seen == ok
