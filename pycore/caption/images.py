"""Loading images for captioning: EXIF-transposed, RGB, short side capped, JPEG data URLs."""

from __future__ import annotations

import base64
import io
import os

from pycore.errors import HwError, first_line


class ImageLoadError(HwError):
    """An image that cannot be decoded for captioning (recorded as the row's caption_error)."""


def load_rgb(path: str | os.PathLike[str], max_side: int = 768):
    """Decode, apply EXIF orientation, flatten alpha on white, shrink so the short side ≤ max_side.

    ``max_side`` 0 keeps the full size. Raises :class:`ImageLoadError` with a one-line reason.
    """
    from PIL import Image, ImageOps

    from pycore.sources import open_image

    try:
        with open_image(os.fspath(path)) as im:  # a file, tar member or Parquet cell (pycore.sources)
            im.seek(0)  # first frame of animations
            if im.format == "JPEG" and max_side and min(im.size) > 2 * max_side:
                im.draft("RGB", (im.size[0] // 2, im.size[1] // 2))  # let libjpeg downscale by 2^k for free
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGB", im.size, (255, 255, 255))
                bg.paste(im, mask=im.getchannel("A"))
                im = bg
            elif im.mode != "RGB":
                im = im.convert("RGB")
            else:
                im.load()
    except Exception as e:  # Pillow plugins raise many types on bad files; a bad image is a row, not a crash
        raise ImageLoadError(f"cannot read image: {first_line(e)}") from None
    w, h = im.size
    if max_side and min(w, h) > max_side:
        s = max_side / min(w, h)
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)
    return im


def jpeg_data_url(im, quality: int = 90) -> str:
    """A ``data:image/jpeg;base64,…`` URL of an RGB Pillow image."""
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def data_url(path: str | os.PathLike[str], max_side: int = 768, quality: int = 90) -> str:
    return jpeg_data_url(load_rgb(path, max_side), quality)
