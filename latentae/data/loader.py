"""The training loader: endless batches, and a position that resumes (exactly, or elastically).

A loader's ``state_dict()`` is the position after the last batch it *yielded*
(never what workers prefetched), plus the layout it depends on. Resuming:

* same layout (world size; for shards also workers, batch size, shards per worker,
  buffer): the very batches an uninterrupted run would produce, bit for bit;
* another layout, given EVERY old rank's state (``resume_states``): the stream goes
  on without repeating or skipping what was consumed where it can (a folder's epoch
  continues from the images used; shards finished in the epoch stay finished, open
  ones go on from their position), with a warning that the data order (not the
  weights) differs from an uninterrupted run;
* another dataset or seed: an error (nothing sensible to continue).
"""

from __future__ import annotations

import copy
import hashlib
import logging
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from latentae.data.config import DataConfig
from latentae.data.filelist import FileList
from latentae.data.folder import EpochBatchSampler, FolderDataset, elastic_folder_position, held_out, spread
from latentae.data.shards import ShardStream, elastic_shard_states, fresh_slot_state
from latentae.data.transforms import collate, min_shorter_side
from latentae.imageio import BadImage, image_size
from latentae.sources import (
    IMAGE_EXTENSIONS,
    RawSample,
    check_path,
    expand_shards,
    is_shard_source,
    iter_shard,
    no_images_error,
)

log = logging.getLogger(__name__)

PROBE_IMAGES = 64
SHARD_STATE_FORMAT = 2

# Layout keys that identify the data (a mismatch is an error) and those of the split
# (a mismatch means elastic resume).
IDENTITY = {"folder": ("kind", "seed", "num_samples", "files_digest"), "shards": ("kind", "format", "seed", "num_shards")}
SPLIT = {
    "folder": ("world_size",),
    "shards": ("world_size", "rank", "num_workers", "batch_size", "shards_per_worker", "shuffle_buffer"),
}


def _as_is(batch: dict) -> dict:
    return batch  # shard batches are collated in the worker that made them


class TrainLoader:
    """Endless iterable of batches ``{"image": [B,3,R,R] in [-1,1], "key": [...],
    "skipped": [(name, reason), ...]}``; B may be smaller than the batch size when
    samples were skipped. See the module docstring for ``state_dict()``. Iterating
    again continues from ``state_dict()`` (fresh workers). ``digest`` identifies the
    data (the folder's file list, or the shard URLs): ranks compare it."""

    MAX_EMPTY_BATCHES = 100  # give up when this many batches in a row had no usable image

    def __init__(self, kind: str, dataset: Dataset, state: dict, *, batch_size: int, num_workers: int, rank: int,
                 digest: str):  # fmt: skip
        self.kind, self.dataset, self.batch_size = kind, dataset, batch_size
        self.num_workers, self.rank, self.digest = num_workers, rank, digest
        self._state = copy.deepcopy(state)  # never alias the caller's dict
        self._sampler: EpochBatchSampler | None = None

    def state_dict(self) -> dict:
        """JSON-able position after the last yielded batch (plus the layout it needs)."""
        return copy.deepcopy(self._state)

    def _make_loader(self) -> DataLoader:
        # A fresh DataLoader (fresh workers) per __iter__, built from self._state:
        # simpler than persistent workers and exact, since all position lives here.
        common = dict(num_workers=self.num_workers, pin_memory=torch.cuda.is_available())
        s = self._state
        if self.kind == "folder":
            self._sampler = EpochBatchSampler(
                len(self.dataset), self.batch_size, seed=s["seed"], rank=self.rank, world_size=s["world_size"],
                epoch=s["epoch"], offset=s["offset"], start=s["start"],
            )  # fmt: skip
            return DataLoader(self.dataset, batch_sampler=self._sampler, collate_fn=collate, **common)
        self.dataset.states = copy.deepcopy(s["workers"])
        self.dataset.rotation = s["next_worker"]
        return DataLoader(self.dataset, batch_size=None, collate_fn=_as_is, **common)

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
            s["epoch"], s["offset"], s["start"] = self._sampler.position_after(received * self.batch_size)
        else:
            logical, slot_state = batch.pop("pos")
            s["workers"][logical] = slot_state
            s["next_worker"] = (logical + 1) % max(self.num_workers, 1)


# ----------------------------------------------------------------------------- start-up checks


def _probe_sizes(datas: list[tuple[bytes | Path, str]]) -> list[tuple[str, tuple[int, int]]]:
    out = []
    for data, name in datas:
        try:
            out.append((name, image_size(data, name)))
        except (BadImage, OSError):
            continue
    return out


