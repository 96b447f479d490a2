"""--ray: a real Ray cluster started on this machine, bound to loopback only
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in this process's environment, set by conftest before ray is
imported and inherited by every Ray process it starts). The same manifest as the local run; a
worker killed mid-job still ends with every row present exactly once."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from pathlib import Path

import polars as pl
import pytest

assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"  # set by conftest before ray is imported
ray = pytest.importorskip("ray")

from pycore import distributed  # noqa: E402
from pycore.curation.scan_sources import scan_shards  # noqa: E402
from tests.kit.shards import samples, write_loose, write_shards  # noqa: E402

pytestmark = pytest.mark.slow


#: A caption API key that must never be written anywhere (outputs, stores, Ray's session files).
KEY_ENV = "HW_RAY_TEST_KEY"
SECRET = "sk-hw-ray-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def cluster():
    """Ray on this machine: loopback only, its files in a fresh folder we can search afterwards;
    the key in this process's environment before Ray starts, so the workers inherit it."""
    os.environ[KEY_ENV] = SECRET
    temp = tempfile.mkdtemp(prefix="hwray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False, _temp_dir=temp)
    try:
        gcs = ray.get_runtime_context().gcs_address
        assert gcs.startswith("127.0.0.1:"), gcs  # loopback only
        yield Path(temp)
    finally:
        ray.shutdown()
        os.environ.pop(KEY_ENV, None)
        shutil.rmtree(temp, ignore_errors=True)


def files_containing(root: Path, needle: bytes) -> list[Path]:
    hits = []
    for p in root.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink() and needle in p.read_bytes():
                hits.append(p)
        except OSError:  # sockets, files Ray removes while we look
            pass
    return hits


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    items = samples(12)
    write_loose(root / "loose", items)
    shards = write_shards(root / "shards", items, per_shard=3)
    return root, items, shards


def test_caption_resumes_after_the_driver_is_killed(data, hw, tmp_path, monkeypatch, request):
    """SIGKILL the driver of `hw caption --ray local` mid-run (its local Ray goes with it): the
    results finished so far are in the store, and the next run asks only for the rest. Runs before
    the module's cluster starts (it needs its own Ray processes)."""
    import json
    import subprocess
    import sys

    from tests.kit.fake_openai import FakeOpenAI

    root, items, _ = data
    m = tmp_path / "m.parquet"
    assert hw("bucket", root / "loose", "--out", m).code == 0
    out, store = tmp_path / "c.parquet", tmp_path / "c.parquet.captions"
    ray_tmp = Path(tempfile.mkdtemp(prefix="hwrayk", dir="/tmp"))  # this driver's Ray files, searched below
    pids_before = {int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit()}
    request.addfinalizer(lambda: _end_orphans(pids_before))
    env = {**os.environ, KEY_ENV: SECRET, "RAY_TMPDIR": str(ray_tmp)}
    with FakeOpenAI(api_key=SECRET, latency=0.3) as srv:
        args = ["caption", str(m), "--out", str(out), "--base-url", srv.base_url, "--model", "fake-vision",
                "--api-key-env", KEY_ENV, "--concurrency", "1", "--json"]  # fmt: skip
        code = "import sys; from cli.app import main; sys.exit(main(sys.argv[1:]))"
        p = subprocess.Popen([sys.executable, "-c", code, *args, "--ray", "local"], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and p.poll() is None:
            if sum(f.read_bytes().count(b"\n") for f in store.glob("shard-*.jsonl")) >= 3:
                break
            time.sleep(0.02)
        assert p.poll() is None, p.stderr.read().decode()[-2000:] if p.stderr else ""
        p.kill()  # SIGKILL: no clean-up in the driver
        p.wait(60)
        time.sleep(1.0)  # the orphaned worker notices its raylet is gone and stops (pycore.distributed)
        assert not out.exists()
        before = sum(srv.served_ok.values())
        monkeypatch.setenv(KEY_ENV, SECRET)
        r = hw(*args)
        assert r.code == 0, r.err
        rep = json.loads(r.out)
        served = sum(srv.served_ok.values())
    unique = rep["unique_images"]
    assert rep["reused_from_store"] >= 3 and rep["asked"] == unique - rep["reused_from_store"]
    # each image answered once, but the one request in flight when the driver died
    assert unique <= served <= unique + 1 and before >= 3
    f = pl.read_parquet(out)
    assert (f.filter(pl.col("status") == "ok")["caption_status"] == "ok").all()
    assert files_containing(tmp_path, SECRET.encode()) == []
    assert files_containing(ray_tmp, SECRET.encode()) == []
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _end_orphans(before: set[int]) -> None:
    """Ray's per-node agents of a killed driver may outlive it (re-parented to init, named
    ``ray::…``): end those that appeared during this test, by pid."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in before:
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        if ppid == 1 and cmd.startswith(b"ray::"):
            try:
                os.kill(int(d.name), signal.SIGKILL)
            except OSError:
                pass
