"""Regenerate the bundled sample in data_manifests/sample/ (small photos from scikit-image in
several formats, aspect ratios and EXIF orientations, plus the kinds of bad files real folders
contain). The committed files are the output; run this only to change them."""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

OUT = Path(__file__).resolve().parent.parent / "data_manifests" / "sample"


def exif_with_orientation(o: int) -> bytes:
    ex = Image.Exif()
    ex[0x0112] = o
    return ex.tobytes()


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    (OUT / "photos" / "phone").mkdir(parents=True)
    (OUT / "misc").mkdir()
    photos = {
        "astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea(),
        "rocket": data.rocket(), "hubble": data.hubble_deep_field(), "retina": data.retina(),
        "immunohistochemistry": data.immunohistochemistry(), "motorcycle": data.stereo_motorcycle()[0],
    }  # fmt: skip
    crops = [(1.0, 1.0), (0.66, 1.0), (1.0, 0.56), (1.0, 0.75), (0.5, 1.0), (1.0, 0.4)]
    fmts = ["JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF"]
    ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "TIFF": "tif", "BMP": "bmp", "GIF": "gif"}
    n = 0
    for i, (name, arr) in enumerate(photos.items()):
        img = Image.fromarray(np.asarray(arr)).convert("RGB")
        for j, (fx, fy) in enumerate(crops[: 3 + i % 3]):
            w, h = img.size
            c = img.crop((0, 0, int(w * fx), int(h * fy)))
            c.thumbnail((128, 128))
            fmt = fmts[(i + j) % len(fmts)]
            kw = {"quality": 80} if fmt in ("JPEG", "WEBP") else {}
            c.save(OUT / "photos" / f"{name}_{j}.{ext[fmt]}", fmt, **kw)
            n += 1
    # Phone photos: stored landscape, displayed per EXIF orientation 1-8.
    base = Image.fromarray(data.astronaut()).resize((160, 120))
    for o in range(1, 9):
        base.save(OUT / "photos" / "phone" / f"IMG_{o:04d}.jpg", "JPEG", quality=75, exif=exif_with_orientation(o))
        n += 1
    # Bad and other files a real folder has.
    (OUT / "misc" / "empty.jpg").write_bytes(b"")
    good = io.BytesIO()
    base.save(good, "PNG")
    (OUT / "misc" / "truncated.png").write_bytes(good.getvalue()[:20])
    (OUT / "misc" / "notes.jpg").write_text("this is a text file with an image extension\n")
    (OUT / "misc" / "garbage_orientation.jpg").write_bytes(_jpeg_with_orientation(base, 57))
    (OUT / "photos" / "astronaut_0.txt").write_text("an astronaut in a white spacesuit, best quality\n")
    (OUT / "photos" / "coffee_0.txt").write_text("a cup of coffee on a saucer\n")
    print(f"{n} images and 4 bad files written to {OUT}", file=sys.stderr)


def _jpeg_with_orientation(img: Image.Image, o: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=70, exif=exif_with_orientation(o))
    return buf.getvalue()


if __name__ == "__main__":
    main()