def _check_sizes(cfg: DataConfig, probes: list[tuple[str, tuple[int, int]]], where: str) -> None:
    """Refuse (small_images=skip) or warn about (upscale, pad) a crop that needs more than
    every probed image has: a start-up error beats an endless stream of skips. Small
    images mixed with big enough ones are handled one by one at run time."""
    if not probes:
        return  # nothing readable among the probed: the run reports each bad file
    need = min_shorter_side(cfg)
    name, (w, h) = max(probes, key=lambda p: min(p[1]))
    if min(w, h) >= need:
        return
    what = (
        f"data.resolution={cfg.resolution} with data.crop={cfg.crop} needs a shorter side of {need} px, which is "
        f"larger than every image probed in {where} ({len(probes)} probed; the largest shorter side is "
        f"{min(w, h)} px, {name} {w}x{h})"
    )
    if cfg.small_images == "skip":
        raise ValueError(
            f"{what}, and data.small_images=skip: lower data.resolution or allow data.small_images=upscale or pad"
        )
    log.warning("%s: they will be %s (data.small_images=%s)", what,
                "upscaled" if cfg.small_images == "upscale" else "padded", cfg.small_images)  # fmt: skip


def shard_holdout(urls: list[str], cfg: DataConfig) -> list[RawSample]:
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


def open_file_list(path: str, file_list: FileList | str | Path | None) -> FileList:
    """The folder's file list: the given one (a stored list or its path), else listed now."""
    if isinstance(file_list, FileList):
        fl = file_list
    elif file_list is not None:
        fl = FileList.open(file_list)
    else:
        fl = FileList.scan(path)
    if len(fl) == 0:
        raise no_images_error(path)
    return fl


# ----------------------------------------------------------------------------- resume


def _check_identity(kind: str, saved: dict, layout: dict) -> None:
    missing = [k for k in IDENTITY[kind] if k not in saved and k in layout]
    if missing and saved.get("kind") == kind:
        raise ValueError(
            f"the saved loader state has no {missing}: it was written by an older latentae, whose data position "
            "cannot be restored. Start the data stream afresh by not passing the saved loader state."
        )
    diffs = [f"{k}: saved {saved.get(k)!r}, now {layout[k]!r}" for k in IDENTITY[kind] if saved.get(k) != layout[k]]
    if diffs:
        raise ValueError(
            "cannot resume the data position, the data changed (" + "; ".join(diffs) + "). Restore the old "
            "setting, or start the data stream afresh by not passing the saved loader state."
        )


def _exact(state: dict, layout: dict, fresh: dict) -> dict:
    """A saved state of this very layout (``state=``: no elastic fallback)."""
    diffs = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in layout.items() if state.get(k) != v]
    if diffs:
        raise ValueError(
            "cannot resume the data position exactly, the data layout changed (" + "; ".join(diffs) + "). "
            "Restore the old setting, pass every rank's state as resume_states= (elastic resume), or start "
            "the data stream afresh by not passing the saved loader state."
        )
    missing = [k for k in fresh if k not in state]
    if missing:
        raise ValueError(f"loader state is missing {missing}; got keys {sorted(state)}")
    return {k: copy.deepcopy(state[k]) for k in fresh}


def _resume(
    states: list[dict] | None, state: dict | None, layout: dict, fresh: dict, rank: int
) -> tuple[dict, list[dict] | None]:
    """(this rank's state, the old states when the layout changed: elastic) or (fresh, None)."""
    if state is not None:
        _check_identity(layout["kind"], state, layout)
        return _exact(state, layout, fresh), None
    if not states:
        return fresh, None
    kind = layout["kind"]
    for r, s in enumerate(states):
        _check_identity(kind, s, layout)
        if s.get("world_size") != len(states) or (kind == "shards" and s.get("rank") != r):
            raise ValueError(
                f"resume_states must hold every old rank's loader state in rank order: entry {r} is rank "
                f"{s.get('rank')} of {s.get('world_size')}, and {len(states)} were given"
            )
    mine = states[rank] if rank < len(states) else None
    if mine is not None and all(mine.get(k) == layout[k] for k in SPLIT[kind]):
        return _exact(mine, layout, fresh), None
    return fresh, states


def _warn_elastic(layout: dict, old: dict, note: str) -> None:
    was = ", ".join(f"{k} {old.get(k)}" for k in SPLIT[layout["kind"]] if k != "rank")
    now = ", ".join(f"{k} {layout[k]}" for k in SPLIT[layout["kind"]] if k != "rank")
    log.warning(
        "elastic data resume (saved with %s; now %s): the data order differs from an uninterrupted run "
        "(the model's state does not); %s", was, now, note,
    )  # fmt: skip


# ----------------------------------------------------------------------------- building


