"""Which latents a rank (and each of its DataLoader workers) reads in an epoch, in which order.

Everything here is a pure function of (shard sizes, seed, epoch, rank, world size, ...):
no I/O and no state, so every rank and worker computes the same plan on its own, a
re-run computes it again identically, and a resumed run can skip what was consumed
without reading it.

An epoch, for rank r of W:

1. **Shard order**: the shards in a seeded random order (same on every rank), or the
   stored order with ``shuffle=False``. Their samples, one after the other, are the
   epoch's *global sequence* of N positions.
2. **Rank span**: rank r takes ``L`` consecutive positions of that sequence, from ``r * L``.
   Every rank gets the same count (DDP steps must match, or the rank that runs out first
   leaves the others waiting in an all-reduce): ``uneven="drop"`` (default) uses
   ``L = N // W`` and leaves out the last ``N mod W`` positions (other samples each epoch
   when shuffling); ``"wrap"`` uses ``L = ceil(N / W)`` and the last rank continues at the
   start of the sequence (up to W - 1 samples twice). A rank reads only its span (about
   N / W samples, from about shards / W + 1 shards), however many shards there are.
3. **Interleave**: the span is cut into ``interleave`` contiguous lanes that are read side
   by side (one position of each lane in turn). Shards are often sorted (a folder of
   class folders encodes to shards of one class each); lanes put many shards into the
   buffer's window at once, so a batch mixes them. Each item is ``copies`` items (2 with
   ``flip="both"``).
4. **Shuffle buffer**: the rank's items pass through a seeded shuffle buffer of
   ``buffer_size`` (the classic one: fill, then emit a random slot and refill it), which
   mixes items within a window of about that many. ``drop_last`` then cuts the output to
   whole batches. With ``shuffle=False`` there are no lanes and no buffer: the stored order.
5. **Workers**: worker w of K emits the batches j = w, w + K, w + 2K, ... of the rank's
   output. The DataLoader collects batches from its workers round-robin, so the rank sees
   exactly the output of step 4 whatever K is; each worker reads only its own items.

A worker reads each lane's positions in increasing order (one open shard per lane) and
holds a read sample until it has emitted it, so at most about ``buffer_size`` samples are
in memory per rank (the samples in the simulated buffer), whatever the dataset size.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np


def seed_of(*parts: object) -> int:
    """A 63-bit seed from values (stable across processes and Python versions)."""
    return random.Random("/".join(map(str, parts))).getrandbits(63)


def shard_order(n_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    order = list(range(n_shards))
    if shuffle:
        random.Random(f"shards/{seed}/{epoch}").shuffle(order)
    return order


def rank_span(total: int, world_size: int, rank: int, uneven: Literal["drop", "wrap"]) -> tuple[int, int]:
    """(first global position, number of positions) of ``rank``; positions are taken
    modulo ``total`` (only "wrap" goes past the end)."""
    if uneven == "drop":
        length = total // world_size
    elif uneven == "wrap":
        length = -(-total // world_size)
    else:
        raise ValueError(f"uneven must be 'drop' or 'wrap', got {uneven!r}")
    return rank * length, length


def buffer_order(n: int, size: int, seed: int) -> np.ndarray:
    """Output order of items 0..n-1 through a shuffle buffer of ``size`` slots."""
    if size <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    size = min(size, n)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, size, n - size).tolist()
    buf = list(range(size))
    out = []
    for item, slot in zip(range(size, n), picks):
        out.append(buf[slot])
        buf[slot] = item
    out.extend(buf[k] for k in rng.permutation(size).tolist())  # drain at the end
    return np.asarray(out, dtype=np.int64)


def interleaved(length: int, lanes: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """(span positions in the order they enter the buffer, first position of each lane):
    ``lanes`` contiguous segments of the span, taken one position of each in turn."""
    lanes = max(1, min(lanes, length))
    bounds = tuple(k * length // lanes for k in range(lanes + 1))
    grid = np.full((-(-length // lanes), lanes), -1, dtype=np.int64)
    for k in range(lanes):
        seg = np.arange(bounds[k], bounds[k + 1])
        grid[: len(seg), k] = seg
    order = grid.ravel()
    return order[order >= 0], bounds[:-1]


def worker_slots(n_out: int, begin: int, unit: int, num_workers: int, worker: int) -> Iterator[int]:
    """Output indices ``t`` in [begin, n_out) emitted by ``worker``: the batches of ``unit``
    items counted from ``begin``, dealt round-robin (as the DataLoader collects them)."""
    t = begin + worker * unit
    while t < n_out:
        yield from range(t, min(t + unit, n_out))
        t += num_workers * unit


@dataclass(frozen=True)
class RankPlan:
    """One rank's epoch (see the module docstring)."""

    order: tuple[int, ...]  # shard ids in this epoch's order
    offsets: tuple[int, ...]  # first global position of each shard of ``order``, then the total
    start: int  # this rank's first global position
    length: int  # positions in its span
    copies: int  # items per position
    stream: np.ndarray  # span positions in the order they enter the buffer
    lanes: tuple[int, ...]  # first span position of each lane
    out: np.ndarray  # the rank's output: item ids k = stream index * copies + copy

    def item(self, k: int) -> tuple[int, int]:
        """Item id -> (span position, copy)."""
        s, copy = divmod(k, self.copies)
        return int(self.stream[s]), copy

    def lane(self, i: int) -> int:
        return bisect.bisect_right(self.lanes, i) - 1

    @property
    def total(self) -> int:
        return self.offsets[-1]

    def locate(self, i: int) -> tuple[int, int, int]:
        """Position ``i`` of the span -> (index into ``order``, shard id, position in the shard)."""
        g = (self.start + i) % self.total
        k = bisect.bisect_right(self.offsets, g) - 1
        return k, self.order[k], g - self.offsets[k]


def rank_plan(
    counts: list[int],
    *,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    shuffle: bool,
    buffer_size: int,
    uneven: Literal["drop", "wrap"],
    interleave: int = 16,
    copies: int = 1,
    batch_size: int | None = None,
    drop_last: bool = False,
) -> RankPlan:
    order = [k for k in shard_order(len(counts), seed, epoch, shuffle) if counts[k] > 0]
    offsets = [0]
    for k in order:
        offsets.append(offsets[-1] + counts[k])
    start, length = rank_span(offsets[-1], world_size, rank, uneven)
    stream, lanes = interleaved(length, interleave if shuffle else 1)
    n = length * copies
    out = buffer_order(n, buffer_size, seed_of("buffer", seed, epoch, rank)) if shuffle else np.arange(n)
    if drop_last and batch_size:
        out = out[: n - n % batch_size]
    return RankPlan(tuple(order), tuple(offsets), start, length, copies, stream, lanes, out)
