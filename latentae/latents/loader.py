"""Feeding stored latents to a diffusion model: shuffled, split evenly over ranks, resumable.

``latent_loader(folder, batch_size, rank=r, world_size=w, num_workers=k)`` returns a
:class:`LatentLoader`; each pass over it is one epoch of this rank's share, in the order
:mod:`latentae.latents.order` plans (seeded shard order + shuffle buffer by default). The
loader counts what it has handed out, so ``state_dict()`` saved with a training checkpoint
and ``load_state_dict()`` after a restart continue the epoch at the next unseen batch, the
same batches an uninterrupted run would have given. An epoch that runs to its end moves the
loader to the next epoch (``set_epoch`` sets one explicitly).

Each item is ``z = mean + std * eps`` drawn with a generator seeded by (seed, epoch, sample
index), so draws depend on nothing else (not on workers, ranks or resumption), then
normalised with the VAE's factors (:class:`~latentae.latents.norm.LatentNorm`, from the
manifest unless given).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from latentae.latents.format import LatentFormatError, build_sample, count_shard_latents, iter_shard_raw, resolve_shards
from latentae.latents.norm import LatentNorm, manifest_norm
from latentae.latents.order import RankPlan, rank_plan, worker_slots


def sample_seed(seed: int, epoch: int, index: int, flipped: bool = False) -> int:
    """63-bit seed of one sample's draw: depends on nothing but these values."""
    return random.Random(f"latents/{seed}/{epoch}/{index}/{int(flipped)}").getrandbits(63)


