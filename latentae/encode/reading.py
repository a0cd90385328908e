"""Decoding workers: claim a part, read its inputs, decode and preprocess, hand over uint8 batches.

Preprocessing (:func:`preprocess`):

* ``resize`` (default): resize the shorter side to ``size`` (bicubic, antialiased), then
  centre crop ``size`` x ``size``. Keeps the aspect ratio (an exact resize would squash
  images, and the VAE would encode distorted content). JPEGs are decoded at a reduced
  DCT scale when that still leaves the shorter side >= ``size`` (PIL ``draft``), which
  makes decoding several times faster for large photos. The resize is torch's uint8
  antialiased bicubic (PIL's kernel, several times faster; the job records it).
* ``crop``: centre crop ``size`` x ``size`` at the original resolution; smaller images
  are skipped (and listed).
* ``keep``: the whole image at its own size; images of equal size are batched together.
  Sizes that are not a multiple of the VAE's factor are padded by the model
  (``padded_size`` in the metadata; crop the decoded image back to ``size``).

A sample's own problems (unreadable, corrupt, truncated, not an image, too small for the
crop, a size the VAE refuses) are skipped here and listed with their reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from latentae.encode.claims import Claims
from latentae.encode.config import EncodeConfig, Skipped
from latentae.encode.plan import SHARD_STRIDE, InputPlan, Part
from latentae.encode.writer import clear_part, part_done
from latentae.imageio import (
    BadImage,
    RawSample,
    decode_image,
    decode_image_and_size,
    iter_shard,
    resize_uint8,
    shorter_side_to,
    to_uint8_chw,
)

# How 'resize' resamples, part of the job identity: pixels that differ (even by 1/255)
# give different latents, so a resumed job must not mix two resamplings.
RESAMPLE = "bicubic, antialiased (torch uint8)"


def preprocess(img: Image.Image, original_size: tuple[int, int], cfg: EncodeConfig, name: str):
    """Decoded RGB image -> (uint8 tensor [3, H, W], metadata). Raises BadImage if unusable."""
    ow, oh = original_size
    meta: dict[str, Any] = {"original_size": [ow, oh]}
    if cfg.preprocess == "keep":
        meta.update(resized_size=[ow, oh], crop_box=[0, 0, ow, oh])
        return to_uint8_chw(img).contiguous(), meta
    s = cfg.size
    if cfg.preprocess == "crop":
        if ow < s or oh < s:
            raise BadImage(name, f"image is {ow}x{oh}, smaller than the {s}x{s} centre crop (use --preprocess resize)")
        rw, rh = ow, oh
    else:  # resize: shorter side to s, from the original aspect ratio (img may be a reduced JPEG draft)
        rw, rh = shorter_side_to(ow, oh, s)
    left, top = (rw - s) // 2, (rh - s) // 2
    box = (left, top, left + s, top + s)
    meta.update(resized_size=[rw, rh], crop_box=list(box))
    if img.size == (rw, rh):  # 'crop', or already the size: no resampling, copy only the crop
        return to_uint8_chw(img.crop(box)).contiguous(), meta
    # Not PIL's resize (3x slower) and not bit-identical to it: the job identity names it.
    chw = resize_uint8(to_uint8_chw(img), (rh, rw))
    return chw[:, top : top + s, left : left + s].contiguous(), meta


def load_sample(sample: RawSample, index: int, cfg: EncodeConfig, multiple_of: int = 1):
    """Raw bytes -> (uint8 [3, H, W], metadata). ``multiple_of``: sizes the VAE accepts
    (> 1 only for a VAE configured to refuse padding). Raises BadImage."""
    name = sample.source
    if cfg.preprocess == "resize":
        # img may be a reduced JPEG draft, so the true size comes from the header
        img, original = decode_image_and_size(sample.data, name, min_side=cfg.size)
    else:
        img = decode_image(sample.data, name)
        original = img.size
    t, meta = preprocess(img, original, cfg, name)
    h, w = t.shape[1:]
    if h % multiple_of or w % multiple_of:
        raise BadImage(name, f"size {w}x{h} is not a multiple of {multiple_of}, "
                             "and this VAE does not pad (odd_size='error')")
    return t, {"key": sample.key, "index": index, "source": sample.source, **meta, "size": [w, h]}


def read_part(plan: InputPlan, part: Part, errors: list[str]) -> Iterator[tuple[int, RawSample | Skipped]]:
    """(index, raw sample or the reason it is skipped) of a part's inputs, in order.
    Errors of an input shard (cannot be opened, cut short, its command failed) go to ``errors``."""
    if plan.kind == "folder":
        root = Path(plan.path)
        for i in range(part.start, part.end):
            f, key = root / plan.files[i], plan.keys[i]
            if i in plan.duplicates:
                yield i, Skipped(i, key, str(f), plan.duplicates[i])
                continue
            try:
                data = f.read_bytes()
            except OSError as e:
                yield i, Skipped(i, key, str(f), f"cannot read file: {e.strerror or e}")
                continue
            yield i, RawSample(key=key, source=str(f), data=data)
        return
    for pos, s in enumerate(iter_shard(part.url, lambda name, reason: errors.append(f"{name}: {reason}"))):
        if pos >= SHARD_STRIDE:
            raise ValueError(f"input shard {part.url} holds more than {SHARD_STRIDE} samples; split it")
        yield part.index * SHARD_STRIDE + pos, s


@dataclass
class Batch:
    """What a decoding worker hands over: images of one part and one size.

    ``first``: the part's first batch (the worker has claimed the part); ``last``: its last,
    with ``input_errors``; ``consumed``: inputs covered since the previous batch."""

    part: int
    images: torch.Tensor | None  # uint8 [B, 3, H, W]
    meta: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    consumed: int
    first: bool
    last: bool
    input_errors: list[str]

    def pin_memory(self) -> "Batch":  # called by the DataLoader's pinning thread (pin_memory=True)
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


class PartBatches(IterableDataset):
    """Each worker (of each rank) walks all parts from its own starting point, claims the
    ones nobody holds and yields their batches; parts done or held elsewhere are passed by."""

    def __init__(self, plan: InputPlan, parts: list[Part], cfg: EncodeConfig, claims: Claims, out: Path,
                 rank: int, world_size: int, multiple_of: int = 1):
        self.plan, self.parts, self.cfg, self.claims, self.out = plan, parts, cfg, claims, out
        self.rank, self.world_size, self.multiple_of = rank, world_size, multiple_of

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        nw, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        # Consumer c of C starts at the c-th C-th of the list: one run's processes and
        # workers start apart and meet only at the end, where claims keep them apart.
        c, n = self.rank * nw + wid, len(self.parts)
        first = c * n // (self.world_size * nw)
        for part in self.parts[first:] + self.parts[:first]:
            if part_done(self.out, part) or not self.claims.try_claim(part.name):
                continue
            if part_done(self.out, part):  # finished between our check and our claim
                self.claims.release(part.name)
                continue
            clear_part(self.out, part)  # what a process that died on this part left
            yield from self._part(part)

    def _part(self, part: Part) -> Iterator[Batch]:
        bs = self.cfg.batch_size
        # A part with many distinct sizes ('keep') must not hold all its images: above
        # this many buffered images the fullest bucket goes out as a short batch.
        max_buffered = 4 * bs
        buckets: dict[tuple[int, int], list[tuple[torch.Tensor, dict]]] = {}
        skipped: list[Skipped] = []
        errors: list[str] = []
        consumed = buffered = 0
        first = True

        def emit(size, last=False) -> Batch:
            nonlocal consumed, skipped, buffered, first
            items = buckets.pop(size, []) if size is not None else []
            buffered -= len(items)
            b = Batch(part.index, torch.stack([t for t, _ in items]) if items else None, [m for _, m in items],
                      [asdict(s) for s in skipped], consumed, first, last, list(errors) if last else [])
            consumed, skipped, first = 0, [], False
            return b

        for i, item in read_part(self.plan, part, errors):
            consumed += 1
            if isinstance(item, Skipped):
                skipped.append(item)
                continue
            try:
                t, meta = load_sample(item, i, self.cfg, self.multiple_of)
            except BadImage as e:
                skipped.append(Skipped(i, item.key, item.source, e.reason))
                continue
            except Exception as e:  # noqa: BLE001 - a decoder bug on one sample must not end the job
                skipped.append(Skipped(i, item.key, item.source, f"{type(e).__name__}: {e}"))
                continue
            size = (t.shape[1], t.shape[2])
            buckets.setdefault(size, []).append((t, meta))
            buffered += 1
            if len(buckets[size]) >= bs:
                yield emit(size)
            elif buffered > max_buffered:
                yield emit(max(buckets, key=lambda k: len(buckets[k])))
        sizes = list(buckets)
        for j, size in enumerate(sizes):
            yield emit(size, last=j == len(sizes) - 1)
        if not sizes:
            yield emit(None, last=True)
