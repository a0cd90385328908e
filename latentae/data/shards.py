"""WebDataset shards: per-worker streams whose position resumes without re-reading.

Splitting: there are S = world_size x max(num_workers, 1) *slots*; slot
``rank * workers + worker`` reads every S-th shard of the epoch's seeded shard order
(reshuffled every epoch). With fewer shards than slots every slot reads all shards
and keeps every S-th sample: exact too, but S times the reading (warned).

Mixing, per slot: ``shards_per_worker`` shards are open at once and each sample is
read from a randomly chosen one (a finished shard is replaced by the next), then
passes a seeded shuffle buffer of ``shuffle_buffer`` *undecoded* samples. An epoch
drains its buffer before the next begins.

Position (:meth:`SlotStream.state`, JSON-able, taken after every batch): the epoch,
how many of its shards were opened, each open shard's position (next sample number,
the byte offset where it goes on, the last key), what the buffer holds (shard,
sample number, byte offset, key: not the bytes) and how many random draws were made
(the draws are counter-based, so a count restores them). Resuming re-opens only the
open shards and those holding buffered samples: a local uncompressed tar seeks to the
saved byte offsets; a ``pipe:`` or compressed shard is read again up to the position
(in one pass with its buffered samples). Finished shards are never opened again.
"""

from __future__ import annotations

import random
from typing import Callable, Iterator

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from latentae.data.config import DataConfig
from latentae.data.transforms import collate, hash_seed, load_sample, sample_rng
from latentae.sources import RawSample, ShardPos, can_seek, iter_shard

# A unit of shard work: [shard index, fetch, pos]. ``fetch``: [[ordinal, offset, key], ...]
# samples to read first (ascending; earlier in the shard than ``pos``); ``pos``:
# [ordinal, offset, key] to read on from to the shard's end, or None (fetch only).
Unit = list
Report = Callable[[str, str], None]


def epoch_shard_order(n_shards: int, seed: int, epoch: int) -> list[int]:
    """Shard indices of ``epoch`` in their seeded order."""
    order = list(range(n_shards))
    random.Random(hash_seed(seed, "shards", epoch)).shuffle(order)
    return order


def default_plan(n_shards: int, seed: int, epoch: int, slot: int, slots: int,
                 order: list[int] | None = None) -> list[Unit]:
    """The whole shards of one slot in one epoch (all of them when splitting by sample).
    ``order``: ``epoch_shard_order(n_shards, seed, epoch)`` when the caller has it already."""
    if order is None:
        order = epoch_shard_order(n_shards, seed, epoch)
    mine = order[slot::slots] if n_shards >= slots else order
    return [[i, [], [0, 0, None]] for i in mine]


def fresh_slot_state(epoch: int = 0, plan: list[Unit] | None = None) -> dict:
    return {"epoch": epoch, "plan": plan, "next_unit": 0, "open": [], "buffer": [], "mix": 0, "shuffle": 0,
            "read": 0, "emitted": 0}  # fmt: skip


class _Draws:
    """Uniform integers from a counter-based stream: its whole state is (seed, count)."""

    def __init__(self, seed: int, count: int = 0):
        self.bits = np.random.PCG64(seed)
        if count:
            self.bits.advance(count)  # O(log count), exactly as if `count` raw draws were made
        self.count = count

    def below(self, k: int) -> int:
        self.count += 1
        return ((int(self.bits.random_raw()) >> 11) * k) >> 53  # floor(u * k), u of 53 bits


class _Cursor:
    """Reads one unit: first its ``fetch`` samples, then the shard from ``pos`` on."""

    def __init__(self, url: str, unit: Unit, on_error: Report):
        self.url, self.shard = url, unit[0]
        self.fetch = [list(f) for f in unit[1]]
        self.pos = list(unit[2]) if unit[2] is not None else None
        self.on_error = on_error
        self._it: Iterator[RawSample] | None = None  # the sequential reader (pos, or everything without seek)
        self._seekable: bool | None = None

    def state(self) -> Unit:
        return [self.shard, [list(f) for f in self.fetch], list(self.pos) if self.pos is not None else None]

    def get(self, ordinal: int, offset: int, key: str) -> RawSample | None:
        """Sample number ``ordinal`` of the shard (calls come in ascending order)."""
        if self._seekable is None:
            self._seekable = can_seek(self.url)
        s: RawSample | None = None
        if self._seekable:
            it = iter_shard(self.url, self.on_error, start=ShardPos(ordinal, offset, None))
            s = next(it, None)
            it.close()
        else:  # one forward pass serves every fetch and then the stream
            if self._it is None:
                self._it = iter_shard(self.url, self.on_error, start=ShardPos(ordinal))
            for s in self._it:
                if s.ordinal >= ordinal:
                    break
        if s is None or s.ordinal != ordinal:
            self.on_error(self.url, f"cannot read sample #{ordinal} ({key}) again: the shard ends before it")
            return None
        if s.key != key:
            raise RuntimeError(
                f"{self.url} changed since the loader position was saved: its sample #{ordinal} is {s.key!r}, "
                f"not {key!r}. Restore the shard, or start the data stream afresh (no saved loader state)."
            )
        return s

    def next(self) -> RawSample | None:
        while self.fetch:
            s = self.get(*self.fetch.pop(0))
            if s is not None:
                return s
        if self.pos is None:
            return None
        if self._it is None:
            self._it = iter_shard(self.url, self.on_error, start=ShardPos(*self.pos))
        for s in self._it:
            if s.ordinal >= self.pos[0]:
                self.pos = [s.ordinal + 1, s.end, s.key]
                return s
        self.pos = None
        return None

    def close(self) -> None:
        if self._it is not None:
            self._it.close()  # runs iter_shard's clean-up: closes the file, stops a pipe: command


