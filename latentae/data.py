"""Training data: deterministic crops, and a loader whose position resumes exactly.

Two kinds of source (see ``latentae.imageio``):

* an image folder -> a map-style dataset fed by :class:`EpochBatchSampler`: each
  epoch is a seeded permutation of all images, dealt to ``world_size`` ranks
  (rank r takes permutation items r, r+W, ...; the tail that does not divide is left
  for that epoch so every rank runs the same number of steps, as DDP needs);
* WebDataset shards -> :class:`ShardStream`, an IterableDataset: each epoch a seeded
  shard order, shards dealt to ranks x DataLoader workers, samples shuffled in a
  seeded buffer.

Both streams are endless (epochs roll over inside a batch), so every batch is full
apart from skipped bad samples. Randomness (crop offset, flip) comes from a
``random.Random`` seeded by (seed, epoch, sample id) only, never from worker
scheduling, so a resumed run produces the very batches an uninterrupted run would.

Bad samples: the decoder raises ``BadImage``; the dataset turns it into a marker,
and :func:`collate` drops it, so the batch is one smaller and reports
``batch["skipped"] = [(name, reason), ...]``. Dropping (instead of substituting
another image) keeps every other sample exactly where it would have been.
"""

from __future__ import annotations

import copy
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from latentae.imageio import (
    IMAGE_EXTENSIONS,
    BadImage,
    RawSample,
    check_source,
    decode_image,
    expand_shards,
    folder_key,
    image_size,
    is_shard_source,
    iter_shard,
    iter_source,
    list_images,
    resize_uint8,
    shorter_side_to,
    split_for_worker,
    to_uint8_chw,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadImage",
    "RawSample",
    "DataConfig",
    "TrainLoader",
    "EpochBatchSampler",
    "ShardStream",
    "build_train_loader",
    "build_val_images",
    "check_source",
    "collate",
    "decode_image",
    "expand_shards",
    "hash_seed",
    "iter_source",
    "list_images",
    "sample_rng",
    "split_for_worker",
    "to_tensor",
    "train_transform",
    "val_transform",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataConfig:
    path: str = ""  # image folder, shard pattern or pipe: URL; required at train time
    val_path: str | None = None  # held-out images; None = hold out `num_val` images of `path`
    num_val: int = 8
    resolution: int = 256  # training crop size (pixels)
    resize_shorter: bool = True  # resize the shorter side to `resolution` before cropping
    random_crop: bool = True  # False = centre crop
    flip: bool = True  # random horizontal flip
    num_workers: int = 2  # DataLoader worker processes per rank (0 = in the main process)
    # Shards only: samples are shuffled in a seeded buffer of this many *undecoded*
    # files per worker (1 = shard order). Memory ~ buffer x file size x workers.
    shuffle_buffer: int = 256
    # With resize_shorter: decode big JPEGs at a reduced DCT scale (1/2..1/8, never
    # below `resolution`) before the bicubic resize. 2-8x less decoding for camera
    # photos; the crops differ from a full decode by noise (PSNR > 36 dB measured).
    fast_jpeg: bool = True

    def __post_init__(self):
        if self.resolution < 8:
            raise ValueError(f"data.resolution must be >= 8 pixels, got {self.resolution}")
        if self.num_val < 0:
            raise ValueError(f"data.num_val must be >= 0, got {self.num_val}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer must be >= 1 (1 = no shuffling), got {self.shuffle_buffer}")


# ----------------------------------------------------------------------------- transforms


def sample_rng(seed: int, epoch: int, sample_id: int | str) -> random.Random:
    """The private random stream of one sample in one epoch. String seeding hashes
    with SHA-512, so it is the same in every process (unlike ``hash()``)."""
    return random.Random(f"{seed}/{epoch}/{sample_id}")


def _resize_shorter(img: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> uint8 [3, H, W] with the shorter side = size (antialiased bicubic)."""
    w, h = shorter_side_to(*img.size, size)
    return resize_uint8(to_uint8_chw(img), (h, w))


def _check_crop(chw: torch.Tensor, size: int, name: str) -> None:
    h, w = chw.shape[1:]
    if min(h, w) < size:
        raise BadImage(name, f"image {w}x{h} is smaller than the {size}px crop (resize_shorter is off)")


def to_tensor(img: Image.Image | torch.Tensor) -> torch.Tensor:
    """8-bit RGB (PIL image or uint8 [3, H, W]) -> float tensor [3, H, W] in [-1, 1]."""
    chw = img if isinstance(img, torch.Tensor) else to_uint8_chw(img)
    return chw.to(torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1.0)


def _prepare(img: Image.Image, cfg: DataConfig, name: str) -> torch.Tensor:
    chw = _resize_shorter(img, cfg.resolution) if cfg.resize_shorter else to_uint8_chw(img)
    _check_crop(chw, cfg.resolution, name)
    return chw


def train_transform(img: Image.Image, cfg: DataConfig, rng: random.Random, name: str = "") -> torch.Tensor:
    """Resize (optional) -> random or centre crop -> optional flip -> [3, R, R] in [-1, 1].

    All randomness is drawn from ``rng`` (always two draws, so the flip does not
    depend on whether the crop had any freedom)."""
    r = cfg.resolution
    chw = _prepare(img, cfg, name)
    h, w = chw.shape[1:]
    u, v, f = rng.random(), rng.random(), rng.random()
    if cfg.random_crop:
        x, y = int(u * (w - r + 1)), int(v * (h - r + 1))
    else:
        x, y = (w - r) // 2, (h - r) // 2
    chw = chw[:, y : y + r, x : x + r]
    if cfg.flip and f < 0.5:
        chw = chw.flip(-1)
    return to_tensor(chw)


def val_transform(img: Image.Image, cfg: DataConfig, name: str = "") -> torch.Tensor:
    """Deterministic: resize (optional) -> centre crop -> [3, R, R] in [-1, 1]."""
    r = cfg.resolution
    chw = _prepare(img, cfg, name)
    h, w = chw.shape[1:]
    x, y = (w - r) // 2, (h - r) // 2
    return to_tensor(chw[:, y : y + r, x : x + r])


def _min_side(cfg: DataConfig) -> int | None:
    return cfg.resolution if cfg.resize_shorter and cfg.fast_jpeg else None


def _load(data: bytes | Path, name: str, key: str, cfg: DataConfig, rng: random.Random) -> dict:
    """Decode + transform one sample; a bad one becomes a marker for collate to drop."""
    try:
        img = decode_image(data, name, min_side=_min_side(cfg))
        return {"image": train_transform(img, cfg, rng, name), "key": key, "error": None}
    except BadImage as e:
        return {"image": None, "key": key, "error": (e.name, e.reason)}


def collate(items: list[dict]) -> dict:
    """Stack good samples; bad ones are dropped and listed in ``skipped``.

    ``image`` is [B', 3, R, R] with B' <= batch size (B' = 0 if all were bad).
    ``pos`` (internal) is the stream position after the last item.
    """
    good = [it for it in items if it["image"] is not None]
    if good:
        images = torch.stack([it["image"] for it in good])
    else:
        images = torch.empty(0)
    batch = {
        "image": images,
        "key": [it["key"] for it in good],
        "skipped": [e for it in items for e in it.get("shard_errors", ())]
        + [it["error"] for it in items if it["image"] is None],
    }
    if "pos" in items[-1]:
        batch["pos"] = items[-1]["pos"]
    return batch


# ----------------------------------------------------------------------------- folders


class EpochBatchSampler:
    """Endless batches of ``(epoch, index)`` for one rank, starting at (epoch, offset).

    Epoch e: a permutation of range(n) seeded by (seed, e), truncated to a multiple
    of ``world_size`` and dealt round-robin, so every rank gets ``per_rank`` samples.
    ``offset`` counts samples this rank already consumed in ``epoch``. Batches run
    across epoch boundaries, so all are full.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, rank: int, world_size: int, epoch: int = 0, offset: int = 0):
        if n < world_size:
            raise ValueError(f"{n} training images cannot be split across {world_size} ranks")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.per_rank = n // world_size
        if not 0 <= offset <= self.per_rank:
            raise ValueError(f"offset {offset} out of range for an epoch of {self.per_rank} samples per rank")
        self.epoch, self.offset = epoch, offset

    def epoch_indices(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(hash_seed(self.seed, epoch))
        perm = torch.randperm(self.n, generator=g)[: self.per_rank * self.world_size]
        return perm[self.rank :: self.world_size].tolist()

    def position_after(self, samples: int) -> tuple[int, int]:
        """(epoch, offset) after consuming ``samples`` more from the start position."""
        total = self.offset + samples
        return self.epoch + total // self.per_rank, total % self.per_rank

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, offset = self.epoch, self.offset
        batch: list[tuple[int, int]] = []
        while True:
            for idx in self.epoch_indices(epoch)[offset:]:
                batch.append((epoch, idx))
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
            epoch, offset = epoch + 1, 0


def hash_seed(*parts: int | str) -> int:
    """A 63-bit seed from several values, stable across processes and runs."""
    return random.Random("/".join(map(str, parts))).getrandbits(63)


class FolderDataset(Dataset):
    """Map-style: ``dataset[(epoch, index)]`` -> sample dict (see :func:`collate`)."""

    def __init__(self, files: list[Path], root: str, cfg: DataConfig, seed: int):
        # One numpy string array, not a list of Path objects: forked workers touching
        # millions of Python objects would copy them page by page (refcounts), growing
        # every worker's memory by the size of the list.
        self.files = np.array([str(f) for f in files])
        self.root, self.cfg, self.seed = root, cfg, seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        epoch, idx = item
        f = Path(str(self.files[idx]))
        return _load(f, str(f), folder_key(self.root, f), self.cfg, sample_rng(self.seed, epoch, idx))


def _spread(n_total: int, n: int) -> list[int]:
    """``n`` evenly spaced indices of range(n_total): a fixed, seed-free pick that
    covers every sub-folder of a sorted file list."""
    n = min(n, n_total)
    return [i * n_total // n for i in range(n)] if n else []


# ----------------------------------------------------------------------------- shards


def _buffer_shuffle(items: Iterator[RawSample], size: int, rng: random.Random) -> Iterator[RawSample]:
    """Seeded shuffle through a buffer of ``size`` items (deterministic for a given input order)."""
    if size <= 1:
        yield from items
        return
    buf: list[RawSample] = []
    for it in items:
        if len(buf) < size:
            buf.append(it)
            continue
        j = rng.randrange(size)
        buf[j], it = it, buf[j]
        yield it
    rng.shuffle(buf)
    yield from buf


class ShardStream(IterableDataset):
    """Endless stream of decoded samples from WebDataset shards, for one rank.

    Splitting: there are S = world_size x max(num_workers, 1) *slots*; slot
    ``rank * W + logical_worker`` reads every S-th shard of the epoch's seeded shard
    order. This needs #shards >= S; with fewer shards we fall back to splitting by
    sample (every slot reads all shards and keeps every S-th sample), which is
    exact too but reads S times the data; a warning says so.

    Position: each slot keeps (epoch, offset) = samples it already emitted in that
    epoch; resuming skips ``offset`` samples *undecoded* (the raw bytes still go
    through the shuffle buffer, which is what keeps the order identical).
    ``rotation`` maps DataLoader worker w to logical worker (w + rotation) % W, so a
    resumed loader (whose worker 0 always runs first) continues the round-robin
    where the old one stopped.
    """

    def __init__(
        self,
        urls: list[str],
        cfg: DataConfig,
        *,
        seed: int,
        rank: int,
        world_size: int,
        positions: list[tuple[int, int]],
        rotation: int = 0,
        exclude: frozenset[str] = frozenset(),
    ):
        self.urls, self.cfg, self.seed = urls, cfg, seed
        self.rank, self.world_size = rank, world_size
        self.workers = max(cfg.num_workers, 1)
        if len(positions) != self.workers:
            raise ValueError(f"expected {self.workers} worker positions, got {len(positions)}")
        self.positions, self.rotation = positions, rotation
        self.exclude = exclude  # sources (url:member) held out for validation
        self.slots = world_size * self.workers
        self.by_shard = len(urls) >= self.slots

    def epoch_raw(self, epoch: int, slot: int, on_error: Callable[[str, str], None]) -> Iterator[RawSample]:
        """The undecoded samples of one slot in one epoch, in final (shuffled) order."""
        order = list(self.urls)
        random.Random(hash_seed(self.seed, "shards", epoch)).shuffle(order)
        if self.by_shard:
            raw = (s for u in order[slot :: self.slots] for s in iter_shard(u, on_error))
        else:
            every = (s for u in order for s in iter_shard(u, on_error))
            raw = (s for i, s in enumerate(every) if i % self.slots == slot)
        raw = (s for s in raw if s.source not in self.exclude)
        return _buffer_shuffle(raw, self.cfg.shuffle_buffer, random.Random(hash_seed(self.seed, "buffer", epoch, slot)))

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        logical = (physical + self.rotation) % self.workers
        slot = self.rank * self.workers + logical
        epoch, skip = self.positions[logical]
        # Whole-shard problems (unreadable, cut short, command failed) have no sample
        # of their own: they ride along with the next sample into batch["skipped"].
        shard_errors: list[tuple[str, str]] = []
        report = lambda name, reason: shard_errors.append((name, reason))  # noqa: E731
        while True:
            n = 0
            for n, raw in enumerate(self.epoch_raw(epoch, slot, report), start=1):
                if n <= skip:
                    shard_errors.clear()  # reported by the run that consumed them
                    continue  # consumed before the resume: not decoded
                rng = sample_rng(self.seed, epoch, raw.source)
                item = _load(raw.data, raw.source, raw.key, self.cfg, rng)
                item["pos"] = (logical, epoch, n)
                item["shard_errors"], shard_errors = shard_errors, []
                yield item
            if n == 0:
                why = "; ".join(f"{a}: {b}" for a, b in shard_errors[:3]) or "no image members, or all held out for validation"
                raise RuntimeError(
                    f"rank {self.rank} worker {logical}: epoch {epoch} of {len(self.urls)} shards gave no image "
                    f"sample ({why})"
                )
            epoch, skip = epoch + 1, 0


# ----------------------------------------------------------------------------- loader


class TrainLoader:
    """Endless iterable of batches ``{"image": [B,3,R,R] in [-1,1], "key": [...],
    "skipped": [(name, reason), ...]}``; B may be smaller than the batch size when
    samples were skipped. ``state_dict()`` is the position after the last batch
    *yielded* (never what workers prefetched); passing it as ``state=`` to
    :func:`build_train_loader` resumes with exactly the batches that come next.
    Iterating again continues from ``state_dict()`` (fresh workers).
    """

    # Give up when this many batches in a row contained no usable image.
    MAX_EMPTY_BATCHES = 100

    def __init__(self, kind: str, dataset: Dataset, state: dict, *, batch_size: int, num_workers: int, rank: int):
        self.kind, self.dataset, self.batch_size = kind, dataset, batch_size
        self.num_workers, self.rank = num_workers, rank
        self._state = copy.deepcopy(state)  # never alias the caller's dict
        self._sampler: EpochBatchSampler | None = None

    def state_dict(self) -> dict:
        """JSON-able position after the last yielded batch (plus the layout it needs)."""
        return {k: ([list(p) for p in v] if k == "workers" else v) for k, v in self._state.items()}

    def _make_loader(self) -> DataLoader:
        # A fresh DataLoader (fresh workers) per __iter__, built from self._state:
        # simpler than persistent workers and exact, since all position lives here.
        common = dict(num_workers=self.num_workers, collate_fn=collate, pin_memory=torch.cuda.is_available())
        s = self._state
        if self.kind == "folder":
            self._sampler = EpochBatchSampler(
                len(self.dataset), self.batch_size, seed=s["seed"], rank=self.rank,
                world_size=s["world_size"], epoch=s["epoch"], offset=s["offset"],
            )  # fmt: skip
            return DataLoader(self.dataset, batch_sampler=self._sampler, **common)
        self.dataset.positions = [tuple(p) for p in s["workers"]]
        self.dataset.rotation = s["next_worker"]
        return DataLoader(self.dataset, batch_size=self.batch_size, **common)

    def __iter__(self) -> Iterator[dict]:
        loader = self._make_loader()
        received = 0  # batches taken from the DataLoader (prefetched ones not counted)
        pending: list[tuple[str, str]] = []  # skips of batches that had no good image
        empty = 0
        for batch in loader:
            received += 1
            self._advance(batch, received)
            pending.extend(batch["skipped"])
            if len(batch["key"]) == 0:
                # Nothing to train on: fold its report into the next batch.
                empty += 1
                if empty >= self.MAX_EMPTY_BATCHES:
                    names = "; ".join(f"{n}: {r}" for n, r in pending[-3:])
                    raise RuntimeError(f"{empty} batches in a row had no usable image; last skipped: {names}")
                continue
            empty = 0
            out = {"image": batch["image"], "key": batch["key"], "skipped": pending}
            pending = []
            yield out

    def _advance(self, batch: dict, received: int) -> None:
        s = self._state
        if self.kind == "folder":
            s["epoch"], s["offset"] = self._sampler.position_after(received * self.batch_size)
        else:
            logical, epoch, offset = batch["pos"]
            s["workers"][logical] = [epoch, offset]
            s["next_worker"] = (logical + 1) % max(self.num_workers, 1)


def _probe_sizes(datas: list[tuple[bytes | Path, str]]) -> list[tuple[str, tuple[int, int]]]:
    out = []
    for data, name in datas:
        try:
            out.append((name, image_size(data, name)))
        except (BadImage, OSError):
            continue
    return out


def _check_crop_fits(cfg: DataConfig, probes: list[tuple[str, tuple[int, int]]], where: str) -> None:
    """With resize_shorter off, refuse a crop larger than every probed image (a
    start-up error beats an endless stream of skips); smaller images mixed with
    big enough ones are skipped one by one at run time and reported."""
    if not probes:
        return  # nothing readable among the probed: the run reports each bad file
    name, (w, h) = max(probes, key=lambda p: min(p[1]))
    if min(w, h) < cfg.resolution:
        raise ValueError(
            f"data.resolution={cfg.resolution} is larger than every image probed in {where} "
            f"({len(probes)} probed; the largest shorter side is {min(w, h)} px, {name} {w}x{h}) and "
            "data.resize_shorter is false: lower data.resolution or set data.resize_shorter=true"
        )


PROBE_IMAGES = 64


def _shard_holdout(urls: list[str], cfg: DataConfig) -> list[RawSample]:
    """Shards without val_path: the first ``num_val`` image samples of the first shard
    (in pattern order) are held out for validation and never trained on."""
    if cfg.val_path is not None or cfg.num_val == 0:
        return []
    out = []
    for s in iter_shard(urls[0]):
        out.append(s)
        if len(out) == cfg.num_val:
            break
    return out


def _folder_split(files: list[Path], cfg: DataConfig) -> tuple[list[Path], list[Path]]:
    """(train, val) files. Without val_path, ``num_val`` evenly spread files are held out."""
    if cfg.val_path is not None or cfg.num_val == 0:
        return files, []
    if len(files) <= cfg.num_val:
        raise ValueError(
            f"{cfg.path} has {len(files)} images, not enough to hold out data.num_val={cfg.num_val} for "
            "validation and train on the rest: add images, lower data.num_val or set data.val_path"
        )
    held = set(_spread(len(files), cfg.num_val))
    return [f for i, f in enumerate(files) if i not in held], [files[i] for i in sorted(held)]


def build_train_loader(
    cfg: DataConfig,
    batch_size: int,
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    state: dict | None = None,
) -> TrainLoader:
    """The training loader for ``cfg.path`` (see :class:`TrainLoader`).

    Checks at start-up, with messages naming the problem: missing path / shards,
    no images, fewer images than ranks, crop larger than every image (only when
    resize_shorter is off), a resume ``state`` from a different layout.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    found = check_source(cfg.path)
    if is_shard_source(cfg.path):
        urls = [str(u) for u in found]
        held = _shard_holdout(urls, cfg)
        held_sources = {h.source for h in held}
        # Read the first image(s), stopping there: proves the shards hold images at
        # all, and (resize_shorter off) gives sizes for the crop check.
        wanted = 1 if cfg.resize_shorter else PROBE_IMAGES
        errors: list[tuple[str, str]] = []
        probes = []
        for s in iter_source(cfg.path, on_error=lambda name, reason: errors.append((name, reason))):
            if s.source not in held_sources:
                probes.append((s.data, s.source))
            if len(probes) >= wanted:
                break
        for name, reason in errors:
            log.warning("shard problem: %s: %s", name, reason)
        if not probes:
            why = "; ".join(f"{a}: {b}" for a, b in errors[:3])
            raise ValueError(
                f"no image samples found in the {len(urls)} shard(s) of {cfg.path}"
                + (f" beyond the {len(held)} held out for validation" if held else "")
                + f" (image members have extensions {', '.join(IMAGE_EXTENSIONS)})"
                + (f"; errors: {why}" if why else "")
            )
        if not cfg.resize_shorter:
            _check_crop_fits(cfg, _probe_sizes(probes), cfg.path)
        workers = max(cfg.num_workers, 1)
        if len(urls) < world_size * workers:
            log.warning(
                "%d shards < world_size %d x workers %d: splitting by sample instead (each worker reads every "
                "shard); write more shards for full read speed",
                len(urls), world_size, workers,
            )  # fmt: skip
        # Every rank (and worker) has its own position in its own shards: the state
        # is per rank, so the rank is part of it.
        layout = {
            "kind": "shards", "seed": seed, "rank": rank, "world_size": world_size, "num_workers": cfg.num_workers,
            "batch_size": batch_size, "num_shards": len(urls),
        }  # fmt: skip
        fresh = {**layout, "workers": [[0, 0] for _ in range(workers)], "next_worker": 0}
        st = _resume(state, layout, fresh)
        dataset = ShardStream(
            urls, cfg, seed=seed, rank=rank, world_size=world_size,
            positions=[tuple(p) for p in st["workers"]], rotation=st["next_worker"],
            exclude=frozenset(h.source for h in held),
        )  # fmt: skip
        return TrainLoader("shards", dataset, st, batch_size=batch_size, num_workers=cfg.num_workers, rank=rank)

    files, _ = _folder_split([Path(f) for f in found], cfg)
    if not cfg.resize_shorter:
        _check_crop_fits(cfg, _probe_sizes([(files[i], str(files[i])) for i in _spread(len(files), PROBE_IMAGES)]), cfg.path)
    if len(files) < world_size:
        raise ValueError(f"{cfg.path}: {len(files)} training images cannot be split across {world_size} ranks")
    # batch_size is not part of a folder layout: the offset counts samples, not batches.
    layout = {"kind": "folder", "seed": seed, "world_size": world_size, "num_samples": len(files)}
    st = _resume(state, layout, {**layout, "epoch": 0, "offset": 0})
    dataset = FolderDataset(files, cfg.path, cfg, seed)
    return TrainLoader("folder", dataset, st, batch_size=batch_size, num_workers=cfg.num_workers, rank=rank)


def _resume(state: dict | None, layout: dict, fresh: dict) -> dict:
    """Validate a saved loader state against the current layout; exact resume needs
    the same data, seed and split, so any difference is an error, not a guess."""
    if state is None:
        return fresh
    diffs = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in layout.items() if state.get(k) != v]
    if diffs:
        raise ValueError(
            "cannot resume the data position exactly, the data layout changed (" + "; ".join(diffs) + "). "
            "Restore the old setting, or start the data stream afresh by not passing the saved loader state."
        )
    missing = [k for k in fresh if k not in state]
    if missing:
        raise ValueError(f"loader state is missing {missing}; got keys {sorted(state)}")
    return {k: state[k] for k in fresh}


# ----------------------------------------------------------------------------- validation


def build_val_images(cfg: DataConfig, n: int) -> torch.Tensor:
    """``n`` fixed validation images, centre-cropped: [n, 3, R, R] in [-1, 1].

    From ``cfg.val_path`` (n evenly spread images of a folder, or the first n of a
    shard set) or, without it, from the images held out of ``cfg.path`` (which
    the training loader never uses). Bad images are skipped with a warning, so
    fewer than ``n`` may come back (warned); none at all is an error.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    r = cfg.resolution
    if n == 0:
        return torch.empty(0, 3, r, r)
    src = cfg.val_path if cfg.val_path is not None else cfg.path
    found = check_source(src)
    if cfg.val_path is None and cfg.num_val == 0:
        raise ValueError("no validation images: data.num_val is 0 and data.val_path is unset")
    if is_shard_source(src):
        if cfg.val_path is None:
            candidates = [(s.data, s.source) for s in _shard_holdout([str(u) for u in found], cfg)]
        else:
            candidates = []
            for s in iter_source(src):
                candidates.append((s.data, s.source))
                if len(candidates) >= 4 * n:  # room for bad ones
                    break
    else:
        files = [Path(f) for f in found]
        if cfg.val_path is None:
            files = _folder_split(files, cfg)[1]
        order = _spread(len(files), n)
        picked = set(order)
        rest = [i for i in range(len(files)) if i not in picked]
        candidates = [(files[i], str(files[i])) for i in order + rest[: 3 * n]]
    images, skipped = [], []
    for data, name in candidates:
        try:
            img = decode_image(data, name, min_side=_min_side(cfg))
            images.append(val_transform(img, cfg, name))
        except BadImage as e:
            skipped.append(e)
            log.warning("validation image skipped: %s", e)
        if len(images) == n:
            break
    if not images:
        why = "; ".join(str(e) for e in skipped[:3]) or "no images"
        raise ValueError(f"no usable validation image in {src}: {why}")
    if len(images) < n:
        log.warning("asked for %d validation images, found %d usable in %s", n, len(images), src)
    return torch.stack(images)
