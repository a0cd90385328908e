"""Encode an image dataset to VAE latents: resumable, multi-process, never killed by one bad image.

The job (``encode_dataset``, CLI ``tools/encode.py``):

1. The input (image folder or WebDataset shards) is put in a stable order -- folders by
   relative path; shards by shard order then position, after one counting pass over
   the shards whose result is kept in ``job.json`` -- and cut into *parts* of
   ``shard_size`` inputs. Part p becomes ``DIR/part-{p:06d}.tar``; it is done iff that
   file exists. Shards are written as ``*.tar.tmp`` and renamed when complete, so a
   killed run leaves only complete shards plus temporaries that are redone.
2. ``job.json`` (written at the first start) pins what is encoded: VAE weights hash and
   architecture, preprocessing, storage, and the input's fingerprint. A re-run that
   differs in any of these is refused; ``--overwrite`` discards the old output.
3. Every process lists the parts not done yet, all wait at a barrier (so nobody has
   written anything yet and all lists agree), and process r takes the r-th contiguous
   slice of that list. Any number of processes works on any re-run, and the
   processes of one run write disjoint files. With several nodes, DIR must be on a
   filesystem that all of them see.
4. Inside a process, DataLoader workers read, decode and preprocess whole parts
   (worker w takes the w-th contiguous slice of the process's parts, so each input
   shard is streamed once) and hand over uint8 batches of one part and one image size;
   the main process encodes and writes. Decoding overlaps with the model.
5. Whoever finishes the last part merges the per-part json files into ``manifest.json``.

Preprocessing (``preprocess``):
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
  ``tile`` N: images larger than N px on a side are encoded tile by tile.

Bad inputs (unreadable, corrupt, truncated, not an image, too small for the crop,
non-finite latents, an encode error) are skipped and listed with their reason.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import io
import json
import logging
import math
import os
import random
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from latentae.config import check_types, to_dict
from latentae.imageio import (
    BadImage,
    RawSample,
    check_source,
    decode_image,
    decode_image_and_size,
    folder_key,
    is_shard_source,
    iter_shard,
    resize_uint8,
    shorter_side_to,
    to_uint8_chw,
)
from latentae.latents import FORMAT, JOB, MANIFEST, escape_key, npy_bytes, to_stored

# How 'resize' resamples, part of the job identity: pixels that differ (even by 1/255)
# give different latents, so a resumed job must not mix two resamplings.
RESAMPLE = "bicubic, antialiased (torch uint8)"

log = logging.getLogger(__name__)

_NORM_FIELDS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "sample_size")
_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class EncodeConfig:
    vae: str = ""  # anything latentae.io.load_vae reads
    data: str = ""  # image folder, shard pattern or pipe: URL
    out: str = ""  # output folder
    preprocess: Literal["resize", "crop", "keep"] = "resize"
    size: int = 256  # resize / crop: output side in pixels
    store: Literal["dist", "mode", "sample"] = "dist"  # mean+logvar, the mean, or one seeded draw
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"  # on disk
    flip: bool = False  # also store the latents of the horizontally flipped image
    shard_size: int = 1000  # inputs per output shard (a part)
    batch_size: int = 16
    num_workers: int = 2  # DataLoader workers decoding images, per process
    # Scheduling of the decoding workers. On a CPU the model's intra-op threads use every
    # core and all wait at each op's barrier when one of them is preempted, so a worker
    # that takes a core stalls the whole model for as long as it runs. 'idle' (Linux
    # SCHED_IDLE) lets workers run only on cores the model leaves idle (between ops, while
    # it waits for a batch: never a deadlock, at worst decoding and encoding alternate);
    # 'low' is nice +10; 'auto' = 'idle' when the model runs on the CPU, 'normal' on a GPU
    # (where the CPU is the workers' alone). Measured with tools/bench_encode.py --worker-priority
    # auto normal (2 idle cores, tiny VAE, two runs of 5): end-to-end / model-only 0.965 and 0.950
    # with 'idle', 0.944 and 0.931 with 'normal'.
    worker_priority: Literal["auto", "normal", "low", "idle"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # the VAE's compute dtype
    tile: int | None = None  # encode images larger than this (px) in tiles
    tile_overlap: int = 128
    seed: int = 0  # for store="sample"
    threads: int | None = None  # torch intra-op threads in the encoding process (None = torch's default)
    overwrite: bool = False

    def __post_init__(self):
        check_types(self)  # e.g. worker_priority="idel" names the choices and the closest one
        for name in ("size", "shard_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.tile is not None and self.tile < 8:
            raise ValueError(f"tile must be >= 8 px, got {self.tile}")
        if self.tile is not None and not 0 <= self.tile_overlap < self.tile:
            raise ValueError(f"tile_overlap must be in [0, tile={self.tile}), got {self.tile_overlap}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


class JobMismatch(ValueError):
    """The output folder belongs to a different encoding job."""


@dataclass(frozen=True)
class Skipped:
    index: int
    key: str
    source: str
    reason: str


@dataclass
class EncodeResult:
    out: Path
    num_parts: int
    parts_done_before: int  # parts already on disk when this process started
    parts_written: int  # by this process
    num_encoded: int  # by this process
    num_skipped: int  # by this process
    manifest: dict[str, Any] | None  # set by the process that wrote manifest.json
    nothing_to_do: bool = False
    seconds: float = 0.0  # the whole call
    pipeline_seconds: float = 0.0  # reading, decoding, encoding and writing (without VAE load / listing)
    first_batch_seconds: float = 0.0  # of pipeline_seconds: until the workers delivered the first batch


# ----------------------------------------------------------------------------- input plan


@dataclass
class InputPlan:
    """The input in its stable order: index i <-> one image sample."""

    kind: Literal["folder", "shards"]
    path: str
    files: list[Path] = field(default_factory=list)  # folder
    keys: list[str] = field(default_factory=list)  # folder
    duplicates: dict[int, str] = field(default_factory=dict)  # folder: index -> reason
    urls: list[str] = field(default_factory=list)  # shards
    counts: list[int] = field(default_factory=list)  # shards: image samples per shard
    offsets: list[int] = field(default_factory=list)  # shards: first index of each

    @property
    def total(self) -> int:
        return len(self.files) if self.kind == "folder" else sum(self.counts)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        if self.kind == "folder":
            for k, f in zip(self.keys, self.files):
                h.update(f"{k}\0{f.suffix}\n".encode())
        else:
            for u, c in zip(self.urls, self.counts):
                h.update(f"{u}\0{c}\n".encode())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "kind": self.kind, "count": self.total, "fingerprint": self.fingerprint()}
        if self.kind == "shards":
            d["shards"] = [[u, c] for u, c in zip(self.urls, self.counts)]
        return d


def _canonical_url(url: str) -> str:
    return url if url.startswith("pipe:") else str(Path(url).resolve())


def plan_input(
    path: str,
    known: dict[str, Any] | None = None,
    count_shards: Callable[[list[str]], list[int]] | None = None,
    found: list | None = None,
) -> InputPlan:
    """Order the input. For shards, per-shard sample counts come from ``known`` (a
    previous ``job.json`` input record with the same shard list) or ``count_shards``.
    ``found``: the result of ``check_source(path)`` if already computed."""
    found = found if found is not None else check_source(path)
    if not is_shard_source(path):
        files = [Path(p) for p in found]
        keys = [folder_key(path, f) for f in files]
        first: dict[str, Path] = {}
        dups: dict[int, str] = {}
        for i, (k, f) in enumerate(zip(keys, files)):
            if k in first:  # photo.jpg next to photo.png: one key, keep the first
                dups[i] = f"duplicate key '{k}' (also {first[k]}); rename one to encode both"
            else:
                first[k] = f
        return InputPlan(kind="folder", path=path, files=files, keys=keys, duplicates=dups)
    urls = [_canonical_url(str(u)) for u in found]
    if known and known.get("kind") == "shards" and [u for u, _ in known.get("shards", [])] == urls:
        counts = [int(c) for _, c in known["shards"]]
    else:
        counts = (count_shards or count_shard_samples)(urls)
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    return InputPlan(kind="shards", path=path, urls=urls, counts=counts, offsets=offsets)


def count_shard_samples(urls: list[str]) -> list[int]:
    """Image samples per shard, counted with the same reader that encodes them."""
    counts = []
    for url in urls:
        errors: list[str] = []
        counts.append(sum(1 for _ in iter_shard(url, lambda n, r: errors.append(r))))
        for r in errors:
            log.warning("input shard %s: %s (counted the %d samples before)", url, r, counts[-1])
    return counts


class _InputReader:
    """Raw samples of index ranges of the plan. Keeps one input shard open between
    calls, so reading consecutive ranges streams each shard once."""

    def __init__(self, plan: InputPlan):
        self.plan = plan
        self.url_i = -1
        self.pos = 0  # next sample position within the open shard
        self.it: Iterator[RawSample] | None = None
        self.errors: list[str] = []

    def read(self, start: int, end: int) -> Iterator[tuple[int, RawSample | Skipped]]:
        if self.plan.kind == "folder":
            yield from self._read_folder(start, end)
        else:
            yield from self._read_shards(start, end)

    def _read_folder(self, start: int, end: int):
        p = self.plan
        for i in range(start, end):
            f, key = p.files[i], p.keys[i]
            if i in p.duplicates:
                yield i, Skipped(i, key, str(f), p.duplicates[i])
                continue
            try:
                data = f.read_bytes()
            except OSError as e:
                yield i, Skipped(i, key, str(f), f"cannot read file: {e.strerror or e}")
                continue
            yield i, RawSample(key=key, source=str(f), data=data)

    def _open(self, u: int) -> None:
        self.close()
        self.errors = []
        self.it = iter_shard(self.plan.urls[u], lambda name, reason: self.errors.append(reason))
        self.url_i, self.pos = u, 0

    def close(self) -> None:
        if self.it is not None:
            self.it.close()  # runs iter_shard's cleanup (kills a pipe: command)
        self.it, self.url_i = None, -1

    def _read_shards(self, start: int, end: int):
        p = self.plan
        i = start
        while i < end:
            u = bisect.bisect_right(p.offsets, i) - 1
            local, stop = i - p.offsets[u], min(end, p.offsets[u + 1])
            if u != self.url_i or self.pos > local:
                self._open(u)
            ok = True
            while ok and self.pos < local:  # skip raw, without decoding
                ok = next(self.it, None) is not None
                self.pos += ok
            while ok and i < stop:
                s = next(self.it, None)
                if s is None:
                    ok = False
                    break
                self.pos += 1
                yield i, s
                i += 1
            if not ok:  # the shard gave fewer samples than the counting pass saw
                why = "; ".join(self.errors) or "no error reported"
                reason = (
                    f"input shard {p.urls[u]} ended after {self.pos} of {p.counts[u]} samples "
                    f"counted when the job started ({why})"
                )
                for j in range(i, stop):
                    yield j, Skipped(j, f"#{j}", f"{p.urls[u]}#{j - p.offsets[u]}", reason)
                i = stop
                self.close()


# ----------------------------------------------------------------------------- preprocessing


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


def _load(sample: RawSample, index: int, cfg: EncodeConfig) -> tuple[torch.Tensor, dict[str, Any]]:
    name = sample.source
    if cfg.preprocess == "resize":
        # img may be a reduced JPEG draft, so the true size comes from the header
        img, original = decode_image_and_size(sample.data, name, min_side=cfg.size)
    else:
        img = decode_image(sample.data, name)
        original = img.size
    t, meta = preprocess(img, original, cfg, name)
    h, w = t.shape[1:]
    return t, {"key": sample.key, "index": index, "source": sample.source, **meta, "size": [w, h]}


# ----------------------------------------------------------------------------- worker side


@dataclass(frozen=True)
class Part:
    index: int
    start: int
    end: int

    @property
    def name(self) -> str:
        return f"part-{self.index:06d}"


def make_parts(total: int, shard_size: int) -> list[Part]:
    return [Part(p, s, min(s + shard_size, total)) for p, s in enumerate(range(0, total, shard_size))]


class _PartBatches(IterableDataset):
    """Decoded, preprocessed batches of whole parts (one part and one image size per batch).

    Yields ``{"part", "images": uint8 [B, 3, H, W] | None, "meta": [...], "skipped": [...],
    "consumed": inputs covered since the previous batch, "last": bool}``.
    """

    def __init__(self, plan: InputPlan, parts: list[Part], cfg: EncodeConfig):
        self.plan, self.parts, self.cfg = plan, parts, cfg

    def __iter__(self):
        info = get_worker_info()
        nw, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        n = len(self.parts)
        mine = self.parts[wid * n // nw : (wid + 1) * n // nw]  # contiguous: input shards stream once
        reader = _InputReader(self.plan)
        try:
            for part in mine:
                yield from self._part(part, reader)
        finally:
            reader.close()

    def _part(self, part: Part, reader: _InputReader):
        bs = self.cfg.batch_size
        # A part with many distinct sizes ('keep') must not hold all its images: above
        # this many buffered images the fullest bucket goes out as a short batch.
        max_buffered = 4 * bs
        buckets: dict[tuple[int, int], list[tuple[torch.Tensor, dict]]] = {}
        skipped: list[Skipped] = []
        consumed = buffered = 0

        def emit(size, last=False):
            nonlocal consumed, skipped, buffered
            items = buckets.pop(size, []) if size is not None else []
            buffered -= len(items)
            out = {
                "part": part.index,
                "images": torch.stack([t for t, _ in items]) if items else None,
                "meta": [m for _, m in items],
                "skipped": [asdict(s) for s in skipped],
                "consumed": consumed,
                "last": last,
            }
            consumed, skipped = 0, []
            return out

        for i, item in reader.read(part.start, part.end):
            consumed += 1
            if isinstance(item, Skipped):
                skipped.append(item)
                continue
            try:
                t, meta = _load(item, i, self.cfg)
            except BadImage as e:
                skipped.append(Skipped(i, item.key, item.source, e.reason))
                continue
            except Exception as e:  # noqa: BLE001 - one sample must never end the job
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


# ----------------------------------------------------------------------------- writer side


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any, tmp_suffix: str = ".tmp") -> None:
    tmp = path.with_name(path.name + tmp_suffix)
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _ShardWriter:
    """One part: samples go to ``part-N.tar.tmp``; ``finish`` writes ``part-N.json``,
    then renames the tar into place, so the tar's existence means the part is done."""

    def __init__(self, out: Path, part: Part, job_id: str):
        self.out, self.part, self.job_id = out, part, job_id
        self.path = out / f"{part.name}.tar"
        self.tmp = out / f"{part.name}.tar.tmp"
        self.file = open(self.tmp, "wb")  # noqa: SIM115 - closed in finish/abort
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.PAX_FORMAT)
        self.used: set[str] = set()
        self.num_encoded = 0
        self.skipped: list[dict[str, Any]] = []

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed mtime: same job, same bytes
        self.tar.addfile(info, io.BytesIO(data))

    def add(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        key = escape_key(meta["key"])
        if key in self.used:  # equal keys from different input shards: keep samples apart
            key = f"{key}~{meta['index']}"
        self.used.add(key)
        self._add(f"{key}.json", json.dumps(meta).encode())
        for ext, a in arrays.items():
            self._add(f"{key}.{ext}", npy_bytes(a))
        self.num_encoded += 1

    def skip(self, record: dict[str, Any]) -> None:
        self.skipped.append(record)

    def finish(self) -> dict[str, Any]:
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.skipped.sort(key=lambda r: r["index"])
        summary = {
            "part": self.part.index,
            "file": self.path.name,
            "first_index": self.part.start,
            "num_inputs": self.part.end - self.part.start,
            "num_encoded": self.num_encoded,
            "num_skipped": len(self.skipped),
            "skipped": self.skipped,
            "job_id": self.job_id,
        }
        if summary["num_encoded"] + summary["num_skipped"] != summary["num_inputs"]:
            raise RuntimeError(
                f"{self.path.name}: {summary['num_encoded']} encoded + {summary['num_skipped']} skipped "
                f"!= {summary['num_inputs']} inputs (an encoder bug; the part is not marked done)"
            )
        write_json_atomic(self.out / f"{self.part.name}.json", summary)
        os.replace(self.tmp, self.path)
        _fsync_dir(self.out)
        return summary

    def abort(self) -> None:
        try:
            self.tar.close()
            self.file.close()
        finally:
            self.tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- encoding


def _draw_seed(seed: int, index: int, flipped: bool) -> int:
    return random.Random(f"encode/{seed}/{index}/{int(flipped)}").getrandbits(63)


def _load_tiling():
    try:
        from latentae.tiling import tiled_encode
    except ImportError as e:
        raise RuntimeError(
            f"--tile needs tiled encoding (latentae.tiling.tiled_encode), which is not available here: {e}. "
            "Encode without --tile, or use --preprocess resize/crop for large images."
        ) from e
    return tiled_encode


class _Encoder:
    """uint8 batches -> per-sample arrays to store; isolates failures to single samples."""

    def __init__(self, vae, cfg: EncodeConfig, device: torch.device):
        self.vae, self.cfg, self.device = vae, cfg, device
        self.dtype = _PRECISIONS[cfg.precision]
        self.tiled_encode = _load_tiling() if cfg.tile is not None else None
        self.any_success = False
        self.failures = 0  # before the first success

    @torch.inference_mode()
    def _moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.to(self.device, non_blocking=True).to(self.dtype).div_(127.5).sub_(1.0)  # [B, 3, H, W] in [-1, 1]
        if self.cfg.flip:
            x = torch.cat([x, x.flip(-1)])  # one call for both: better device use
        if self.tiled_encode is not None and max(x.shape[-2:]) > self.cfg.tile:
            post = self.tiled_encode(self.vae, x, tile=self.cfg.tile, overlap=self.cfg.tile_overlap)
        else:
            post = self.vae.encode(x)
        return post.mean.float().cpu(), post.logvar.float().cpu()  # [B(x2), C, h, w]

    def _arrays(self, mean: torch.Tensor, logvar: torch.Tensor, index: int, flipped: bool) -> dict[str, np.ndarray]:
        pre, dt = ("flip_" if flipped else ""), self.cfg.dtype
        if self.cfg.store == "dist":
            return {f"{pre}mean.npy": to_stored(mean, dt), f"{pre}logvar.npy": to_stored(logvar, dt)}
        if self.cfg.store == "sample":
            g = torch.Generator().manual_seed(_draw_seed(self.cfg.seed, index, flipped))
            mean = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)
        return {f"{pre}latent.npy": to_stored(mean, dt)}

    def encode(self, images: torch.Tensor, metas: list[dict]) -> list[dict[str, np.ndarray] | str]:
        """Per sample: the arrays to store, or the reason it failed."""
        out = self._encode(images, metas)
        if not self.any_success:
            self.failures += sum(isinstance(r, str) for r in out)
            if self.failures >= 8:
                # Bad *images* are caught while decoding; a VAE that fails on everything is a
                # setup problem (wrong dtype, broken weights) -- stop instead of skipping it all.
                raise RuntimeError(
                    f"the VAE failed on every one of the first {self.failures} inputs, e.g. {out[0]}; stopping"
                )
        return out

    def _encode(self, images: torch.Tensor, metas: list[dict]) -> list[dict[str, np.ndarray] | str]:
        try:
            mean, logvar = self._moments(images)
        except (RuntimeError, ValueError) as e:  # e.g. out of memory on a large image
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(metas) == 1:
                return [f"encoding failed: {type(e).__name__}: {str(e)[:300]}"]
            # Retry one by one so a single bad sample costs only itself.
            return [r for j in range(len(metas)) for r in self._encode(images[j : j + 1], metas[j : j + 1])]
        b = len(metas)
        out: list[dict[str, np.ndarray] | str] = []
        for j, meta in enumerate(metas):
            views = [(mean[j], logvar[j], False)] + ([(mean[b + j], logvar[b + j], True)] if self.cfg.flip else [])
            if not all(torch.isfinite(m).all() and torch.isfinite(lv).all() for m, lv, _ in views):
                out.append("non-finite latents (NaN/inf) from the VAE")
                continue
            arrays: dict[str, np.ndarray] = {}
            for m, lv, flipped in views:
                arrays.update(self._arrays(m, lv, meta["index"], flipped))
            out.append(arrays)
            self.any_success = True
        return out