class SlotStream:
    """The undecoded samples of one slot, epoch after epoch: ``next()`` -> (epoch, sample).

    ``state`` is a saved :meth:`state` (or :func:`fresh_slot_state`); a ``plan`` in it
    replaces the epoch's default shards (elastic resume), later epochs are default."""

    def __init__(self, urls: list[str], cfg: DataConfig, *, seed: int, slot: int, slots: int, state: dict,
                 exclude: frozenset[str] = frozenset(), name: str = ""):  # fmt: skip
        self.urls, self.seed, self.slot, self.slots = urls, seed, slot, slots
        self.by_shard = len(urls) >= slots
        self.open_max, self.buffer_size = cfg.shards_per_worker, cfg.shuffle_buffer
        self.exclude, self.name = exclude, name
        self.errors: list[tuple[str, str]] = []  # whole-shard problems, handed out with the next sample
        self._restore(state)

    def _report(self, name: str, reason: str) -> None:
        self.errors.append((name, reason))

    def _begin_epoch(self, epoch: int, plan: list[Unit] | None, mix: int = 0, shuffle: int = 0) -> None:
        self.epoch, self.plan, self.next_unit = epoch, plan, 0
        self.units = plan if plan is not None else default_plan(len(self.urls), self.seed, epoch, self.slot, self.slots)
        # Splitting by sample, every slot must read the same sequence: one mixing stream for all.
        who = self.slot if self.by_shard else "all"
        self.mix = _Draws(hash_seed(self.seed, "mix", epoch, who, "" if plan is None else "plan"), mix)
        self.shuffle = _Draws(hash_seed(self.seed, "buffer", epoch, self.slot), shuffle)
        self.open: list[_Cursor] = []
        self.buffer: list[tuple[int, RawSample]] = []
        self.read = self.emitted = 0

    def state(self) -> dict:
        return {
            "epoch": self.epoch, "plan": self.plan, "next_unit": self.next_unit,
            "open": [c.state() for c in self.open],
            "buffer": [[shard, s.ordinal, s.offset, s.key] for shard, s in self.buffer],
            "mix": self.mix.count, "shuffle": self.shuffle.count, "read": self.read, "emitted": self.emitted,
        }  # fmt: skip

    def _restore(self, st: dict) -> None:
        self._begin_epoch(st["epoch"], st["plan"], st["mix"], st["shuffle"])
        self.next_unit, self.read, self.emitted = st["next_unit"], st["read"], st["emitted"]
        self.open = [_Cursor(self.urls[u[0]], u, self._report) for u in st["open"]]
        # Re-fetch what the buffer held, by shard: through the shard's open cursor when
        # it has one (for a pipe: one pass serves the buffered samples and the position).
        wanted: dict[int, list[tuple[int, int, str, int]]] = {}
        for j, (shard, ordinal, offset, key) in enumerate(st["buffer"]):
            wanted.setdefault(shard, []).append((ordinal, offset, key, j))
        got: list[tuple[int, RawSample] | None] = [None] * len(st["buffer"])
        for shard, entries in wanted.items():
            cursor = next((c for c in self.open if c.shard == shard), None)
            own = cursor is None
            if own:
                cursor = _Cursor(self.urls[shard], [shard, [], None], self._report)
            for ordinal, offset, key, j in sorted(entries):
                s = cursor.get(ordinal, offset, key)
                got[j] = (shard, s) if s is not None else None
            if own:
                cursor.close()
        self.buffer = [g for g in got if g is not None]

    def _read(self) -> tuple[int, RawSample] | None:
        """The next sample from the open shards (None: the epoch's shards are exhausted)."""
        while True:
            while len(self.open) < self.open_max and self.next_unit < len(self.units):
                self.open.append(_Cursor(self.urls[self.units[self.next_unit][0]], self.units[self.next_unit], self._report))
                self.next_unit += 1
            if not self.open:
                return None
            i = self.mix.below(len(self.open))
            s = self.open[i].next()
            if s is None:
                self.open.pop(i).close()
                continue
            self.read += 1
            if not self.by_shard and (self.read - 1) % self.slots != self.slot:
                continue
            if s.source in self.exclude:
                continue
            return self.open[i].shard, s

    def next(self) -> tuple[int, RawSample]:
        while True:
            while len(self.buffer) < self.buffer_size:
                s = self._read()
                if s is None:
                    break
                self.buffer.append(s)
            if self.buffer:
                j = self.shuffle.below(len(self.buffer))
                item = self.buffer[j]
                self.buffer[j] = self.buffer[-1]
                self.buffer.pop()
                self.emitted += 1
                return self.epoch, item[1]
            if self.emitted == 0 and self.plan is None:
                why = "; ".join(f"{a}: {b}" for a, b in self.errors[:3])
                raise RuntimeError(
                    f"{self.name}: epoch {self.epoch} of {len(self.urls)} shards gave no image sample "
                    f"({why or 'no image members, or all held out for validation'})"
                )
            self._begin_epoch(self.epoch + 1, None)

    def close(self) -> None:
        for c in self.open:
            c.close()


