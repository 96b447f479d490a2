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


def assert_loopback_only() -> None:
    """Every inet socket of this process and of the Ray processes it started is on loopback."""
    psutil = pytest.importorskip("psutil")
    me = psutil.Process()
    seen = 0
    for proc in [me, *me.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            for addr in (c.laddr, c.raddr):
                if addr:
                    seen += 1
                    assert addr.ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1"), (proc.name(), c)
    assert seen  # Ray's GCS, raylet and workers do talk (over loopback)


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
    assert_loopback_only()
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


def test_caption_with_ray_equals_local_and_never_writes_the_key(cluster, data, hw, tmp_path, monkeypatch):
    from tests.kit.fake_openai import FakeOpenAI

    root, items, _ = data
    monkeypatch.chdir(tmp_path)
    m = tmp_path / "m.parquet"
    assert hw("bucket", root / "shards", "--out", m).code == 0
    common = ["--model", "fake-vision", "--api-key-env", KEY_ENV, "--json"]
    with FakeOpenAI(api_key=SECRET) as srv:  # refuses requests without the key: the workers had it
        r = hw("caption", m, "--out", tmp_path / "a.parquet", "--base-url", srv.base_url, *common)
        assert r.code == 0, r.err
        local_served = sum(srv.served_ok.values())
        r = hw("caption", m, "--out", tmp_path / "b.parquet", "--base-url", srv.base_url, *common, "--ray", "local")
        assert r.code == 0, r.err
        assert sum(srv.served_ok.values()) == 2 * local_served  # every image asked once per run
        assert set(srv.served_ok.values()) == {2}
    cols = ["path", "caption_status", "caption", "summary", "quality"]
    a, b = pl.read_parquet(tmp_path / "a.parquet"), pl.read_parquet(tmp_path / "b.parquet")
    assert a.select(cols).equals(b.select(cols))
    assert (b["caption_status"] == "ok").sum() >= 10
    assert files_containing(tmp_path, SECRET.encode()) == []  # outputs, stores, Ray parts
    assert files_containing(cluster, SECRET.encode()) == []  # Ray's session: logs, object spill, GCS files
    assert_loopback_only()


class KillAfterRecords:
    """Caption a unit, but during the first attempt at unit ``victim`` SIGKILL the worker once its
    tagged store shard holds ``after`` results (mid-unit, as when a node dies)."""

    def __init__(self, unit, victim: int, after: int, marker: str) -> None:
        self.unit, self.victim, self.after, self.marker = unit, victim, after, marker

    def __call__(self, u):
        if u["k"] == self.victim:
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.close(fd)
                threading.Thread(target=self._watch, args=(u["k"],), daemon=True).start()
        return self.unit(u)

    def _watch(self, k: int) -> None:
        folder = Path(self.unit.store_dir)
        while True:
            lines = sum(p.read_bytes().count(b"\n") for p in folder.glob(f"shard-*-u{k:06d}.jsonl"))
            if lines >= self.after:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.005)


def test_caption_killed_worker_resumes_and_captions_each_image_once(cluster, data, tmp_path):
    import ray.cloudpickle

    from pycore.caption.openai_backend import OpenAIConfig
    from pycore.caption.store import ResultStore, job_fingerprint
    from pycore.curation.scan import scan_folder
    from tests.kit.fake_openai import FakeOpenAI

    ray.cloudpickle.register_pickle_by_value(__import__(__name__))
    root, items, _ = data
    frame = scan_folder(str(root / "loose")).frame.filter(pl.col("status") == "ok").unique("content_hash", keep="first")
    todo = list(zip(frame["content_hash"].to_list(), frame["path"].to_list(), strict=True))
    with FakeOpenAI(api_key=SECRET, latency=0.05) as srv:
        cfg = OpenAIConfig(base_url=srv.base_url, model="fake-vision", concurrency=1)
        job = job_fingerprint(cfg.job_options())
        unit = distributed.CaptionUnit("openai", cfg, job, str(tmp_path / "store"), KEY_ENV)
        marker = str(tmp_path / "killed")
        run = distributed.caption(todo, KillAfterRecords(unit, 1, 2, marker), address="local", chunk=4)
        served = sum(srv.served_ok.values())
    assert Path(marker).exists()  # the worker really was killed mid-unit
    assert run.resumed >= 2  # the retried unit read back what it had finished
    got = ResultStore(tmp_path / "store", job).load()
    assert sorted(got) == sorted(k for k, _ in todo) and all(r["status"] == "ok" for r in got.values())
    # each image answered once; at most the one request in flight at the kill was asked again
    assert len(todo) <= served <= len(todo) + 1, (served, len(todo))
    assert files_containing(tmp_path, SECRET.encode()) == []
