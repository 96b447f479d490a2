"""The shared checks every command uses: ranges, threads, devices, dtypes, outputs, hub names,
and the manifest that carries itself forward."""

from __future__ import annotations

import os
import warnings

import polars as pl
import pytest

from pycore import checks, hub
from pycore.errors import HwError, HwWarning, ManifestError, NothingDone, first_line
from pycore.limits import cpu_count, max_threads
from pycore.manifest import Manifest, new_manifest


@pytest.mark.parametrize("value", [-1, 6, 10**30])
def test_check_int_out_of_range_names_the_bound(value):
    with pytest.raises(HwError, match=r"--n must be between 0 and 5, not"):
        checks.check_int("--n", value, 0, 5)


@pytest.mark.parametrize("value", ["3", 2.5, True, None])
def test_check_int_wrong_type(value):
    with pytest.raises(HwError, match="whole number"):
        checks.check_int("--n", value, 0, 5)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1.0, -0.1])
def test_check_float_rejects_nonfinite_and_open_bound(value):
    with pytest.raises(HwError, match=r"--f must be a finite number in \[0, 1\)"):
        checks.check_float("--f", value, 0.0, 1.0, hi_open=True)
    assert checks.check_float("--f", 0.5, 0.0, 1.0, hi_open=True) == 0.5


def test_threads_default_env_and_cap(monkeypatch):
    monkeypatch.delenv("HW_THREADS", raising=False)
    assert checks.resolve_threads(None) == cpu_count()
    assert checks.resolve_threads(0) == cpu_count()
    assert checks.resolve_threads(3) == 3
    monkeypatch.setenv("HW_THREADS", "2")
    assert checks.resolve_threads(None) == 2
    monkeypatch.setenv("HW_THREADS", "many")
    with pytest.raises(HwError, match="HW_THREADS"):
        checks.resolve_threads(None)
    with pytest.warns(HwWarning, match=f"using {max_threads()}"):
        assert checks.resolve_threads(100_000) == max_threads()
    with pytest.raises(HwError):
        checks.resolve_threads(-1)


def test_dtypes():
    import torch

    assert checks.parse_dtype("bf16") is torch.bfloat16
    assert checks.parse_dtype("torch.float16") is torch.float16
    assert checks.parse_dtype(torch.float32) is torch.float32
    assert checks.dtype_name("half") == "float16"
    with pytest.raises(HwError, match="--vae-dtype must be one of"):
        checks.parse_dtype("int8", "--vae-dtype")


def test_devices():
    import torch

    assert checks.parse_device("cpu") == "cpu"
    assert checks.parse_device("auto") in ("cpu", "cuda", "mps")
    with pytest.raises(HwError, match="must be auto, cpu, cuda"):
        checks.parse_device("tpu")
    with pytest.raises(HwError, match="must be auto, cpu, cuda"):
        checks.parse_device("cpu:1")
    if not torch.cuda.is_available():
        with pytest.raises(HwError, match="use --device cpu"):
            checks.parse_device("cuda:0")


def test_check_output(tmp_path):
    src = tmp_path / "in.bin"
    src.write_bytes(b"x")
    os.link(src, tmp_path / "link.bin")
    with pytest.raises(HwError, match="also an input"):
        checks.check_output(tmp_path / "link.bin", inputs=[src], overwrite=True)
    with pytest.raises(HwError, match="also an input"):
        checks.check_output(tmp_path / "." / "in.bin", inputs=[src], overwrite=True)
    with pytest.raises(HwError, match="contains the input"):
        checks.check_output(tmp_path, inputs=[src], overwrite=True, folder=True)
    with pytest.raises(HwError, match="is a folder"):
        checks.check_output(tmp_path, overwrite=True)
    with pytest.raises(HwError, match="is a file"):
        checks.check_output(src, overwrite=True, folder=True)
    with pytest.raises(HwError, match="does not exist"):
        checks.check_output(tmp_path / "no" / "out.parquet")
    with pytest.raises(HwError, match="--overwrite"):
        checks.check_output(src)
    with pytest.raises(HwError, match="UTF-8"):
        checks.check_output(os.fsdecode(bytes(tmp_path) + b"/bad\xff.parquet"))
    assert checks.check_output(tmp_path / "new.parquet", inputs=[src]) == tmp_path / "new.parquet"
    assert checks.check_output(None) is None