class ShardStream(IterableDataset):
    """Endless batches of decoded samples for one rank, each DataLoader worker one slot.

    Yields collated batches (see ``collate``) with ``pos = (logical worker, slot
    state after this batch)``. ``rotation`` maps DataLoader worker w to logical
    worker (w + rotation) % W, so a resumed loader (whose worker 0 always runs
    first) continues the round-robin where the old one stopped.
    """

    def __init__(self, urls: list[str], cfg: DataConfig, *, seed: int, rank: int, world_size: int, batch_size: int,
                 states: list[dict], rotation: int = 0, exclude: frozenset[str] = frozenset()):  # fmt: skip
        self.urls, self.cfg, self.seed, self.batch_size = urls, cfg, seed, batch_size
        self.rank, self.world_size = rank, world_size
        self.workers = max(cfg.num_workers, 1)
        if len(states) != self.workers:
            raise ValueError(f"expected {self.workers} worker states, got {len(states)}")
        self.states, self.rotation = states, rotation
        self.exclude = exclude  # sources (url:member) held out for validation

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        logical = ((info.id if info is not None else 0) + self.rotation) % self.workers
        stream = SlotStream(
            self.urls, self.cfg, seed=self.seed, slot=self.rank * self.workers + logical,
            slots=self.world_size * self.workers, state=self.states[logical], exclude=self.exclude,
            name=f"rank {self.rank} worker {logical}",
        )  # fmt: skip
        try:
            while True:
                items = []
                for _ in range(self.batch_size):
                    epoch, raw = stream.next()
                    item = load_sample(raw.data, raw.source, raw.key, self.cfg, sample_rng(self.seed, epoch, raw.source))
                    item["shard_errors"], stream.errors = stream.errors, []
                    items.append(item)
                batch = collate(items)
                batch["pos"] = (logical, stream.state())
                yield batch
        finally:
            stream.close()


def elastic_shard_states(old: list[dict], *, n_shards: int, seed: int, rank: int, world_size: int,
                         workers: int) -> tuple[list[dict], str]:  # fmt: skip
    """New slot states for this rank's ``workers`` from EVERY old rank's loader state.

    The epoch the slowest old slot was in (E) continues: its unopened shards stay whole,
    open shards go on from their saved position, buffered samples are fetched by
    position; all dealt round-robin to the new slots. Old slots already in epoch E+1
    were done with E; what they read of E+1 is read again then. Returns the states and
    a note for the warning."""
    old_workers = max(old[0]["num_workers"], 1)
    old_slots, new_slots = len(old) * old_workers, world_size * workers
    slot_states = [ws for st in old for ws in st["workers"]]  # in old slot order
    epoch = min(s["epoch"] for s in slot_states)
    ahead = sum(s["emitted"] for s in slot_states if s["epoch"] > epoch)
    if n_shards < old_slots or n_shards < new_slots:
        note = f"fewer shards ({n_shards}) than reader slots: epoch {epoch} starts again from its beginning"
        return [fresh_slot_state(epoch) for _ in range(workers)], note
    units: list[Unit] = []
    partial = buffered = 0
    order = None  # the epoch's shard order, shuffled once for all the old slots that need it
    for slot, st in enumerate(slot_states):
        if st["epoch"] != epoch:
            continue
        waiting: dict[int, list[list]] = {}
        for shard, ordinal, offset, key in st["buffer"]:
            waiting.setdefault(shard, []).append([ordinal, offset, key])
        buffered += len(st["buffer"])
        for shard, fetch, pos in st["open"]:
            units.append([shard, sorted(waiting.pop(shard, []) + [list(f) for f in fetch]), pos])
            partial += 1
        units.extend([shard, sorted(entries), None] for shard, entries in sorted(waiting.items()))
        plan = st["plan"]
        if plan is None:
            order = order or epoch_shard_order(n_shards, seed, epoch)
            plan = default_plan(n_shards, seed, epoch, slot, old_slots, order)
        units.extend(plan[st["next_unit"] :])
    mine = [fresh_slot_state(epoch, units[t::new_slots]) for t in range(rank * workers, (rank + 1) * workers)]
    note = (
        f"epoch {epoch} goes on with {len(units)} pieces of shard work dealt to {new_slots} readers "
        f"({partial} shards continue where they stopped, {buffered} buffered samples are fetched by position; "
        "finished shards are not read again)"
    )
    if ahead:
        note += f"; {ahead} samples of epoch {epoch + 1} that readers ahead had already used will be seen again"
    return mine, note
