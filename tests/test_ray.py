"""--ray: a real Ray cluster started on this machine, bound to loopback only
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in this process's environment, set by conftest before ray is
imported and inherited by every Ray process it starts). The same manifest as the local run; a
worker killed mid-job still ends with every row present exactly once."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import polars as pl
import pytest

assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"  # set by conftest before ray is imported
ray = pytest.importorskip("ray")

from pycore import distributed  # noqa: E402
from pycore.curation.scan_sources import scan_shards  # noqa: E402
from tests.kit.shards import samples, write_loose, write_shards  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        gcs = ray.get_runtime_context().gcs_address
        assert gcs.startswith("127.0.0.1:"), gcs  # loopback only
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    items = samples(12)
    write_loose(root / "loose", items)
    shards = write_shards(root / "shards", items, per_shard=3)
    return root, items, shards


def test_bucket_and_dedup_with_ray_equal_local(cluster, data, hw, tmp_path, monkeypatch):
    root, items, _ = data
    monkeypatch.chdir(tmp_path)
    for src in (root / "shards", root / "loose"):
        extra = ["--sidecars"] if src.name == "shards" else []
        a, b = tmp_path / f"local-{src.name}.parquet", tmp_path / f"ray-{src.name}.parquet"
        assert hw("bucket", src, "--out", a, *extra).code == 0
        r = hw("bucket", src, "--out", b, "--ray", "local", *extra)
        assert r.code == 0, r.err
        assert pl.read_parquet(a).equals(pl.read_parquet(b)), src
        da, db = tmp_path / f"dl-{src.name}.parquet", tmp_path / f"dr-{src.name}.parquet"
        assert hw("dedup", a, "--out", da).code == 0
        r = hw("dedup", b, "--out", db, "--ray", "local")
        assert r.code == 0, r.err
        assert pl.read_parquet(da).drop("mtime").equals(pl.read_parquet(db).drop("mtime")), src
    assert not list(tmp_path.glob(".hw-ray-parts.*"))  # scratch parts removed
    r = hw("bucket", root / "shards", "--out", tmp_path / "x.parquet", "--ray", "--sidecars")  # forgot the address
    assert r.code == 1 and "--ray local" in r.err


class KillOnce:
    """Scan a unit, but the first attempt at unit ``victim`` kills its own worker process
    (SIGKILL: no cleanup, as when a node dies). A marker file makes it happen exactly once."""

    def __init__(self, scan: distributed.ScanUnit, victim: str, marker: str) -> None:
        self.scan, self.victim, self.marker = scan, victim, marker

    def __call__(self, unit):
        if unit["path"] == self.victim:
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)
        return self.scan(unit)


def test_killed_worker_still_gives_every_row_once(cluster, data, tmp_path):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(__import__(__name__))
    root, items, shards = data
    local = scan_shards([str(s) for s in shards])
    scan = distributed.ScanUnit(hash=True, max_pixels=178_956_970, threads=1)
    marker = str(tmp_path / "killed")
    fn = KillOnce(scan, str(shards[1]), marker)
    units = [{"kind": "shard", "path": str(s)} for s in shards]
    res = distributed.run_units(fn, units, parts_dir=tmp_path / "parts")
    assert Path(marker).exists()  # the worker really was killed
    got = res.frame()
    assert got["path"].to_list() == local.frame["path"].to_list()  # every row, once, in order
    assert got.drop("path_bytes").equals(local.frame.drop("path_bytes"))


def test_spm_score_with_ray_equals_local(cluster, data, hw, kit_spm, tmp_path, monkeypatch):
    root, items, _ = data
    monkeypatch.chdir(tmp_path)
    m = tmp_path / "m.parquet"
    assert hw("bucket", root / "shards", "--out", m, "--sidecars").code == 0
    common = ["--prompt-column", "source_caption", "--model", kit_spm, "--device", "cpu"]
    r = hw("spm-score", m, "--out", tmp_path / "a.parquet", *common)
    assert r.code == 0, r.err
    r = hw("spm-score", m, "--out", tmp_path / "b.parquet", *common, "--ray", "local")
    assert r.code == 0, r.err
    a, b = pl.read_parquet(tmp_path / "a.parquet"), pl.read_parquet(tmp_path / "b.parquet")
    assert a.drop("spm_score").equals(b.drop("spm_score"))
    sa, sb = a["spm_score"].to_list(), b["spm_score"].to_list()
    assert [x is None for x in sa] == [x is None for x in sb] and sum(x is not None for x in sa) >= 10
    assert all(abs(x - y) < 1e-5 for x, y in zip(sa, sb, strict=True) if x is not None)