def _sample_meta(meta: dict[str, Any], cfg: EncodeConfig, f: int, latent_hw: tuple[int, int]) -> dict[str, Any]:
    w, h = meta["size"]
    return {
        **meta,
        "padded_size": [math.ceil(w / f) * f, math.ceil(h / f) * f],
        "latent_size": [latent_hw[1], latent_hw[0]],
        "dtype": cfg.dtype,
        "store": cfg.store,
        "flip": cfg.flip,
    }


# ----------------------------------------------------------------------------- job identity


def job_record(cfg: EncodeConfig, vae, plan: InputPlan, weights_hash: str) -> dict[str, Any]:
    """What ``job.json`` holds; :func:`compare_jobs` decides whether two runs are one job."""
    return {
        "format": FORMAT,
        "vae": {"path": cfg.vae, "weights_hash": weights_hash, "config": to_dict(vae.config)},
        "preprocess": {
            "mode": cfg.preprocess,
            "size": cfg.size if cfg.preprocess != "keep" else None,
            "resample": RESAMPLE if cfg.preprocess == "resize" else None,
            "tile": cfg.tile,
            "tile_overlap": cfg.tile_overlap if cfg.tile is not None else None,
        },
        "storage": {
            "store": cfg.store,
            "dtype": cfg.dtype,
            "flip": cfg.flip,
            "seed": cfg.seed if cfg.store == "sample" else None,
        },
        "precision": cfg.precision,
        "shard_size": cfg.shard_size,
        "input": plan.describe(),
    }


