"""`hw dedup --review`: the HTML page renders in a real browser (headless Chromium)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian package chromium, scripts/apt-packages.txt)")


def _chromium(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", *args],
                          capture_output=True, timeout=timeout, check=False)  # fmt: skip


@pytest.fixture
def review_page(tmp_path, hw) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    base = Image.fromarray(skdata.chelsea())
    base.save(d / "cat.png")
    base.save(d / "cat <copy> & 'quoted'.jpg", quality=85)
    base.resize((200, 133)).save(d / "cat_small.png")
    Image.fromarray(skdata.rocket()).save(d / "rocket.png")
    m = tmp_path / "m.parquet"
    assert hw("bucket", d, "--out", m).code == 0
    page = tmp_path / "review.html"
    r = hw("dedup", m, "--out", tmp_path / "d.parquet", "--review", page)
    assert r.code == 0, r.err
    return page


def test_review_dom_in_chromium(review_page):
    r = _chromium("--dump-dom", review_page.as_uri())
    assert r.returncode == 0, r.stderr[-500:]
    dom = r.stdout.decode()
    dom = dom.split("<section class=\"gallery\"")[0]  # the duplicate groups (quality galleries follow)
    assert dom.count("<section class=\"group\"") == 1
    assert dom.count("<figure class=\"keep\"") == 1 and dom.count("<figure class=\"remove\"") == 2
    assert dom.count("data:image/jpeg;base64,") == 3
    # the file name is text, not markup
    assert "cat &lt;copy&gt; &amp; 'quoted'.jpg" in dom and "<copy>" not in dom


def test_review_screenshot_not_blank(review_page, tmp_path):
    shot = tmp_path / "shot.png"
    r = _chromium(f"--screenshot={shot}", "--window-size=900,600", review_page.as_uri())
    assert r.returncode == 0 and shot.exists(), r.stderr[-500:]
    px = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # thumbnails drawn: many distinct colours, a good share of non-background pixels
    assert len(np.unique(px.reshape(-1, 3), axis=0)) > 1000
    assert (np.abs(px - px[0, 0]).sum(axis=2) > 30).mean() > 0.1
    # a green (kept) border is visible
    green = (px[..., 1] > 140) & (px[..., 0] < 80) & (px[..., 2] < 80)
    assert green.sum() > 200


@pytest.fixture
def gallery_page(tmp_path, hw) -> Path:
    d = tmp_path / "g"
    d.mkdir()
    from PIL import ImageEnhance, ImageFilter

    base = Image.fromarray(skdata.astronaut()).resize((256, 256))
    for k, s in enumerate((0, 1, 3, 6)):
        (base.filter(ImageFilter.GaussianBlur(s)) if s else base).rotate(90 * k).save(d / f"blur{s}.png")
    ImageEnhance.Brightness(Image.fromarray(skdata.coffee())).enhance(0.3).save(d / "dark.jpg", quality=90)
    Image.fromarray(skdata.chelsea()).save(d / "cat.jpg", quality=90)
    m = tmp_path / "m.parquet"
    assert hw("bucket", d, "--out", m).code == 0
    page = tmp_path / "g.html"
    r = hw("dedup", m, "--out", tmp_path / "o.parquet", "--review", page, "--quality", "--review-gallery", "10")
    assert r.code == 0, r.err
    return page


def _figure_names(dom: str, section: str) -> list[str]:
    import re

    part = dom.split(f'id="{section}"', 1)[1].split("</section>", 1)[0]
    return re.findall(r"<span class=\"name\" title=\"[^\"]*/([^\"/]+)\"", part)


def test_galleries_render_and_sort_in_chromium(gallery_page):
    r = _chromium("--dump-dom", gallery_page.as_uri())
    assert r.returncode == 0, r.stderr[-500:]
    dom = r.stdout.decode()
    for gid in ("gallery-sharpness", "gallery-dark", "gallery-bright", "gallery-outliers", "statistics"):
        assert f'id="{gid}"' in dom, gid
    # lowest sharpness first, most blurred copy at the top; numbers under each thumbnail
    names = _figure_names(dom, "gallery-sharpness")
    assert names.index("blur6.png") < names.index("blur3.png") < names.index("blur1.png") < names.index("blur0.png")
    assert "sharpness " in dom.split('id="gallery-sharpness"', 1)[1].split("</section>", 1)[0]
    assert _figure_names(dom, "gallery-dark")[0] == "dark.jpg"
    assert "<svg" in dom and "<rect" in dom
    # the page's sort (as the buttons do it): by sharpness, descending → the sharpest first
    r = _chromium("--dump-dom", gallery_page.as_uri() + "#sort=gallery-sharpness:sharpness:desc")
    dom2 = r.stdout.decode()
    names2 = _figure_names(dom2, "gallery-sharpness")
    assert names2.index("blur0.png") < names2.index("blur1.png") < names2.index("blur3.png") < names2.index("blur6.png")
    assert 'data-sorted="sharpness:desc"' in dom2
