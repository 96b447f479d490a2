"""The HTML review page: duplicate groups and quality galleries, one self-contained file."""

from __future__ import annotations

import base64
import html
import io
import os

import numpy as np
import polars as pl

def _thumb(path: str, size: int) -> str | None:
    from pycore.sources import open_image

    try:
        with open_image(path) as src:
            src.draft("RGB", (size, size))
            im = src.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=80)
        return base64.b64encode(buf.getvalue()).decode("ascii")
    except Exception:  # noqa: BLE001 - a missing thumbnail is shown as such
        return None


_CSS = """body{font-family:system-ui,sans-serif;margin:1em;background:#fafafa}
.group,.gallery,.stats{background:#fff;border:1px solid #ccc;border-radius:6px;margin:0 0 1em;padding:.5em}
.group h2,.gallery h2,.stats h2{font-size:1em;margin:.2em 0 .5em}.items{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0;width:180px;border:3px solid #d33;border-radius:4px;padding:4px;background:#fff}
figure.keep{border-color:#2a2}figure.item{border-color:#ccc}figcaption{font-size:12px;word-break:break-all}
.badge{font-weight:bold}.keep .badge{color:#2a2}.remove .badge{color:#d33}.flags{color:#b50}
.num{font-variant-numeric:tabular-nums}nav a{margin-right:1em}button{margin:0 .3em .4em 0}
img{max-width:170px;max-height:170px;display:block;margin:auto}.missing{height:60px;color:#888}"""

#: Sort keys of the gallery figures: data attribute → (button label, statistic column).
_KEYS = {"sharpness": ("sharpness", "q_sharpness"), "luma": ("brightness", "q_luma_mean"),
         "contrast": ("contrast", "q_luma_std"), "color": ("colourfulness", "q_colorfulness"),
         "jpeg": ("JPEG quality", "q_jpeg_quality"), "outlier": ("outlier score", "q_outlier_score")}  # fmt: skip

# Sorting: each gallery's buttons reorder its figures by a data attribute; the page's address may
# name an initial order as #sort=GALLERY_ID:KEY:asc|desc (used by the browser test).
_JS = r"""function hwSort(id,key,dir){const box=document.querySelector('#'+id+' .items');if(!box)return;
const f=[...box.children];f.sort((a,b)=>{const x=parseFloat(a.dataset[key]),y=parseFloat(b.dataset[key]);
const u=isNaN(x)?Infinity:x,v=isNaN(y)?Infinity:y;return dir==='asc'?u-v:v-u});f.forEach(e=>box.appendChild(e));
box.dataset.sorted=key+':'+dir}
document.addEventListener('click',e=>{const b=e.target.closest('button[data-key]');if(!b)return;
const g=b.closest('section');hwSort(g.id,b.dataset.key,b.dataset.dir);b.dataset.dir=b.dataset.dir==='asc'?'desc':'asc'});
const m=location.hash.match(/^#sort=([\w-]+):(\w+):(asc|desc)$/);if(m)hwSort(m[1],m[2],m[3]);"""


class _Thumbs:
    """Thumbnails made once per row (an image in several galleries is encoded once)."""

    def __init__(self, paths: list[str], size: int) -> None:
        self.paths, self.size = paths, size
        self.cache: dict[int, str | None] = {}

    def img(self, row: int) -> str:
        if row not in self.cache:
            self.cache[row] = _thumb(self.paths[row], self.size)
        b64 = self.cache[row]
        name = html.escape(os.path.basename(self.paths[row]), quote=True)
        return f"<img src='data:image/jpeg;base64,{b64}' alt='{name}'>" if b64 else "<div class='missing'>no preview</div>"