def test_check_output_unwritable_folder(tmp_path):
    """As an ordinary user sees it, also under root (tests.conftest.unprivileged drops the capabilities)."""
    import subprocess
    import sys

    from tests.conftest import REPO, unprivileged

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    code = ("import sys; from pycore.checks import check_output\n"
            "try: check_output(sys.argv[1])\nexcept Exception as e: print(type(e).__name__, e)")  # fmt: skip
    try:
        p = subprocess.run([*unprivileged(), sys.executable, "-c", code, str(ro / "x.parquet")], capture_output=True, text=True, cwd=REPO)
    finally:
        ro.chmod(0o700)
    assert p.stdout.startswith("HwError") and "not writable" in p.stdout, p.stdout + p.stderr


def test_hub_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert hub.looks_local("models/nope")  # a typo of a local folder, not owner/repo
    assert not hub.looks_local("stabilityai/stable-diffusion-xl-base-1.0")
    assert hub.looks_local("./spm") and hub.looks_local("/abs/x") and hub.looks_local("x.safetensors")
    assert not hub.looks_local("owner/repo/unet/x.safetensors")
    with pytest.raises(hub.ModelNotFound, match="no such file or folder"):
        hub.check_local("models/nope", "SPM")
    assert hub.check_local("stabilityai/sdxl") is None
    assert hub.check_local("models") == tmp_path / "models" or hub.check_local("models").name == "models"


def test_hub_offline_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(hub.ModelNotFound, match="not in the Hugging Face cache.*hf download owner/none"):
        hub.hub_file("owner/none", "config.json", what="SPM")


def test_first_line_and_exit_codes():
    assert first_line(ValueError("a\nb")) == "a"
    assert first_line(KeyError()) == "KeyError"
    assert len(first_line(ValueError("x" * 1000))) == 300
    assert NothingDone("x").exit_code == 3 and HwError("x").exit_code == 1


def test_cli_exit_code_and_warning_rendering(hw, tmp_path, monkeypatch):
    """NothingDone exits 3 with one line; HwWarnings print as `warning:` lines."""
    import typer

    from cli import app as app_mod

    def boom() -> None:
        warnings.warn("careful", HwWarning)
        raise NothingDone("nothing to do")

    monkeypatch.setattr(app_mod, "app", typer.Typer())
    app_mod.app.command("boom")(boom)
    app_mod.app.command("other")(lambda: None)
    r = hw("boom")
    assert r.code == 3 and "hw: error: nothing to do" in r.err and "warning: careful" in r.err
    assert "Traceback" not in r.err


def _frame(n: int = 3) -> pl.DataFrame:
    return pl.DataFrame({"path": [f"/d/{i}.jpg" for i in range(n)], "status": ["ok"] * n, "width": [64] * n})


def test_manifest_derive_keeps_rows_columns_and_metadata(tmp_path):
    m0 = new_manifest(_frame(), "bucket", {"root": "/d", "table": "helloworld"})
    m0.write(tmp_path / "a.parquet")
    m1 = Manifest.read(tmp_path / "a.parquet")
    assert m1.get("root") == "/d" and m1.history == ["bucket"]
    f = m1.frame.with_columns(pl.lit("x").alias("phash")).reverse()
    m2 = m1.derive(f, "dedup", {"dedup_hash_mode": "exact", "dedup_threshold": 10})
    m2.write(tmp_path / "b.parquet")
    m3 = Manifest.read(tmp_path / "b.parquet")
    assert m3.get("root") == "/d" and m3.get("dedup_threshold") == 10 and m3.history == ["bucket", "dedup"]
    assert set(m3.frame.columns) >= {"path", "status", "width", "phash"}
    with pytest.raises(ManifestError, match="drop column"):
        m3.derive(m3.frame.drop("width"), "caption")
    with pytest.raises(ManifestError, match="never drop or add rows"):
        m3.derive(m3.frame.head(2), "caption")
    with pytest.raises(ManifestError, match="paths differ"):
        m3.derive(m3.frame.with_columns(pl.lit("/e").alias("path")), "caption")


def test_unresolvable_hub_counts_as_offline(monkeypatch, tmp_path):
    """No network (the hub's name does not resolve): a hub lookup says offline / not cached at once
    instead of huggingface_hub's ~25 s of retries per file."""
    import socket

    def no_dns(*a, **k):
        raise socket.gaierror(-2, "Name or service not known")

    for k in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    hub.hub_resolvable.cache_clear()
    try:
        assert hub.offline() and not hub.offline(False)
        with pytest.raises(HwError, match="not in the Hugging Face cache while hub access is off"):
            hub.hub_file("no-such-owner/no-such-repo", "config.json")
        monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")  # the proxy resolves names: not offline
        hub.hub_resolvable.cache_clear()
        assert not hub.offline()
    finally:
        hub.hub_resolvable.cache_clear()