def build_train_loader(
    cfg: DataConfig,
    batch_size: int,
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    resume_states: list[dict] | None = None,
    state: dict | None = None,
    file_list: FileList | str | Path | None = None,
    shard_urls: list[str] | None = None,
) -> TrainLoader:
    """The training loader for ``cfg.path`` (see :class:`TrainLoader`).

    ``resume_states``: EVERY old rank's ``state_dict()``, in rank order (exact when the
    layout is the same, elastic otherwise: see the module docstring). ``state``: this
    rank's own saved state, exact resume only. ``file_list`` (folders): a stored
    :class:`FileList` (or its path) shared by all ranks; without it the folder is
    listed here. ``shard_urls`` (shards): ``expand_shards(cfg.path)`` when the caller
    has it already (not expanded and checked again).

    Checks at start-up, with messages naming the problem: missing path / shards, no
    images, fewer images than ranks, crop larger than every image (small_images=skip),
    a resume state of other data.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if state is not None and resume_states is not None:
        raise ValueError("pass either state= (this rank's) or resume_states= (every rank's), not both")
    check_path(cfg.path)
    if is_shard_source(cfg.path):
        return _shard_loader(cfg, batch_size, seed, rank, world_size, resume_states, state, shard_urls)
    files = open_file_list(cfg.path, file_list)
    held = held_out(len(files), cfg)
    dataset = FolderDataset(files, cfg.path, cfg, seed, held)
    probe = [dataset.relpath(i) for i in spread(len(dataset), PROBE_IMAGES)]
    _check_sizes(cfg, _probe_sizes([(Path(cfg.path) / p, str(Path(cfg.path) / p)) for p in probe]), cfg.path)
    if len(dataset) < world_size:
        raise ValueError(f"{cfg.path}: {len(dataset)} training images cannot be split across {world_size} ranks")
    # batch_size is not part of a folder layout: the offset counts samples, not batches.
    layout = {"kind": "folder", "seed": seed, "world_size": world_size, "num_samples": len(dataset),
              "files_digest": files.digest}  # fmt: skip
    fresh = {**layout, "epoch": 0, "offset": 0, "start": 0}
    st, old = _resume(resume_states, state, layout, fresh, rank)
    if old is not None:
        epoch, offset, start, note = elastic_folder_position(old, len(dataset))
        st = {**fresh, "epoch": epoch, "offset": offset, "start": start}
        _warn_elastic(layout, old[0], note)
    return TrainLoader("folder", dataset, st, batch_size=batch_size, num_workers=cfg.num_workers, rank=rank,
                       digest=files.digest)  # fmt: skip


def _shard_loader(cfg: DataConfig, batch_size: int, seed: int, rank: int, world_size: int,
                  resume_states: list[dict] | None, state: dict | None,
                  urls: list[str] | None) -> TrainLoader:  # fmt: skip
    urls = [str(u) for u in (expand_shards(cfg.path) if urls is None else urls)]
    held = shard_holdout(urls, cfg)
    held_sources = {h.source for h in held}
    # Read the first image(s), stopping there: proves the shards hold images at all,
    # and (small_images=skip) gives sizes for the crop check.
    wanted = PROBE_IMAGES if cfg.small_images == "skip" else 1
    errors: list[tuple[str, str]] = []
    probes = []
    note = lambda name, reason: errors.append((name, reason))  # noqa: E731
    for s in (s for url in urls for s in iter_shard(url, note)):  # the expanded list: not checked again
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
    if cfg.small_images == "skip":
        _check_sizes(cfg, _probe_sizes(probes), cfg.path)
    workers = max(cfg.num_workers, 1)
    if len(urls) < world_size * workers:
        log.warning(
            "%d shards < world_size %d x workers %d: splitting by sample instead (each worker reads every "
            "shard); write more shards for full read speed",
            len(urls), world_size, workers,
        )  # fmt: skip
    # Every rank (and worker) has its own position in its own shards: the state is per
    # rank, so the rank is part of it.
    layout = {
        "kind": "shards", "format": SHARD_STATE_FORMAT, "seed": seed, "rank": rank, "world_size": world_size,
        "num_workers": cfg.num_workers, "batch_size": batch_size, "num_shards": len(urls),
        "shards_per_worker": cfg.shards_per_worker, "shuffle_buffer": cfg.shuffle_buffer,
    }  # fmt: skip
    fresh = {**layout, "workers": [fresh_slot_state() for _ in range(workers)], "next_worker": 0}
    st, old = _resume(resume_states, state, layout, fresh, rank)
    if old is not None:
        slot_states, note = elastic_shard_states(old, n_shards=len(urls), seed=seed, rank=rank, world_size=world_size,
                                                 workers=workers)  # fmt: skip
        st = {**fresh, "workers": slot_states}
        _warn_elastic(layout, old[0], note)
    dataset = ShardStream(
        urls, cfg, seed=seed, rank=rank, world_size=world_size, batch_size=batch_size, states=st["workers"],
        rotation=st["next_worker"], exclude=frozenset(held_sources),
    )  # fmt: skip
    return TrainLoader("shards", dataset, st, batch_size=batch_size, num_workers=cfg.num_workers, rank=rank,
                       digest=shard_digest(urls))  # fmt: skip


def shard_digest(urls: list[str]) -> str:
    """What identifies a shard set (``TrainLoader.digest`` for shards): SHA-256 of the expanded URLs."""
    return hashlib.sha256("\n".join(urls).encode()).hexdigest()