class LatentDataset(IterableDataset):
    """Stored latents -> dicts ready for a diffusion model: one rank's share of an epoch.

    Yields ``{"latent": FloatTensor[C, h, w] (normalised), "key": str, "index": int,
    "flipped": bool, "meta": dict}``.

    * ``sample=True`` draws from the stored distribution (seeded by seed, epoch, index);
      ``False`` returns the mean (or the stored point).
    * ``flip``: "none", "random" (the flipped latents with probability 1/2, seeded like
      the draw; needs shards encoded with ``--flip``) or "both" (every sample twice).
    * ``norm``: None = the VAE factors recorded in the manifest; ``normalize=False`` = raw.
    * ``shuffle`` (default True): seeded shard order per epoch, the rank's share read as
      ``interleave`` lanes side by side (so that sorted shards mix), and a shuffle buffer
      of ``buffer_size`` items (memory: about that many stored samples per rank). False:
      the stored order. Same (seed, epoch, world_size) -> same items in the same order.
    * ``rank`` / ``world_size``: every rank gets the same number of items; ``uneven``
      "drop" (default: the last N mod W positions of the epoch are left out) or "wrap"
      (some samples are seen twice). Fewer samples than ranks with "drop" is an error.
    * ``batch_size`` / ``drop_last``: how the rank's items are dealt to DataLoader
      workers (whole batches, in the order the DataLoader collects them) and whether a
      last partial batch is dropped; :func:`latent_loader` sets them.

    Iterating yields the epoch from item ``self.start`` (0 unless resuming).
    """

    def __init__(
        self,
        source: str | Path | Sequence[str | Path],
        *,
        sample: bool = True,
        seed: int = 0,
        normalize: bool = True,
        norm: LatentNorm | None = None,
        per_channel: bool = False,
        flip: Literal["none", "random", "both"] = "none",
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        buffer_size: int = 1000,
        interleave: int = 16,
        uneven: Literal["drop", "wrap"] = "drop",
        batch_size: int | None = None,
        drop_last: bool = False,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if flip not in ("none", "random", "both"):
            raise ValueError(f"flip must be 'none', 'random' or 'both', got {flip!r}")
        if uneven not in ("drop", "wrap"):
            raise ValueError(f"uneven must be 'drop' or 'wrap', got {uneven!r}")
        if buffer_size < 1 or interleave < 1:
            raise ValueError(f"buffer_size and interleave must be >= 1, got {buffer_size} and {interleave}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        self.shards, counts, self.manifest = resolve_shards(source)
        # Without a manifest the sizes come from the shards' tar headers (no data is read).
        self.counts = counts if counts is not None else [count_shard_latents(p) for p in self.shards]
        if normalize and norm is None:
            if self.manifest is None:
                raise ValueError(
                    "normalize=True needs the VAE factors: read a latents folder (with manifest.json), "
                    "or pass norm=LatentNorm(scaling_factor=..., shift_factor=...), or normalize=False"
                )
            norm = manifest_norm(self.manifest, per_channel)
        if flip != "none" and self.manifest is not None and not self.manifest["job"]["storage"]["flip"]:
            raise ValueError(f"flip={flip!r} needs latents encoded with --flip; this folder has none")
        total = sum(self.counts)
        if total == 0:
            raise ValueError(f"no latents in {source}")
        if uneven == "drop" and total < world_size:
            raise ValueError(
                f"{total} latents cannot give each of {world_size} ranks one with uneven='drop'; use uneven='wrap'"
            )
        self.norm = norm if normalize else None
        self.sample, self.seed, self.flip = sample, seed, flip
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.buffer_size, self.interleave, self.uneven = shuffle, buffer_size, interleave, uneven
        self.batch_size, self.drop_last = batch_size, drop_last
        self.epoch = 0
        self.start = 0  # items of this epoch already consumed (resume)
        self.peak_held = 0  # most samples held at once by the last in-process iteration (a memory check)
        self._plan: tuple[int, RankPlan] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (its shard order, shuffle and draws), from its beginning; the epoch
        the dataset is already in keeps its position (a resumed loop may call it as usual)."""
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def plan(self) -> RankPlan:
        """This rank's plan of the current epoch (computed once per epoch: O(items) of Python)."""
        if self._plan is None or self._plan[0] != self.epoch:
            self._plan = (self.epoch, self._make_plan())
        return self._plan[1]

    def _make_plan(self) -> RankPlan:
        return rank_plan(
            self.counts,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            shuffle=self.shuffle,
            buffer_size=self.buffer_size,
            uneven=self.uneven,
            interleave=self.interleave,
            copies=2 if self.flip == "both" else 1,
            batch_size=self.batch_size,
            drop_last=self.drop_last,
        )

    def __len__(self) -> int:
        """Items this rank yields in a whole epoch (the same on every rank)."""
        return len(self.plan().out)

    def fingerprint(self) -> str:
        """Identifies the shard list and sizes (a resumed run must read the same data)."""
        names = [Path(p).name for p in self.shards]
        return hashlib.sha256(json.dumps([names, self.counts]).encode()).hexdigest()[:16]

    def _read(self, plan: RankPlan, positions: list[int]) -> Iterator[tuple[int, str, str, dict[str, bytes]]]:
        """(span position, shard path, key, member bytes) for ``positions`` (increasing)."""
        j = 0
        while j < len(positions):
            k, shard, _ = plan.locate(positions[j])
            group: dict[int, int] = {}  # position in the shard -> span position
            last = -1
            while j < len(positions):
                kk, _, local = plan.locate(positions[j])
                if kk != k or local <= last:  # the next shard (or, wrapping, this one again)
                    break
                group[local], last = positions[j], local
                j += 1
            path, found = self.shards[shard], 0
            for local, key, members in iter_shard_raw(path, wanted=group.__contains__, stop_after=last):
                found += 1
                yield group[local], path, key, members
            if found < len(group):
                raise LatentFormatError(
                    f"{path} has fewer samples than the {self.counts[shard]} its manifest entry says "
                    f"(no sample at position {last}); was it changed after encoding?"
                )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        plan, begin = self.plan(), self.start
        info = get_worker_info()
        nw, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        slots = list(worker_slots(len(plan.out), begin, self.batch_size or 1, nw, wid))
        items = [plan.item(int(plan.out[t])) for t in slots]  # (span position, copy), in output order
        left: dict[int, int] = {}  # span position -> items still to emit from it
        for i, _ in items:
            left[i] = left.get(i, 0) + 1
        lanes: dict[int, list[int]] = {}
        for i in sorted(left):
            lanes.setdefault(plan.lane(i), []).append(i)
        readers = {k: self._read(plan, positions) for k, positions in lanes.items()}  # one open shard per lane
        held: dict[int, Any] = {}
        self.peak_held = 0
        for i, copy in items:
            while i not in held:  # read ahead in the sample's lane, up to the sample needed now
                pos, path, key, members = next(readers[plan.lane(i)])
                held[pos] = build_sample(path, key, members)
                self.peak_held = max(self.peak_held, len(held))
            s = held[i]
            left[i] -= 1
            if not left[i]:
                del held[i]
            yield self._item(s, flipped=self._flipped(s, copy))

    def _flipped(self, s, copy: int) -> bool:
        if self.flip == "both":
            return bool(copy)
        if self.flip == "random":
            return random.Random(sample_seed(self.seed, self.epoch, s.index, True)).random() < 0.5
        return False

    def _item(self, s, flipped: bool) -> dict[str, Any]:
        g = None
        if self.sample:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, s.index, flipped))
        z = s.draw(g, flipped)
        if self.norm is not None:
            z = self.norm.normalize(z)
        return {"latent": z, "key": s.key, "index": s.index, "flipped": flipped, "meta": s.meta}


