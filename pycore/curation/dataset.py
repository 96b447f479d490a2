"""A training dataset over a manifest: images from files, tar members or Parquet cells (by the
manifest's reference, :mod:`pycore.sources`), resized and cropped exactly as the manifest's
bucket columns say, for use with the bucket batch sampler.

    ds = ManifestDataset("manifest/")                # a file or a folder of parts
    loader = torch.utils.data.DataLoader(ds, batch_sampler=ds.sampler(batch_size=4, seed=0),
                                         collate_fn=collate, num_workers=2)
    for batch in loader:  # pixel_values [B, 3, H, W] in [-1, 1], one bucket per batch
        ...

Each item also carries SDXL's micro-conditioning from the manifest: ``original_size`` (the image
as displayed, after EXIF orientation), ``crop_top_left`` and ``target_size`` (the bucket), as
(height, width)/(top, left) pairs. Rows without a bucket (rejected by ``hw bucket``) are never
sampled; asking for one is an error.
"""

from __future__ import annotations

import os
from typing import Any

import polars as pl

from pycore.errors import HwError, first_line

NEEDED = ("path", "status", "bucket_width", "bucket_height", "scaled_width", "scaled_height", "crop_left", "crop_top")


class ManifestDataset:
    """Map-style dataset (``len``, ``[i]``) over every row of a bucketed manifest."""

    def __init__(self, manifest: str | os.PathLike[str] | pl.DataFrame, *, caption_column: str | None = "caption") -> None:
        from pycore.manifest import fs_paths, read_manifest

        frame = manifest if isinstance(manifest, pl.DataFrame) else read_manifest(manifest, required=NEEDED)
        missing = [c for c in NEEDED if c not in frame.columns]
        if missing:
            raise HwError(f"manifest lacks {', '.join(missing)}: run hw bucket on it first")
        if caption_column is not None and caption_column not in frame.columns:
            caption_column = None
        self.frame = frame
        self.paths = fs_paths(frame)
        self.caption_column = caption_column
        self._cols = {c: frame[c].to_list() for c in NEEDED[1:] + ("width", "height")}
        self._offsets = frame["member_offset"].to_list() if "member_offset" in frame.columns else None
        self._sizes = frame["file_size"].to_list() if "file_size" in frame.columns else None
        self._captions = frame[caption_column].to_list() if caption_column else None

    def __len__(self) -> int:
        return self.frame.height

    def sampler(self, batch_size: int, **kwargs: Any):
        """A :class:`BucketBatchSampler` keyed by this manifest's buckets (kwargs: seed,
        world_size, rank, leftover, shuffle)."""
        from pycore.curation.sampler import BucketBatchSampler
        ok = self.frame["status"] == "ok"
        w = self.frame.select(pl.when(ok).then(pl.col("bucket_width"))).to_series().to_numpy()
        h = self.frame.select(pl.when(ok).then(pl.col("bucket_height"))).to_series().to_numpy()
        return BucketBatchSampler.from_sizes(w, h, batch_size, **kwargs)

    def load(self, i: int):
        """Row ``i``'s pixels as an RGB Pillow image, resized and cropped to its bucket."""
        from PIL import Image, ImageOps

        from pycore.sources import SourceError, open_image

        c = self._cols
        if c["status"][i] != "ok" or c["bucket_width"][i] is None:
            raise HwError(f"row {i} ({self.paths[i]}) has no bucket (status {c['status'][i]})")
        off = self._offsets[i] if self._offsets else None
        size = self._sizes[i] if (self._sizes and off is not None) else None
        try:
            with open_image(self.paths[i], off, size) as im:
                im = ImageOps.exif_transpose(im).convert("RGB")
        except SourceError:
            raise
        except Exception as e:  # noqa: BLE001 - decoders raise many types; one line with the path
            raise HwError(f"cannot decode {self.paths[i]}: {type(e).__name__}: {first_line(e)}") from None
        sw, sh = c["scaled_width"][i], c["scaled_height"][i]
        if im.size != (sw, sh):
            im = im.resize((sw, sh), Image.Resampling.LANCZOS)
        left, top = c["crop_left"][i], c["crop_top"][i]
        return im.crop((left, top, left + c["bucket_width"][i], top + c["bucket_height"][i]))

    def __getitem__(self, i: int) -> dict[str, Any]:
        import numpy as np
        import torch

        im = self.load(i)
        x = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
        c = self._cols
        return {
            "pixel_values": x,
            "original_size": (c["height"][i], c["width"][i]),
            "crop_top_left": (c["crop_top"][i], c["crop_left"][i]),
            "target_size": (c["bucket_height"][i], c["bucket_width"][i]),
            "caption": self._captions[i] if self._captions else None,
            "path": self.paths[i],
            "index": i,
        }


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack one bucket's items: ``pixel_values`` [B, 3, H, W]; the rest as lists."""
    import torch

    shapes = {tuple(it["pixel_values"].shape) for it in items}
    if len(shapes) != 1:
        raise HwError(f"a batch mixes image shapes {sorted(shapes)}; use the dataset's bucket sampler")
    out: dict[str, Any] = {"pixel_values": torch.stack([it["pixel_values"] for it in items])}
    for k in ("original_size", "crop_top_left", "target_size", "caption", "path", "index"):
        out[k] = [it[k] for it in items]
    return out
