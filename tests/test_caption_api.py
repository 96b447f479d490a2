"""`pycore.caption.run.caption_manifest` as a Python API: no Typer, a progress callback, typed results."""

from __future__ import annotations

import pytest

from tests.kit.fake_openai import FakeOpenAI
from pycore.caption.request import CaptionRequest
from pycore.caption.run import CaptionResult, NothingCaptioned, caption_manifest
from pycore.errors import HwError
from pycore.manifest import Manifest
from test_caption_openai import make_images


class Recorder:
    def __init__(self) -> None:
        self.stages: list[tuple[str, int | None, str]] = []
        self.done = 0

    def stage(self, name: str, total: int | None = None, unit: str = "items") -> None:
        self.stages.append((name, total, unit))

    def advance(self, n: int = 1) -> None:
        self.done += n


@pytest.fixture
def manifest(tmp_path, hw):
    root = tmp_path / "ds"
    make_images(root, 4)
    m = tmp_path / "m.parquet"
    assert hw("bucket", root, "--out", m, "--json").code == 0
    return m


def test_caption_manifest_without_the_cli(manifest, tmp_path):
    out = tmp_path / "c.parquet"
    prog = Recorder()
    with FakeOpenAI() as srv:
        res = caption_manifest(CaptionRequest(manifest, out, base_url=srv.base_url, model="fake-vision", concurrency=2), progress=prog)
    assert isinstance(res, CaptionResult)
    assert res.merge is not None and res.merge.ok == 4 and res.asked == 4 and res.captioned_now == 4
    assert res.api is not None and res.api["requests"] == 4
    assert prog.stages == [("captioning", 4, "img")] and prog.done == 4
    m = Manifest.read(out)
    assert m.history[-1] == "caption" and m.get("caption")["model"] == "fake-vision"
    assert m.get("root") == Manifest.read(manifest).get("root")  # earlier metadata carried forward
    assert res.to_dict()["ok"] == 4


def test_nothing_captioned_carries_the_result(manifest, tmp_path):
    out = tmp_path / "c.parquet"
    with FakeOpenAI(lambda iid, a: "400") as srv, pytest.raises(NothingCaptioned) as ei:
        caption_manifest(CaptionRequest(manifest, out, base_url=srv.base_url, model="m"))
    assert ei.value.exit_code == 3 and ei.value.result.merge.failed == 4 and out.exists()


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"concurrency": 0}, "--concurrency must be between 1 and 1,024"),
        ({"concurrency": 10**9}, "--concurrency must be between 1 and 1,024"),
        ({"max_attempts": -1}, "--max-attempts"),
        ({"timeout": float("nan")}, "--timeout must be a finite number"),
        ({"temperature": 3}, "--temperature"),
        ({"n_tags": 0}, "--n-tags"),
        ({"batch_size": 10**12}, "--batch-size"),
        ({"limit": -1}, "--limit must be at least 0"),
        ({"backend": "gemini"}, "--backend must be openai or openclip"),
        ({"quality_percentiles": "10,x"}, "--quality-percentiles must be 4 comma-separated numbers"),
        ({"metadata": "meta.txt"}, "--metadata must end in .json or .jsonl"),
        ({"backend": "openclip", "quality_from": "model"}, "--quality-from model needs --backend openai"),
        ({"batch_export": "b", "batch_import": ["r.jsonl"]}, "separate runs"),
    ],
)
def test_request_validation(kw, msg, tmp_path):
    with pytest.raises(HwError, match=msg.replace("(", r"\(").replace("+", r"\+")):
        CaptionRequest(tmp_path / "m.parquet", tmp_path / "c.parquet", **kw)


def test_api_key_is_not_in_repr(tmp_path):
    r = CaptionRequest(tmp_path / "m.parquet", tmp_path / "c.parquet", api_key="sk-SECRET-123")
    assert "sk-SECRET" not in repr(r)