def collate_latents(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack latents (all must have one size: bucket 'keep'-mode latents yourself or use
    batch_size=None); everything else becomes a list."""
    shapes = {tuple(it["latent"].shape) for it in items}
    if len(shapes) > 1:
        raise ValueError(
            f"cannot batch latents of different sizes {sorted(shapes)}: encode with a fixed size "
            "(--preprocess resize/crop) or read with batch_size=None"
        )
    return {
        "latent": torch.stack([it["latent"] for it in items]),
        "key": [it["key"] for it in items],
        "index": [it["index"] for it in items],
        "flipped": [it["flipped"] for it in items],
        "meta": [it["meta"] for it in items],
    }


class LatentLoader:
    """A DataLoader over a :class:`LatentDataset` that knows where it is in the epoch.

    ``for batch in loader`` runs the rest of the current epoch; when it runs to the end,
    the loader moves on to the next epoch. Breaking out of the loop and iterating again
    continues where it stopped. ``state_dict()`` / ``load_state_dict()`` carry that
    position across a restart (same seed, world size, batch size and shards required).
    ``set_epoch(e)`` selects an epoch from its start, except the epoch the loader is in.
    """

    def __init__(self, dataset: LatentDataset, batch_size: int | None, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int | None = None):
        self.dataset, self.batch_size = dataset, batch_size
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        """Batches in a whole epoch of this rank (the same on every rank)."""
        n = len(self.dataset)
        return n if self.batch_size is None else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        ds = self.dataset
        loader = DataLoader(
            ds,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_latents if self.batch_size is not None else None,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers else None,
            persistent_workers=False,  # workers must copy the dataset's epoch and position anew
        )
        for batch in loader:
            ds.start += len(batch["key"]) if self.batch_size is not None else 1
            yield batch
        ds.set_epoch(ds.epoch + 1)  # ran to its end: the next pass is the next epoch

    def state_dict(self) -> dict[str, Any]:
        ds = self.dataset
        return {
            "epoch": ds.epoch,
            "consumed": ds.start,
            "seed": ds.seed,
            "rank": ds.rank,
            "world_size": ds.world_size,
            "batch_size": self.batch_size,
            "shuffle": ds.shuffle,
            "buffer_size": ds.buffer_size,
            "interleave": ds.interleave,
            "data": ds.fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ds = self.dataset
        now = self.state_dict()
        diffs = [
            f"{k}: saved {state.get(k)!r}, now {now[k]!r}"
            for k in ("seed", "rank", "world_size", "batch_size", "shuffle", "buffer_size", "interleave", "data")
            if state.get(k) != now[k]
        ]
        if diffs:
            raise ValueError(
                "cannot resume the latent loader exactly: " + "; ".join(diffs)
                + " (the epoch's order depends on these; call set_epoch(epoch) to start an epoch instead)"
            )
        ds.epoch, ds.start = int(state["epoch"]), int(state["consumed"])


def latent_loader(
    source: str | Path | Sequence[str | Path],
    batch_size: int | None,
    *,
    num_workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    **dataset_kwargs: Any,
) -> LatentLoader:
    """A :class:`LatentLoader` (keyword arguments go to :class:`LatentDataset`) that
    stacks batches with :func:`collate_latents`."""
    ds = LatentDataset(source, batch_size=batch_size, drop_last=drop_last, **dataset_kwargs)
    return LatentLoader(ds, batch_size, num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor)