def _identity(job: dict[str, Any]) -> dict[str, Any]:
    # Normalisation factors do not change raw latents (a VAE re-exported with new
    # factors is the same encoder), and paths may be spelled differently.
    arch = {k: v for k, v in job["vae"]["config"].items() if k not in _NORM_FIELDS}
    return {
        "VAE weights (sha256)": job["vae"]["weights_hash"],
        "VAE architecture": arch,
        "preprocessing": job["preprocess"],
        "storage": job["storage"],
        "precision": job["precision"],
        "shard_size": job["shard_size"],
        "input (files/shards and counts)": [job["input"]["kind"], job["input"]["count"], job["input"]["fingerprint"]],
    }


def compare_jobs(old: dict[str, Any], new: dict[str, Any], out: Path) -> None:
    a, b = _identity(old), _identity(new)
    diffs = [f"  {k}: existing {json.dumps(a[k])} vs now {json.dumps(b[k])}" for k in a if a[k] != b[k]]
    if diffs:
        raise JobMismatch(
            f"{out} holds latents of a different encoding job ({out / JOB}):\n"
            + "\n".join(diffs)
            + "\nUse another --out folder, or --overwrite to delete the existing latents and start over."
        )


def job_id(job: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(_identity(job), sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- manifest


def _part_done(out: Path, part: Part) -> bool:
    return (out / f"{part.name}.tar").is_file()


def build_manifest(out: Path, job: dict[str, Any], parts: list[Part]) -> dict[str, Any]:
    shards, skipped = [], []
    jid = job_id(job)
    for part in parts:
        p = out / f"{part.name}.json"
        if not p.is_file():
            raise FileNotFoundError(f"{out / (part.name + '.tar')} exists but {p.name} does not: delete the tar to redo it")
        s = json.loads(p.read_text())
        if s.get("job_id") != jid:
            raise JobMismatch(f"{p} belongs to another job (job_id {s.get('job_id')} vs {jid}); delete it and its .tar")
        skipped.extend(s.pop("skipped"))
        s.pop("job_id")
        shards.append(s)
    return {
        "format": FORMAT,
        "job": job,
        "job_id": jid,
        "latent_channels": job["vae"]["config"]["latent_channels"],
        "downsample_factor": 2 ** (len(job["vae"]["config"]["block_out_channels"]) - 1),
        "num_inputs": job["input"]["count"],
        "num_encoded": sum(s["num_encoded"] for s in shards),
        "num_skipped": len(skipped),
        "shards": shards,
        "skipped": skipped,
    }


_OUR_FILES = ("part-*.tar", "part-*.json", "part-*.tmp", "*.json.tmp*", MANIFEST, JOB)


def _read_job(out: Path) -> dict[str, Any] | None:
    path = out / JOB
    if not path.is_file():
        if any(out.glob("part-*.tar")):
            raise JobMismatch(
                f"{out} has latent shards but no {JOB}, so which job wrote them is unknown: "
                "use another --out folder, or --overwrite to delete them"
            )
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise JobMismatch(f"{path} is not valid JSON ({e}): use --overwrite to start over") from e


def _clear(out: Path) -> int:
    """--overwrite: remove what an encoding job writes (and nothing else)."""
    n = 0
    for pattern in _OUR_FILES:
        for p in out.glob(pattern):
            p.unlink()
            n += 1
    return n


# ----------------------------------------------------------------------------- the job


def _gather(state, obj):
    if state.num_processes == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * state.num_processes
    dist.all_gather_object(out, obj)
    return out


def encode_dataset(cfg: EncodeConfig, *, state=None, progress: bool = True) -> EncodeResult:
    """Run (or finish) the encoding job described by ``cfg``; see the module docstring.

    ``state``: an ``accelerate.PartialState`` (created if None): its process index,
    count and device decide what this process encodes and where. Launch several with
    ``accelerate launch --multi_gpu`` or ``torchrun`` (also on CPUs: gloo).
    """
    from accelerate import PartialState

    from latentae.io import load_vae, weights_hash

    t0 = time.perf_counter()
    if not cfg.vae or not cfg.data or not cfg.out:
        raise ValueError("vae, data and out are all required")
    if state is None:
        # cpu=True lets torchrun-launched CPU processes form a gloo group (accelerate only
        # considers MULTI_CPU when asked for the CPU); it is the only choice without CUDA anyway.
        use_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
        state = PartialState(cpu=use_cpu)
    rank, world = state.process_index, state.num_processes
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a folder")
    found = check_source(cfg.data)  # fail early (before loading the VAE) with the data layer's message
    if cfg.tile is not None:
        _load_tiling()
    vae = load_vae(cfg.vae, device=state.device, dtype=_PRECISIONS[cfg.precision])
    whash = weights_hash(vae)

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite:
            n = _clear(out)
            if n:
                log.info("--overwrite: removed %d files of the previous job in %s", n, out)
        for pattern in ("part-*.tmp", "*.json.tmp*"):  # leftovers of a killed run: redone below
            for tmp in out.glob(pattern):
                tmp.unlink()
    state.wait_for_everyone()

    old_job = _read_job(out)

    def count_parallel(urls: list[str]) -> list[int]:
        mine = {i: c for i, c in zip(range(rank, len(urls), world), count_shard_samples(urls[rank::world]))}
        merged: dict[int, int] = {}
        for d in _gather(state, mine):
            merged.update(d)
        return [merged[i] for i in range(len(urls))]

    plan = plan_input(cfg.data, old_job["input"] if old_job else None, count_parallel, found)
    if plan.total == 0:
        raise ValueError(f"{cfg.data}: no image samples found in the shards")
    if len(set(_gather(state, plan.fingerprint()))) > 1:  # every process must cut the same parts
        raise RuntimeError(f"{cfg.data} changed while the processes were listing it; run again")
    job = job_record(cfg, vae, plan, whash)
    if old_job is not None:
        compare_jobs(old_job, job, out)
    elif rank == 0:
        write_json_atomic(out / JOB, job)
    jid = job_id(job)
    parts = make_parts(plan.total, cfg.shard_size)
    pending = [p for p in parts if not _part_done(out, p)]
    state.wait_for_everyone()  # every process has listed before anyone writes

    result = EncodeResult(out=out, num_parts=len(parts), parts_done_before=len(parts) - len(pending),
                          parts_written=0, num_encoded=0, num_skipped=0, manifest=None)
    if not pending:
        if (out / MANIFEST).is_file():
            result.nothing_to_do = True
            result.seconds = time.perf_counter() - t0
            return result
    n = len(pending)
    mine = pending[rank * n // world : (rank + 1) * n // world]
    if mine:
        t1 = time.perf_counter()
        _run_parts(cfg, vae, plan, mine, out, jid, state.device, result, progress and state.is_main_process)
        result.pipeline_seconds = time.perf_counter() - t1

    if all(_part_done(out, p) for p in parts) and (rank == 0 or mine):
        # The last process to finish sees every part; writing twice is harmless (same content, atomic).
        manifest = build_manifest(out, job, parts)
        write_json_atomic(out / MANIFEST, manifest, tmp_suffix=f".tmp{rank}")
        result.manifest = manifest
    result.seconds = time.perf_counter() - t0
    return result


def worker_priority(cfg: EncodeConfig, device: torch.device) -> str:
    """The effective decoding-worker priority: 'auto' resolved for this device."""
    if cfg.worker_priority != "auto":
        return cfg.worker_priority
    return "idle" if device.type == "cpu" else "normal"


def _set_priority(priority: str, _worker_id: int = 0) -> None:
    """Runs in each decoding worker (worker_init_fn); lowers only that process."""
    try:
        if priority == "idle" and hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # needs no privilege
        elif priority in ("idle", "low") and hasattr(os, "nice"):
            os.nice(19 if priority == "idle" else 10)  # no SCHED_IDLE here (macOS): the nearest thing
    except OSError as e:  # a sandbox may refuse; speed only, not correctness
        log.warning("could not lower the decoding worker's priority (%s): %s", priority, e)


def _run_parts(cfg, vae, plan, parts, out, jid, device, result: EncodeResult, show: bool) -> None:
    from tqdm import tqdm

    encoder = _Encoder(vae, cfg, device)
    f = vae.config.downsample_factor
    nw = min(cfg.num_workers, len(parts))
    loader = DataLoader(
        _PartBatches(plan, parts, cfg),
        batch_size=None,
        num_workers=nw,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if nw else None,
        worker_init_fn=functools.partial(_set_priority, worker_priority(cfg, device)) if nw else None,
    )
    writers: dict[int, _ShardWriter] = {}
    by_index = {p.index: p for p in parts}
    total = sum(p.end - p.start for p in parts)
    bar = tqdm(total=total, unit="img", disable=not show, dynamic_ncols=True, desc="encode")
    t0 = time.perf_counter()
    try:
        for batch in loader:
            if not result.first_batch_seconds:  # worker start-up + the first batch's decoding
                result.first_batch_seconds = time.perf_counter() - t0
            p = batch["part"]
            w = writers.get(p) or writers.setdefault(p, _ShardWriter(out, by_index[p], jid))
            for s in batch["skipped"]:
                w.skip(s)
            if batch["images"] is not None:
                results = encoder.encode(batch["images"], batch["meta"])
                latent_hw = None
                for meta, r in zip(batch["meta"], results):
                    if isinstance(r, str):
                        w.skip({"index": meta["index"], "key": meta["key"], "source": meta["source"], "reason": r})
                        continue
                    a = next(iter(r.values()))
                    latent_hw = a.shape[-2:]
                    w.add(_sample_meta(meta, cfg, f, latent_hw), r)
            if batch["last"]:
                summary = writers.pop(p).finish()
                result.parts_written += 1
                result.num_encoded += summary["num_encoded"]
                result.num_skipped += summary["num_skipped"]
            bar.update(batch["consumed"])
            bar.set_postfix(skipped=result.num_skipped + sum(len(x.skipped) for x in writers.values()), refresh=False)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()
    if writers:
        raise RuntimeError(f"internal error: parts {sorted(writers)} were never finished")


__all__ = [
    "EncodeConfig",
    "EncodeResult",
    "InputPlan",
    "JobMismatch",
    "RESAMPLE",
    "Part",
    "build_manifest",
    "compare_jobs",
    "encode_dataset",
    "job_record",
    "make_parts",
    "plan_input",
    "preprocess",
]
