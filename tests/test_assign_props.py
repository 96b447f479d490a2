"""Properties of bucket assignment (hypothesis), run against the Rust core."""

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pycore import _rust

OK = _rust.STATUSES.index("ok")

sides = st.integers(min_value=1, max_value=20000)
bucket = st.tuples(st.integers(32, 4096), st.integers(32, 4096))
tables = st.lists(bucket, min_size=1, max_size=30, unique=True)


def run(table, sizes, **kw):
    w = np.array([s[0] for s in sizes], dtype=np.uint32)
    h = np.array([s[1] for s in sizes], dtype=np.uint32)
    keys = np.arange(len(sizes), dtype=np.uint64)
    return _rust.assign_buckets(table, w, h, keys, **kw)


@settings(max_examples=200, deadline=None)
@given(tables, st.lists(st.tuples(sides, sides), min_size=1, max_size=20), st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_assignment_properties(table, sizes, seed):
    out = run(table, sizes, seed=seed)
    for i, (w, h) in enumerate(sizes):
        assert out["assigned"][i] and out["status_code"][i] == OK
        bw, bh = int(out["bucket_width"][i]), int(out["bucket_height"][i])
        # The chosen bucket minimises the log-ratio distance.
        d = abs(math.log(w / h) - math.log(bw / bh))
        best = min(abs(math.log(w / h) - math.log(x / y)) for x, y in table)
        assert d <= best + 1e-12
        # Scale covers the bucket; the crop lies inside the scaled image.
        s = float(out["scale"][i])
        assert w * s >= bw - 1e-6 and h * s >= bh - 1e-6
        assert math.isclose(s, max(bw / w, bh / h))
        sw, sh = int(out["scaled_width"][i]), int(out["scaled_height"][i])
        assert sw >= bw and sh >= bh and abs(sw - w * s) <= 1 and abs(sh - h * s) <= 1
        cl, ct = int(out["crop_left"][i]), int(out["crop_top"][i])
        assert 0 <= cl <= sw - bw and 0 <= ct <= sh - bh
        assert math.isclose(float(out["crop_fraction"][i]), 1 - bw * bh / (sw * sh), abs_tol=1e-12)
        assert bool(out["upscaled"][i]) == (s > 1)
        if seed is None:
            assert cl == (sw - bw) // 2 and ct == (sh - bh) // 2


def test_ties_are_deterministic():
    table = [(512, 512), (1024, 1024), (768, 768)]
    a = run(table, [(700, 700), (2000, 2000), (100, 100)])
    assert list(zip(a["bucket_width"], a["bucket_height"])) == [(768, 768), (1024, 1024), (512, 512)]
    b = run(list(reversed(table)), [(700, 700), (2000, 2000), (100, 100)])
    assert list(a["bucket_width"]) == list(b["bucket_width"])


def test_random_crop_is_seeded_and_varies():
    table = [(1024, 1024)]
    sizes = [(3000, 1500)] * 50
    a = run(table, sizes, seed=1)
    b = run(table, sizes, seed=1)
    c = run(table, sizes, seed=2)
    assert list(a["crop_left"]) == list(b["crop_left"])
    assert list(a["crop_left"]) != list(c["crop_left"])
    assert len(set(a["crop_left"].tolist())) > 10


def test_unknown_sizes_are_left_alone():
    out = run([(1024, 1024)], [(0, 0), (10, 10)])
    assert list(out["assigned"]) == [False, True]
    assert _rust.STATUSES[out["status_code"][1]] == "ok"


def test_statuses_are_one_vocabulary():
    from pycore import manifest

    assert manifest.STATUSES == tuple(_rust.STATUSES) and manifest.STATUSES[0] == "ok"
    assert set(manifest.BUCKET_STATUSES) == {"too_small", "needs_upscale", "crop_too_large"}
    assert manifest.status_code("too_small") == _rust.STATUSES.index("too_small")
    import pytest

    with pytest.raises(manifest.ManifestError, match="unknown image status 'okay'"):
        manifest.status_code("okay")
    from pycore.limits import MAX_PIXELS

    assert MAX_PIXELS == _rust.MAX_PIXELS == 178_956_970
