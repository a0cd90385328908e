"""From a decoded image to a training crop, deterministically.

Every random choice of a sample (crop scale, position, flip) is drawn from
:func:`sample_rng`, a stream seeded by (seed, epoch, sample id) only: never by worker
scheduling, so a resumed run produces the very crops an uninterrupted run would.

Three crop modes (``DataConfig.crop``), all ending in a ``resolution`` square:

* ``resize``: resize the whole image so its shorter side is ``resolution`` (or keep
  native pixels with ``resize_shorter=false``), then cut a square. Three draws: x, y,
  flip (the flip never depends on whether the crop had any freedom).
* ``scale``: cut a square of ``resolution / s`` source pixels and resize it to
  ``resolution``; ``s`` (output pixels per source pixel) is uniform in ``crop_range``.
  ``s = 1`` is a plain copy of native pixels. Four draws: s, x, y, flip.
* ``fraction``: LDM's ImageNetSR crop: a square of side ``f x shorter side``, ``f``
  uniform in ``crop_range``, resized. Four draws as for ``scale``.

Images too small for the crop without upsampling follow ``small_images``: ``upscale``
(resize up), ``skip`` (:class:`BadImage`, so the sample is dropped, counted and named
like any bad one) or ``pad`` (native pixels placed on a mid-grey canvas).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from latentae.data.config import DataConfig
from latentae.imageio import BadImage, decode_image, resize_uint8, shorter_side_to, to_uint8_chw

PAD_VALUE = 127  # mid-grey: padding adds no edge of extreme colour to learn


def sample_rng(seed: int, epoch: int, sample_id: int | str) -> random.Random:
    """The private random stream of one sample in one epoch. String seeding hashes
    with SHA-512, so it is the same in every process (unlike ``hash()``)."""
    return random.Random(f"{seed}/{epoch}/{sample_id}")


def hash_seed(*parts: int | str) -> int:
    """A 63-bit seed from several values, stable across processes and runs."""
    return random.Random("/".join(map(str, parts))).getrandbits(63)


def to_tensor(img: Image.Image | torch.Tensor) -> torch.Tensor:
    """8-bit RGB (PIL image or uint8 [3, H, W]) -> float tensor [3, H, W] in [-1, 1]."""
    chw = img if isinstance(img, torch.Tensor) else to_uint8_chw(img)
    return chw.to(torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1.0)


def min_shorter_side(cfg: DataConfig) -> int:
    """The smallest shorter side an image needs for a crop without upsampling."""
    r = cfg.resolution
    if cfg.crop == "resize":
        return r
    hi = cfg.crop_range[1]
    need = math.ceil(r / hi - 1e-9)  # scale: the smallest region (r / high); fraction: high x side >= r
    return max(r, need) if cfg.crop == "scale" else need


def _offset(u: float | None, span: int) -> int:
    """Position along an axis with ``span`` pixels of freedom; None = centred."""
    return span // 2 if u is None else int(u * (span + 1))


@dataclass(frozen=True)
class Crop:
    """How to cut one crop: resize the whole image to ``whole`` = (w, h) first if set
    (crop=resize), cut ``box`` = (x, y, w, h), resize the cut to ``size`` = (w, h)
    (equal to the box size: no resampling), and if ``pad`` = (x, y) is set, place it
    at that offset on a resolution x resolution canvas."""

    box: tuple[int, int, int, int]
    size: tuple[int, int]
    pad: tuple[int, int] | None = None
    whole: tuple[int, int] | None = None


def plan_crop(w: int, h: int, cfg: DataConfig, u: tuple[float | None, ...], name: str = "") -> Crop:
    """Where to crop a ``w`` x ``h`` image. ``u`` holds uniform draws in [0, 1)
    (None = the deterministic middle: centred, mid-range scale): ``(x, y)`` for
    ``resize``, ``(s, x, y)`` for ``scale`` / ``fraction``. Raises BadImage for an
    image too small under ``small_images=skip``."""
    r, m = cfg.resolution, min(w, h)
    if m < min_shorter_side(cfg) and cfg.small_images == "skip":
        raise BadImage(
            name, f"image {w}x{h} is smaller than the {r}px crop allows without upsampling (shorter side "
            f"{m} < {min_shorter_side(cfg)} px; data.small_images=skip)"
        )  # fmt: skip
    if cfg.crop == "resize":
        ux, uy = u
        if m < r and cfg.small_images == "pad":
            return _padded(w, h, r, ux, uy)
        if cfg.resize_shorter or m < r:  # (a small image under "upscale" is resized even without resize_shorter)
            nw, nh = shorter_side_to(w, h, r)
            return Crop((_offset(ux, nw - r), _offset(uy, nh - r), r, r), (r, r), whole=(nw, nh))
        return Crop((_offset(ux, w - r), _offset(uy, h - r), r, r), (r, r))
    us, ux, uy = u
    lo, hi = cfg.crop_range
    # The range of square sides (source pixels) the mode allows, within the image.
    c_lo, c_hi = (r / hi, r / lo) if cfg.crop == "scale" else (lo * m, hi * m)
    c_hi = min(c_hi, m)
    if cfg.small_images != "upscale":
        c_lo = max(c_lo, r)  # never upsample
    if c_lo > c_hi:  # nothing in range fits
        if m < r and cfg.small_images == "pad":
            return _padded(w, h, r, ux, uy)
        c = m  # the whole shorter side (a downscale when m >= r, else an upscale as asked)
    else:
        us = 0.5 if us is None else us
        if cfg.crop == "scale":  # uniform in the scale s = r / side
            s_lo, s_hi = r / c_hi, r / c_lo
            c = round(r / (s_lo + us * (s_hi - s_lo)))
        else:  # uniform in the fraction f = side / m
            c = round(c_lo + us * (c_hi - c_lo))
        c = min(max(c, 1), m)
    return Crop((_offset(ux, w - c), _offset(uy, h - c), c, c), (r, r))


def _padded(w: int, h: int, r: int, ux: float | None, uy: float | None) -> Crop:
    """Native pixels of an image smaller than the crop on some side, on a canvas: along
    each axis the same draw picks the crop offset (side >= r) or the canvas offset."""
    cw, ch = min(w, r), min(h, r)
    box = (_offset(ux, w - cw), _offset(uy, h - ch), cw, ch)
    return Crop(box, (cw, ch), (_offset(ux, r - cw), _offset(uy, r - ch)))


def apply_crop(img: Image.Image, crop: Crop, cfg: DataConfig) -> torch.Tensor:
    """PIL image -> uint8 [3, R, R] following ``crop``."""
    x, y, cw, ch = crop.box
    if crop.whole is not None:
        nw, nh = crop.whole
        chw = resize_uint8(to_uint8_chw(img), (nh, nw))[:, y : y + ch, x : x + cw]
    else:
        # Cut first: only the crop is converted (and resized), not the whole photo.
        chw = to_uint8_chw(img.crop((x, y, x + cw, y + ch)))
        if crop.size != (cw, ch):
            chw = resize_uint8(chw, (crop.size[1], crop.size[0]))
    if crop.pad is not None:
        r = cfg.resolution
        canvas = torch.full((3, r, r), PAD_VALUE, dtype=torch.uint8)
        px, py = crop.pad
        canvas[:, py : py + ch, px : px + cw] = chw
        chw = canvas
    return chw


def train_transform(img: Image.Image, cfg: DataConfig, rng: random.Random, name: str = "") -> torch.Tensor:
    """Crop (see the module docstring) -> optional flip -> [3, R, R] in [-1, 1].

    All randomness is drawn from ``rng``, always the same number of draws for a mode."""
    if cfg.crop == "resize":
        u = (rng.random(), rng.random())
    else:
        u = (rng.random(), rng.random(), rng.random())
    f = rng.random()
    if not cfg.random_crop:
        u = (*u[:-2], None, None)  # centred (the scale is still drawn)
    chw = apply_crop(img, plan_crop(img.width, img.height, cfg, u, name), cfg)
    if cfg.flip and f < 0.5:
        chw = chw.flip(-1)
    return to_tensor(chw)


def val_transform(img: Image.Image, cfg: DataConfig, name: str = "") -> torch.Tensor:
    """Deterministic: the centred crop at the middle of the scale range -> [3, R, R] in [-1, 1]."""
    u = (None, None) if cfg.crop == "resize" else (None, None, None)
    return to_tensor(apply_crop(img, plan_crop(img.width, img.height, cfg, u, name), cfg))


def decode_min_side(cfg: DataConfig) -> int | None:
    """How far a JPEG may be DCT-downscaled while decoding (see ``DataConfig.fast_jpeg``)."""
    return cfg.resolution if cfg.crop == "resize" and cfg.resize_shorter and cfg.fast_jpeg else None


def load_sample(data: bytes | Path, name: str, key: str, cfg: DataConfig, rng: random.Random) -> dict:
    """Decode + transform one sample; a bad one becomes a marker for :func:`collate` to drop."""
    try:
        img = decode_image(data, name, min_side=decode_min_side(cfg))
        return {"image": train_transform(img, cfg, rng, name), "key": key, "error": None}
    except BadImage as e:
        return {"image": None, "key": key, "error": (e.name, e.reason)}


def collate(items: list[dict]) -> dict:
    """Stack good samples; bad ones are dropped and listed in ``skipped``.

    ``image`` is [B', 3, R, R] with B' <= batch size (B' = 0 if all were bad). Dropping
    (instead of substituting another image) keeps every other sample exactly where it
    would have been. Whole-shard problems ride along in ``shard_errors``.
    """
    good = [it for it in items if it["image"] is not None]
    images = torch.stack([it["image"] for it in good]) if good else torch.empty(0)
    return {
        "image": images,
        "key": [it["key"] for it in good],
        "skipped": [e for it in items for e in it.get("shard_errors", ())]
        + [it["error"] for it in items if it["image"] is None],
    }