def _fmt(v: object, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    return f"{v:,.{digits}f}" if isinstance(v, float) else str(v)


def _numbers(r: dict) -> str:
    """The statistics under a thumbnail."""
    parts = []
    if r.get("q_sharpness") is not None:
        parts.append(f"sharpness {_fmt(r['q_sharpness'])}, brightness {_fmt(r['q_luma_mean'])}, "
                     f"contrast {_fmt(r['q_luma_std'])}, colour {_fmt(r['q_colorfulness'])}, "
                     f"clipped {_fmt(100 * r['q_clip_low'])}%/{_fmt(100 * r['q_clip_high'])}%")  # fmt: skip
        if r.get("q_jpeg_quality") is not None:
            parts.append(f"JPEG q≈{r['q_jpeg_quality']}")
    if r.get("q_outlier_rank") is not None:
        parts.append(f"outlier #{r['q_outlier_rank']} ({_fmt(r['q_outlier_score'], 2)})")
    if r.get("width") is not None:
        parts.append(f"{r['width']}×{r['height']}")
    text = "<span class='num'>" + html.escape(", ".join(parts)) + "</span>"
    if r.get("q_flags"):
        text += "<br><span class='flags'>" + html.escape(", ".join(r["q_flags"])) + "</span>"
    return text


def _data_attrs(r: dict) -> str:
    out = []
    for key, (_, col) in _KEYS.items():
        v = r.get(col)
        out.append(f"data-{key}='{'' if v is None else v}'")
    return " ".join(out)


def _name(r: dict) -> str:
    return f"<span class='name' title='{html.escape(r['path'], quote=True)}'>{html.escape(r['path'])}</span>"


def _gallery(gid: str, title: str, rows: pl.DataFrame, thumbs: _Thumbs) -> str:
    buttons = "".join(f"<button data-key='{k}' data-dir='asc'>{label}</button>" for k, (label, col) in _KEYS.items()
                      if col in rows.columns)  # fmt: skip
    items = "".join(f"<figure class='item' {_data_attrs(r)}>{thumbs.img(r['_row'])}<figcaption>{_numbers(r)}<br>"
                    f"{_name(r)}</figcaption></figure>" for r in rows.iter_rows(named=True))  # fmt: skip
    return (f"<section class='gallery' id='{gid}'><h2>{html.escape(title)} ({rows.height})</h2>"
            f"<div class='sort'>sort by: {buttons}</div><div class='items'>{items}</div></section>")  # fmt: skip


def _galleries(frame: pl.DataFrame, n: int, thumbs: _Thumbs) -> list[tuple[str, str, str]]:
    """(id, title, html) of each quality gallery that applies."""
    ok = frame.with_row_index("_row").filter(pl.col("status") == "ok")
    specs = [("gallery-sharpness", "Lowest sharpness", "q_sharpness", False),
             ("gallery-dark", "Darkest (exposure)", "q_luma_mean", False),
             ("gallery-bright", "Brightest (exposure)", "q_luma_mean", True),
             ("gallery-outliers", "Outliers (least like the rest)", "q_outlier_score", True)]  # fmt: skip
    out = []
    for gid, title, col, desc in specs:
        if col in ok.columns and n > 0:
            rows = ok.filter(pl.col(col).is_not_null()).sort(col, descending=desc).head(n)
            out.append((gid, title, _gallery(gid, title, rows, thumbs)))
    if "q_flags" in ok.columns and n > 0:
        rows = ok.filter(pl.col("q_flags").list.len() > 0).head(n)
        out.append(("gallery-flagged", "Flagged by --quality", _gallery("gallery-flagged", "Flagged by --quality", rows, thumbs)))
    return out


def _groups_html(frame: pl.DataFrame, max_groups: int, thumbs: _Thumbs) -> tuple[list[str], str]:
    g = frame.with_row_index("_row").filter(pl.col("dup_group").is_not_null())
    sizes = g.group_by("dup_group").len().sort(["len", "dup_group"], descending=[True, False])
    summary = (f"{sizes.height} group(s), {g.height} image(s), {int((g['keep'] == False).sum())} marked for removal. "  # noqa: E712
               "Green = kept.")  # fmt: skip
    out = [f"<h2 id='duplicates'>Duplicates</h2><p id='summary'>{summary}</p>"]
    has_sim = "dup_similarity" in frame.columns
    for gid, size in sizes.head(max_groups).iter_rows():
        rows = g.filter(pl.col("dup_group") == gid).sort(["keep", "dup_distance"], descending=[True, False])
        first = rows.row(0, named=True)
        out.append(f"<section class='group' id='group-{gid}'><h2>group {gid}: {size} images, "
                   f"max internal distance {first['dup_max_distance']}"
                   f"{' (identical files)' if first['dup_exact'] else ''}</h2><div class='items'>")  # fmt: skip
        for r in rows.iter_rows(named=True):
            cls = "keep" if r["keep"] else "remove"
            extra = f", similarity {r['dup_similarity']:.3f}" if has_sim and r.get("dup_similarity") is not None else ""
            out.append(f"<figure class='{cls}' {_data_attrs(r)}>{thumbs.img(r['_row'])}<figcaption><span class='badge'>"
                       f"{'KEEP' if r['keep'] else 'remove'}</span> distance {r['dup_distance']}{extra}<br>"
                       f"{_numbers(r)}<br>{_name(r)}</figcaption></figure>")  # fmt: skip
        out.append("</div></section>")
    if sizes.height > max_groups:
        out.append(f"<p>… {sizes.height - max_groups} more group(s) not shown.</p>")
    return out, summary


def render_review(frame: pl.DataFrame, thumb_size: int = 170, max_groups: int = 500, title: str = "hw dedup review",
                  gallery: int = 48, quality: dict | None = None) -> str:  # fmt: skip
    """A self-contained HTML page: every duplicate group's thumbnails side by side (largest groups
    first), then galleries of the lowest sharpness, exposure extremes, outliers and flagged images
    (``gallery`` thumbnails each, sortable, the statistics under every thumbnail) and histograms."""
    from pycore.manifest import fs_paths

    thumbs = _Thumbs(fs_paths(frame), thumb_size)
    groups_html, _ = _groups_html(frame, max_groups, thumbs)
    galleries = _galleries(frame, gallery, thumbs)
    nav = "<nav><a href='#duplicates'>duplicates</a>" + "".join(f"<a href='#{gid}'>{html.escape(t.lower())}</a>"
                                                                 for gid, t, _ in galleries)  # fmt: skip
    stats = ""
    if "q_sharpness" in frame.columns:
        nav += "<a href='#statistics'>statistics</a>"
        svg = histograms_svg(frame, quality).replace(" xmlns='http://www.w3.org/2000/svg'", "", 1)  # inline SVG needs none
        stats = f"<section class='stats' id='statistics'><h2>Statistics</h2>{svg}</section>"
    nav += "</nav>"
    head = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{nav}")  # fmt: skip
    return "\n".join([head, *groups_html, *(h for _, _, h in galleries), stats, f"<script>{_JS}</script></body></html>"])


#: (column, label) of each histogram.
_HIST = (("q_sharpness", "sharpness (log scale)"), ("q_luma_mean", "brightness (mean luma)"),
         ("q_luma_std", "contrast (luma std)"), ("q_colorfulness", "colourfulness"),
         ("q_clip_low", "share crushed (luma ≤ 5)"), ("q_clip_high", "share blown (luma ≥ 250)"),
         ("q_jpeg_quality", "JPEG quality (estimate)"), ("q_outlier_score", "outlier score"))  # fmt: skip


def _hist_panel(values: np.ndarray, label: str, log: bool, threshold: float | None, x0: int, y0: int) -> str:
    w, h, bins = 300, 120, 30
    v = np.log10(np.maximum(values, 1e-3)) if log else values
    t = (np.log10(max(threshold, 1e-3)) if log else threshold) if threshold is not None else None
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        hi = lo + 1.0
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    top = max(int(counts.max()), 1)
    bw = w / bins
    bars = "".join(f"<rect x='{x0 + k * bw:.1f}' y='{y0 + 20 + h - c / top * h:.1f}' width='{bw - 1:.1f}' "
                   f"height='{c / top * h:.1f}' fill='#4a7'><title>{c} image(s)</title></rect>"
                   for k, c in enumerate(counts.tolist()) if c)  # fmt: skip
    fmt = (lambda x: f"{10 ** x:,.3g}") if log else (lambda x: f"{x:,.3g}")
    line = ""
    if t is not None and lo <= t <= hi:
        tx = x0 + (t - lo) / (hi - lo) * w
        line = f"<line x1='{tx:.1f}' x2='{tx:.1f}' y1='{y0 + 20}' y2='{y0 + 20 + h}' stroke='#d33' stroke-dasharray='4 2'/>"
    return (f"<text x='{x0}' y='{y0 + 12}' font-size='12'>{html.escape(label)} (n={len(values)})</text>{bars}{line}"
            f"<text x='{x0}' y='{y0 + h + 34}' font-size='10'>{fmt(lo)}</text>"
            f"<text x='{x0 + w}' y='{y0 + h + 34}' font-size='10' text-anchor='end'>{fmt(hi)}</text>")  # fmt: skip


def histograms_svg(frame: pl.DataFrame, quality: dict | None = None) -> str:
    """One SVG of small histograms, one per statistic of the ok rows; a dashed red line marks the
    --quality threshold where there is one."""
    thresholds = {v["column"]: v["threshold"] for v in ((quality or {}).get("thresholds") or {}).values()}
    ok = frame.filter(pl.col("status") == "ok")
    panels: list[str] = []
    for col, label in _HIST:
        if col not in ok.columns:
            continue
        vals = ok[col].cast(pl.Float64).drop_nulls().drop_nans().to_numpy()
        if len(vals):
            k = len(panels)
            panels.append(_hist_panel(vals, label, col == "q_sharpness", thresholds.get(col), 10 + (k % 2) * 340,
                                      10 + (k // 2) * 170))  # fmt: skip
    rows = (len(panels) + 1) // 2
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='690' height='{max(rows, 1) * 170 + 10}' "
            f"font-family='sans-serif'>{''.join(panels)}</svg>")
