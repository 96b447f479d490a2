"""Generate a deterministic corpus of mixed-format images for the `hw bucket` benchmark.

    python bench/make_corpus.py DIR [--n 20000] [--seed 0] [--templates 400]

Layout written under DIR:

    DIR/images/NN/MM/*.{jpg,jpeg,JPG,png,webp,gif,bmp,tif,tiff}   100 files per leaf folder
    DIR/images/NN/MM/*.txt                                            captions for ~40% of images
    DIR/truth.csv     one row per image: path (relative to DIR), format, variant, stored size,
                      EXIF orientation, displayed size, bytes
    DIR/corpus.json   the parameters and stats; written last, so its presence means "complete"

Encoding 20,000 full images is slow, so a few hundred distinct *templates* are encoded (crops of
scikit-image's sample photos, resized to realistic sizes) and every file is a template's bytes
followed by 16 unique trailing bytes after the end-of-image marker / last chunk. Decoders and
header readers ignore them (checked here: every template, with a trailer, is fully decoded by
Pillow and its size compared), and they make every file's content hash unique.

Mix (by files, approximately): JPEG 50% (baseline, progressive, grayscale, CMYK, and phone photos
with an EXIF blob — both byte orders, a maker note, an embedded 160×120 JPEG thumbnail, an ICC
profile — most with orientation 6 or 8), PNG 20% (RGB, RGBA, palette, gray, 16-bit; some with
Stable-Diffusion "parameters" text chunks; a few with an eXIf orientation), WebP 14% (lossy,
lossy+alpha, lossless; a few with an EXIF orientation), GIF 5% (some animated), BMP 4%, TIFF 7%
(raw, LZW, deflate, JPEG; a few with an orientation tag). Short side 256–2048 (log-uniform),
aspect 0.4–2.5 (60% common ratios, 40% continuous). Re-running with the same parameters is a
no-op.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shutil
import struct
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

CORPUS_VERSION = 1
TRAILER_MAGIC = b"\x00HWBENCH"  # + 8-byte little-endian file index = 16 bytes
FILES_PER_FOLDER = 100
FOLDERS_PER_TOP = 10
CAPTION_SHARE = 0.4

# (variant, format, share of templates)
VARIANTS = [
    ("jpeg-baseline", "jpeg", 0.22),
    ("jpeg-progressive", "jpeg", 0.10),
    ("jpeg-gray", "jpeg", 0.03),
    ("jpeg-cmyk", "jpeg", 0.01),
    ("jpeg-phone", "jpeg", 0.14),
    ("png-rgb", "png", 0.09),
    ("png-rgba", "png", 0.04),
    ("png-palette", "png", 0.03),
    ("png-gray", "png", 0.02),
    ("png-16bit", "png", 0.01),
    ("png-exif", "png", 0.01),
    ("webp-lossy", "webp", 0.07),
    ("webp-lossy-alpha", "webp", 0.02),
    ("webp-lossless", "webp", 0.04),
    ("webp-exif", "webp", 0.01),
    ("gif", "gif", 0.04),
    ("gif-animated", "gif", 0.01),
    ("bmp", "bmp", 0.04),
    ("tiff-raw", "tiff", 0.02),
    ("tiff-lzw", "tiff", 0.02),
    ("tiff-deflate", "tiff", 0.015),
    ("tiff-jpeg", "tiff", 0.01),
    ("tiff-oriented", "tiff", 0.005),
]

COLOR_SOURCES = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                 "immunohistochemistry", "retina", "cat", "colorwheel"]  # fmt: skip
GRAY_SOURCES = ["camera", "moon", "coins", "brick", "grass", "gravel"]
COMMON_ASPECTS = [1.0, 4 / 3, 3 / 2, 16 / 9, 5 / 4, 2.0, 7 / 5]
CAPTION_WORDS = ("portrait photo woman man cat dog street city night day sunset forest beach "
                 "mountain river car bicycle coffee cup table window light shadow red blue green "
                 "smiling looking at viewer outdoors indoors close-up wide shot film grain bokeh "
                 "illustration painting sketch anime watercolor detailed sharp focus").split()  # fmt: skip


@dataclass
class Template:
    index: int
    variant: str
    format: str
    ext: str
    width: int  # displayed (after orientation)
    height: int
    stored_width: int
    stored_height: int
    orientation: int  # 0 = no orientation tag
    seed: int
    data: bytes = field(default=b"", repr=False)


# --------------------------------------------------------------------------------------------
# Sizes


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def pick_size(rng: np.random.Generator, short_max: int = 2048) -> tuple[int, int]:
    """A realistic (width, height): short side 256–short_max, aspect 0.4–2.5."""
    if rng.random() < 0.6:
        a = float(rng.choice(COMMON_ASPECTS))
        if a != 1.0 and rng.random() < 0.45:
            a = 1 / a
    else:
        a = _log_uniform(rng, 0.4, 2.5)
    short = int(round(_log_uniform(rng, 256, short_max)))
    if rng.random() < 0.5:
        short = max(256, short // 8 * 8)
    if a >= 1:
        w, h = int(round(short * a)), short
    else:
        w, h = short, int(round(short / a))
    return w, h


# --------------------------------------------------------------------------------------------
# A small TIFF/EXIF writer (so the phone photos carry a realistic blob: both byte orders,
# sub-IFDs, a maker note and an IFD1 thumbnail whose own SOF a naive parser could pick up).

ASCII, SHORT, LONG, RATIONAL, UNDEFINED = 2, 3, 4, 5, 7
_TYPE_SIZE = {ASCII: 1, SHORT: 2, LONG: 4, RATIONAL: 8, UNDEFINED: 1}


def _encode_value(bo: str, typ: int, value) -> tuple[int, bytes]:
    if typ == ASCII:
        raw = value.encode("ascii") + b"\0"
        return len(raw), raw
    if typ == UNDEFINED:
        return len(value), bytes(value)
    vals = value if isinstance(value, list) else [value]
    if typ == SHORT:
        return len(vals), b"".join(struct.pack(bo + "H", v) for v in vals)
    if typ == LONG:
        return len(vals), b"".join(struct.pack(bo + "I", v) for v in vals)
    if typ == RATIONAL:
        return len(vals), b"".join(struct.pack(bo + "II", n, d) for n, d in vals)
    raise ValueError(typ)


def _ifd_size(entries: list) -> int:
    size = 2 + 12 * len(entries) + 4
    for _tag, typ, value in entries:
        _n, raw = _encode_value("<", typ, value)
        if len(raw) > 4:
            size += len(raw) + (len(raw) & 1)
    return size


def _ifd_bytes(bo: str, entries: list, offset: int, next_ifd: int) -> bytes:
    entries = sorted(entries, key=lambda e: e[0])
    data_off = offset + 2 + 12 * len(entries) + 4
    head = [struct.pack(bo + "H", len(entries))]
    data = []
    for tag, typ, value in entries:
        count, raw = _encode_value(bo, typ, value)
        if len(raw) <= 4:
            head.append(struct.pack(bo + "HHI", tag, typ, count)[:8] + raw.ljust(4, b"\0"))
        else:
            head.append(struct.pack(bo + "HHII", tag, typ, count, data_off))
            pad = raw + (b"\0" if len(raw) & 1 else b"")
            data.append(pad)
            data_off += len(pad)
    head.append(struct.pack(bo + "I", next_ifd))
    return b"".join(head) + b"".join(data)


def exif_blob(rng: np.random.Generator, orientation: int, stored: tuple[int, int], thumb: bytes | None,
              phone: bool = True) -> bytes:
    """A TIFF-structured EXIF payload (without the "Exif\\0\\0" prefix)."""
    bo = "<" if rng.random() < 0.5 else ">"
    make, model = [("Apple", "iPhone 13"), ("samsung", "SM-G991B"), ("Google", "Pixel 7"),
                   ("Canon", "Canon EOS R6"), ("SONY", "ILCE-7M3")][int(rng.integers(5))]  # fmt: skip
    dt = f"2023:{1 + int(rng.integers(12)):02d}:{1 + int(rng.integers(28)):02d} 1{int(rng.integers(10))}:0{int(rng.integers(10))}:00"
    ifd0 = [
        (0x010F, ASCII, make),
        (0x0110, ASCII, model),
        (0x011A, RATIONAL, (72, 1)),
        (0x011B, RATIONAL, (72, 1)),
        (0x0128, SHORT, 2),
        (0x0131, ASCII, "17.1" if make == "Apple" else "G991BXXU5DWC1"),
        (0x0132, ASCII, dt),
        (0x8769, LONG, 0),  # ExifIFD offset, patched below
    ]
    if orientation:
        ifd0.append((0x0112, SHORT, orientation))
    exif_ifd = [
        (0x829A, RATIONAL, (1, int(rng.choice([30, 60, 120, 250, 1000])))),
        (0x829D, RATIONAL, (int(rng.choice([16, 18, 28, 40])), 10)),
        (0x8827, SHORT, int(rng.choice([50, 100, 400, 1600]))),
        (0x9000, UNDEFINED, b"0232"),
        (0x9003, ASCII, dt),
        (0x920A, RATIONAL, (int(rng.integers(20, 90)) * 10, 10)),
        (0xA002, LONG, stored[0]),
        (0xA003, LONG, stored[1]),
    ]
    if phone:
        exif_ifd.append((0x927C, UNDEFINED, rng.integers(0, 256, int(rng.integers(600, 2500)), dtype=np.uint8).tobytes()))
    ifd1 = [(0x0103, SHORT, 6), (0x0201, LONG, 0), (0x0202, LONG, len(thumb) if thumb else 0)] if thumb else None

    off0 = 8
    off_exif = off0 + _ifd_size(ifd0)
    off1 = off_exif + _ifd_size(exif_ifd)
    off_thumb = off1 + (_ifd_size(ifd1) if ifd1 else 0)
    ifd0 = [(t, ty, off_exif if t == 0x8769 else v) for t, ty, v in ifd0]
    out = [b"II*\0" if bo == "<" else b"MM\0*", struct.pack(bo + "I", off0)]
    out.append(_ifd_bytes(bo, ifd0, off0, off1 if ifd1 else 0))
    out.append(_ifd_bytes(bo, exif_ifd, off_exif, 0))
    if ifd1:
        ifd1 = [(t, ty, off_thumb if t == 0x0201 else v) for t, ty, v in ifd1]
        out.append(_ifd_bytes(bo, ifd1, off1, 0))
        out.append(thumb)
    blob = b"".join(out)
    assert len(blob) < 65000, "EXIF must fit one APP1 segment"
    return blob


# --------------------------------------------------------------------------------------------
# Content and encoding (runs in worker processes)

_SOURCES: dict[str, object] = {}


def _source(name: str):
    from PIL import Image

    if name not in _SOURCES:
        import skimage.data

        arr = getattr(skimage.data, name)()
        im = Image.fromarray(arr)
        _SOURCES[name] = im.convert("RGB")
    return _SOURCES[name]


def _content(rng: np.random.Generator, w: int, h: int):
    """A natural-looking RGB image of w×h: a random crop of a sample photo, resized."""
    from PIL import Image, ImageEnhance

    pool = COLOR_SOURCES if rng.random() < 0.8 else GRAY_SOURCES
    src = _source(pool[int(rng.integers(len(pool)))])
    sw, sh = src.size
    a = w / h
    cw, ch = (sw, int(sw / a)) if sw / sh < a else (int(sh * a), sh)
    f = rng.uniform(0.5, 1.0)
    cw, ch = max(8, int(cw * f)), max(8, int(ch * f))
    x, y = int(rng.integers(0, sw - cw + 1)), int(rng.integers(0, sh - ch + 1))
    im = src.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    im = ImageEnhance.Color(im).enhance(rng.uniform(0.6, 1.4))
    return im


def _icc() -> bytes:
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _sd_parameters(rng: np.random.Generator) -> str:
    words = " ".join(str(w) for w in rng.choice(CAPTION_WORDS, 12))
    return (f"masterpiece, best quality, {words}\nNegative prompt: lowres, blurry\n"
            f"Steps: {int(rng.integers(20, 50))}, Sampler: DPM++ 2M Karras, CFG scale: 7, "
            f"Seed: {int(rng.integers(2**31))}, Size: 1024x1024, Model: sd_xl_base_1.0")  # fmt: skip


_ROTATE_TO_STORED = {3: 180, 6: 90, 8: 270}  # PIL rotate() is counter-clockwise


def encode_template(t: Template) -> Template:
    """Encode one template (sets .data) and check it decodes, with a trailer, to its size."""
    from PIL import Image, PngImagePlugin

    rng = np.random.default_rng(t.seed)
    v = t.variant
    img = _content(rng, t.width, t.height)  # upright, displayed size
    if t.orientation in _ROTATE_TO_STORED:
        img = img.rotate(_ROTATE_TO_STORED[t.orientation], expand=True)
    assert img.size == (t.stored_width, t.stored_height), (img.size, t)
    buf = io.BytesIO()
    if t.format == "jpeg":
        kw: dict = {"quality": int(rng.integers(75, 96)), "subsampling": int(rng.choice([0, 1, 2, 2, 2]))}
        if v == "jpeg-progressive":
            kw["progressive"] = True
        if rng.random() < 0.3:
            kw["optimize"] = True
        if v == "jpeg-gray":
            img = img.convert("L")
        elif v == "jpeg-cmyk":
            img = img.convert("CMYK")
        if v == "jpeg-phone":
            thumb_im = img.copy()
            thumb_im.thumbnail((160, 160))
            tb = io.BytesIO()
            thumb_im.save(tb, "JPEG", quality=70)
            kw["exif"] = b"Exif\0\0" + exif_blob(rng, t.orientation, img.size, tb.getvalue())
            kw["icc_profile"] = _icc()
            kw["quality"] = int(rng.integers(88, 97))
        elif v in ("jpeg-baseline", "jpeg-progressive") and rng.random() < 0.25:
            kw["exif"] = b"Exif\0\0" + exif_blob(rng, t.orientation, img.size, None, phone=False)
            if rng.random() < 0.5:
                kw["icc_profile"] = _icc()
        img.save(buf, "JPEG", **kw)
    elif t.format == "png":
        kw = {"compress_level": int(rng.choice([1, 6, 6, 6, 9]))}
        if v == "png-rgba":
            img = img.convert("RGBA")
            alpha = Image.linear_gradient("L").resize(img.size)
            img.putalpha(alpha)
        elif v == "png-palette":
            img = img.quantize(colors=int(rng.choice([16, 64, 256])))
        elif v == "png-gray":
            img = img.convert("L")
        elif v == "png-16bit":
            img = Image.fromarray((np.asarray(img.convert("L"), dtype=np.uint16) * 257))
        if v == "png-exif":
            kw["exif"] = b"Exif\0\0" + exif_blob(rng, t.orientation, img.size, None, phone=False)
        if rng.random() < 0.3:
            info = PngImagePlugin.PngInfo()
            info.add_text("parameters", _sd_parameters(rng))
            kw["pnginfo"] = info
        if rng.random() < 0.1:
            kw["icc_profile"] = _icc()
        img.save(buf, "PNG", **kw)
    elif t.format == "webp":
        kw = {}
        if v == "webp-lossless":
            kw.update(lossless=True, quality=int(rng.integers(0, 30)), method=int(rng.integers(0, 2)))
        else:
            kw.update(quality=int(rng.integers(70, 92)), method=4)
        if v == "webp-lossy-alpha" or (v == "webp-lossless" and rng.random() < 0.3):
            img = img.convert("RGBA")
            img.putalpha(Image.linear_gradient("L").resize(img.size))
        if v == "webp-exif":
            kw["exif"] = b"Exif\0\0" + exif_blob(rng, t.orientation, img.size, None, phone=False)
        img.save(buf, "WEBP", **kw)
    elif t.format == "gif":
        frames = [img.convert("P", palette=Image.Palette.ADAPTIVE, colors=int(rng.choice([64, 128, 256])))]
        if v == "gif-animated":
            for k in (1, 2):
                frames.append(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT if k == 1 else Image.Transpose.FLIP_TOP_BOTTOM)
                              .convert("P", palette=Image.Palette.ADAPTIVE))  # fmt: skip
            frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=200, loop=0)
        else:
            frames[0].save(buf, "GIF")
    elif t.format == "bmp":
        r = rng.random()
        if r < 0.15:
            img = img.convert("P", palette=Image.Palette.ADAPTIVE)
        elif r < 0.25:
            img = img.convert("RGBA")
        img.save(buf, "BMP")
    elif t.format == "tiff":
        comp = {"tiff-raw": None, "tiff-lzw": "tiff_lzw", "tiff-deflate": "tiff_adobe_deflate",
                "tiff-jpeg": "jpeg", "tiff-oriented": "tiff_lzw"}[v]  # fmt: skip
        kw = {}
        if comp:
            kw["compression"] = comp
        if v == "tiff-oriented":
            from PIL import TiffImagePlugin

            ifd = TiffImagePlugin.ImageFileDirectory_v2()
            ifd[274] = t.orientation
            kw["tiffinfo"] = ifd
        if comp != "jpeg" and rng.random() < 0.2:
            img = img.convert("RGBA" if rng.random() < 0.5 else "L")
        img.save(buf, "TIFF", **kw)
    else:
        raise ValueError(t.format)
    t.data = buf.getvalue()
    _check(t)
    return t


_TIFF_ORIENTED: list[bool] = []


def pil_tiff_size_is_oriented() -> bool:
    """Whether this Pillow reports a TIFF's size after its Orientation tag at open (Pillow ≥ 12
    applies TIFF orientation itself, unlike JPEG/PNG/WebP EXIF orientation)."""
    if not _TIFF_ORIENTED:
        from PIL import Image, TiffImagePlugin

        ifd = TiffImagePlugin.ImageFileDirectory_v2()
        ifd[274] = 6
        buf = io.BytesIO()
        Image.new("L", (2, 1)).save(buf, "TIFF", tiffinfo=ifd)
        with Image.open(io.BytesIO(buf.getvalue())) as im:
            _TIFF_ORIENTED.append(im.size == (1, 2))
    return _TIFF_ORIENTED[0]


def _check(t: Template) -> None:
    """The template, with a trailer, decodes fully in Pillow to the intended sizes."""
    from PIL import Image, ImageOps

    data = t.data + TRAILER_MAGIC + struct.pack("<Q", 0)
    with Image.open(io.BytesIO(data)) as im:
        assert im.format.lower() == t.format, (im.format, t)
        if t.format == "tiff" and pil_tiff_size_is_oriented():
            assert im.size == (t.width, t.height), (im.size, t)
        else:
            assert im.size == (t.stored_width, t.stored_height), (im.size, t)
        im.load()
        shown = ImageOps.exif_transpose(im)
        assert shown.size == (t.width, t.height), (shown.size, t)


# --------------------------------------------------------------------------------------------
# Planning and writing


EXTS = {
    "jpeg": [(".jpg", 0.8), (".jpeg", 0.15), (".JPG", 0.05)],
    "png": [(".png", 1.0)],
    "webp": [(".webp", 1.0)],
    "gif": [(".gif", 1.0)],
    "bmp": [(".bmp", 1.0)],
    "tiff": [(".tif", 0.6), (".tiff", 0.4)],
}


def plan_templates(n_templates: int, seed: int) -> list[Template]:
    rng = np.random.default_rng([seed, 1])
    shares = np.array([s for _, _, s in VARIANTS])
    counts = np.maximum(1, np.round(shares / shares.sum() * n_templates)).astype(int)
    out: list[Template] = []
    for (variant, fmt, _), c in zip(VARIANTS, counts, strict=True):
        for _ in range(c):
            orientation = 0
            if variant == "jpeg-phone":
                ratio = 4 / 3 if rng.random() < 0.7 else 16 / 9
                short = int(rng.choice([1080, 1152, 1200, 1440, 1512, 1536, 1836, 2048]))
                sw, sh = int(round(short * ratio)), short
                orientation = int(rng.choice([6, 6, 6, 8, 8, 1, 1, 3]))
                if orientation == 1 and rng.random() < 0.5:
                    sw, sh = sh, sw  # shot in portrait by a phone that rotates pixels itself
            else:
                # Uncompressed formats stay smaller, as they are in practice (and to keep the corpus
                # a few GB).
                short_max = 1024 if variant in ("bmp", "tiff-raw", "gif", "gif-animated") else 2048
                sw, sh = pick_size(rng, short_max)
                if variant in ("png-exif", "webp-exif", "tiff-oriented"):
                    orientation = int(rng.choice([6, 8, 3]))
                elif fmt == "jpeg" and rng.random() < 0.25:
                    orientation = 1  # an EXIF blob saying "upright" (editors, cameras)
            w, h = (sh, sw) if orientation in (5, 6, 7, 8) else (sw, sh)
            exts, probs = zip(*EXTS[fmt], strict=True)
            ext = ".JPG" if variant == "jpeg-phone" else str(rng.choice(exts, p=probs))
            out.append(Template(len(out), variant, fmt, ext, w, h, sw, sh, orientation,
                                int(rng.integers(2**63))))  # fmt: skip
    return out


def rel_path(i: int, t: Template) -> str:
    top, sub = i // (FILES_PER_FOLDER * FOLDERS_PER_TOP), (i // FILES_PER_FOLDER) % FOLDERS_PER_TOP
    stem = f"IMG_{i:06d}" if t.variant == "jpeg-phone" else f"img_{i:06d}"
    return f"images/{top:02d}/{sub:02d}/{stem}{t.ext}"


def params_of(args: argparse.Namespace) -> dict:
    return {"version": CORPUS_VERSION, "n": args.n, "seed": args.seed, "templates": args.templates}


def is_complete(root: str, params: dict) -> bool:
    try:
        with open(os.path.join(root, "corpus.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return meta.get("params") == params and os.path.isfile(os.path.join(root, "truth.csv"))


def make_corpus(root: str, n: int = 20000, seed: int = 0, templates: int = 400, workers: int | None = None,
                force: bool = False, log=print) -> dict:
    """Create (or reuse) the corpus in ``root``; return its corpus.json contents."""
    params = {"version": CORPUS_VERSION, "n": n, "seed": seed, "templates": templates}
    if not force and is_complete(root, params):
        with open(os.path.join(root, "corpus.json")) as f:
            meta = json.load(f)
        log(f"corpus: {root} already has {meta['stats']['files']:,} images for these parameters; reusing it")
        print_stats(meta, log)
        return meta
    t0 = time.perf_counter()
    for sub in ("images", "corpus.json", "truth.csv"):
        p = os.path.join(root, sub)
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)
    os.makedirs(root, exist_ok=True)

    plan = plan_templates(templates, seed)
    log(f"corpus: encoding {len(plan)} templates with {workers or os.cpu_count()} worker(s) ...")
    with ProcessPoolExecutor(max_workers=workers) as ex:
        # Largest first, for load balance.
        order = sorted(plan, key=lambda t: -t.width * t.height)
        done = {t.index: t for t in ex.map(encode_template, order, chunksize=1)}
    plan = [done[t.index] for t in plan]
    t_enc = time.perf_counter() - t0

    rng = np.random.default_rng([seed, 2])
    assign = np.concatenate([rng.permutation(len(plan)), rng.integers(0, len(plan), max(0, n - len(plan)))])[:n]
    rng.shuffle(assign)
    by_format: Counter = Counter()
    by_variant: Counter = Counter()
    bytes_by_format: Counter = Counter()
    rotated = captions = 0
    made_dirs: set[str] = set()
    with open(os.path.join(root, "truth.csv.tmp"), "w", newline="") as tf:
        w = csv.writer(tf)
        w.writerow(["path", "format", "variant", "stored_width", "stored_height", "orientation",
                    "width", "height", "bytes"])  # fmt: skip
        for i, ti in enumerate(assign):
            t = plan[int(ti)]
            rp = rel_path(i, t)
            full = os.path.join(root, rp)
            d = os.path.dirname(full)
            if d not in made_dirs:
                os.makedirs(d, exist_ok=True)
                made_dirs.add(d)
            data = t.data + TRAILER_MAGIC + struct.pack("<Q", i)
            with open(full, "wb") as f:
                f.write(data)
            if rng.random() < CAPTION_SHARE:
                words = " ".join(str(x) for x in rng.choice(CAPTION_WORDS, int(rng.integers(5, 20))))
                with open(os.path.splitext(full)[0] + ".txt", "w") as f:
                    f.write(words + "\n")
                captions += 1
            w.writerow([rp, t.format, t.variant, t.stored_width, t.stored_height, t.orientation,
                        t.width, t.height, len(data)])  # fmt: skip
            by_format[t.format] += 1
            by_variant[t.variant] += 1
            bytes_by_format[t.format] += len(data)
            rotated += t.orientation in (5, 6, 7, 8)
    os.replace(os.path.join(root, "truth.csv.tmp"), os.path.join(root, "truth.csv"))
    total = sum(bytes_by_format.values())
    stats = {
        "files": n,
        "templates": len(plan),
        "by_format": dict(by_format.most_common()),
        "by_variant": dict(sorted(by_variant.items())),
        "bytes_by_format": dict(bytes_by_format.most_common()),
        "total_bytes": total,
        "rotated_5_to_8": rotated,
        "captions": captions,
        "folders": len(made_dirs),
        "seconds_encode": round(t_enc, 1),
        "seconds_total": round(time.perf_counter() - t0, 1),
    }
    meta = {"params": params, "stats": stats}
    with open(os.path.join(root, "corpus.json.tmp"), "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(os.path.join(root, "corpus.json.tmp"), os.path.join(root, "corpus.json"))
    print_stats(meta, log)
    return meta


def print_stats(meta: dict, log=print) -> None:
    s = meta["stats"]
    log(f"corpus: {s['files']:,} images from {s['templates']} templates in {s['folders']} folders, "
        f"{s['total_bytes'] / 1e9:.2f} GB, {s['captions']:,} caption .txt files, "
        f"{s['rotated_5_to_8']:,} with EXIF orientation 5–8; made in {s['seconds_total']} s")  # fmt: skip
    log(f"{'format':<8}{'files':>8}{'share':>8}{'GB':>8}{'mean KB':>10}")
    for fmt, c in s["by_format"].items():
        b = s["bytes_by_format"][fmt]
        log(f"{fmt:<8}{c:>8,}{c / s['files']:>8.1%}{b / 1e9:>8.2f}{b / c / 1e3:>10.0f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="output folder (created; images go to DIR/images)")
    ap.add_argument("--n", type=int, default=20000, help="number of image files (default 20000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--templates", type=int, default=400, help="distinct encoded images (default 400)")
    ap.add_argument("--workers", type=int, default=None, help="encoder processes (default: one per core)")
    ap.add_argument("--force", action="store_true", help="regenerate even if DIR matches")
    args = ap.parse_args(argv)
    if args.n < 1 or args.templates < len(VARIANTS):
        ap.error(f"--n must be ≥ 1 and --templates ≥ {len(VARIANTS)}")
    make_corpus(args.dir, args.n, args.seed, args.templates, args.workers, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
