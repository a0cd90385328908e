"""Image folders: a map-style dataset over a :class:`FileList`, fed by an epoch sampler.

Epoch e is a permutation of all training images seeded by (seed, e), dealt to the
ranks round-robin (rank r takes permutation items r, r+W, ...; the tail that does not
divide is left out of that epoch so every rank runs the same number of steps, as DDP
needs). A rank's position is (epoch, offset): samples it consumed in that epoch. The
sample sequence does not depend on the number of DataLoader workers.

Since rank r's k-th sample is permutation item ``start + k*W + r``, after every rank
consumed ``offset`` samples exactly the first ``offset * W`` items are used: that is
what lets a run resumed on a different number of ranks (elastic resume) continue the
same epoch without repeating or losing an image, from ``start = offset * W``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from latentae.data.config import DataConfig
from latentae.data.filelist import FileList
from latentae.data.transforms import hash_seed, load_sample, sample_rng


class EpochBatchSampler:
    """Endless batches of ``(epoch, index)`` for one rank, starting at (epoch, offset).

    ``start`` (elastic resume only) is where in ``epoch``'s permutation this run's
    dealing begins; later epochs start at 0. Batches run across epoch boundaries, so
    all are full.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, rank: int, world_size: int, epoch: int = 0,
                 offset: int = 0, start: int = 0):  # fmt: skip
        if n < world_size:
            raise ValueError(f"{n} training images cannot be split across {world_size} ranks")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        if not 0 <= start <= n:
            raise ValueError(f"start {start} out of range for an epoch of {n} images")
        self.epoch, self.start = epoch, start
        if not 0 <= offset <= self.per_rank(epoch):
            raise ValueError(f"offset {offset} out of range for an epoch of {self.per_rank(epoch)} samples per rank")
        self.offset = offset

    def _start(self, epoch: int) -> int:
        return self.start if epoch == self.epoch else 0

    def per_rank(self, epoch: int) -> int:
        """Samples each rank takes from ``epoch``."""
        return (self.n - self._start(epoch)) // self.world_size

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's image indices of ``epoch``, in order (int64: 8 bytes per image, not a list)."""
        g = torch.Generator().manual_seed(hash_seed(self.seed, epoch))
        perm = torch.randperm(self.n, generator=g)
        s = self._start(epoch)
        stop = s + self.per_rank(epoch) * self.world_size
        return perm[s + self.rank : stop : self.world_size].numpy().copy()

    def position_after(self, samples: int) -> tuple[int, int, int]:
        """(epoch, offset, start) after consuming ``samples`` more from the start position."""
        epoch, total = self.epoch, self.offset + samples
        while total >= self.per_rank(epoch):  # (an elastic first epoch may have 0 left: skipped)
            total -= self.per_rank(epoch)
            epoch += 1
        return epoch, total, self._start(epoch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, offset = self.epoch, self.offset
        batch: list[tuple[int, int]] = []
        while True:
            for idx in self.epoch_indices(epoch)[offset:]:
                batch.append((epoch, int(idx)))
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
            epoch, offset = epoch + 1, 0


def spread(n_total: int, n: int) -> list[int]:
    """``n`` evenly spaced indices of range(n_total): a fixed, seed-free pick that
    covers every sub-folder of a sorted file list."""
    n = min(n, n_total)
    return [i * n_total // n for i in range(n)] if n else []


def held_out(n_files: int, cfg: DataConfig) -> list[int]:
    """File indices held out for validation (sorted): ``num_val`` evenly spread files
    unless ``val_path`` is set. The training loader never uses them."""
    if cfg.val_path is not None or cfg.num_val == 0:
        return []
    if n_files <= cfg.num_val:
        raise ValueError(
            f"{cfg.path} has {n_files} images, not enough to hold out data.num_val={cfg.num_val} for "
            "validation and train on the rest: add images, lower data.num_val or set data.val_path"
        )
    return spread(n_files, cfg.num_val)


class FolderDataset(Dataset):
    """Map-style: ``dataset[(epoch, index)]`` -> sample dict (see ``collate``).

    ``index`` counts training images (the file list without the held-out ones). Holds
    only the compact file list: forked workers touching millions of Python objects
    would copy them page by page (refcounts), growing every worker's memory."""

    def __init__(self, files: FileList, root: str, cfg: DataConfig, seed: int, held: list[int] = ()):
        self.files, self.root, self.cfg, self.seed = files, root, cfg, seed
        self.held = sorted(held)

    def __len__(self) -> int:
        return len(self.files) - len(self.held)

    def file_index(self, idx: int) -> int:
        """Training index -> file-list index (skipping the held-out files)."""
        for h in self.held:
            if h > idx:
                break
            idx += 1
        return idx

    def relpath(self, idx: int) -> str:
        return self.files[self.file_index(idx)]

    def __getitem__(self, item: tuple[int, int]) -> dict:
        epoch, idx = item
        rel = self.relpath(idx)
        path = os.path.join(self.root, rel)
        key = rel.rsplit(".", 1)[0]
        return load_sample(Path(path), path, key, self.cfg, sample_rng(self.seed, epoch, idx))


def elastic_folder_position(states: list[dict], n: int) -> tuple[int, int, int, str]:
    """(epoch, offset=0, start, note) continuing the saved ranks' epoch on any number of
    ranks: the first ``offset x old world size`` permutation items were used."""
    epochs = {(s["epoch"], s["start"]) for s in states}
    if len(epochs) > 1:
        raise ValueError(f"the saved loader states of the ranks disagree on the epoch: {sorted(epochs)}")
    (epoch, start), = epochs
    offsets = [s["offset"] for s in states]
    offset = min(offsets)  # all equal in practice (ranks step together); min never skips an image
    used = start + offset * len(states)
    note = f"epoch {epoch}: {used} of {n} images used, the rest dealt to the new ranks"
    if len(set(offsets)) > 1:
        repeat = (max(offsets) - offset) * len(states)
        note += f" (ranks had consumed {sorted(set(offsets))} samples: up to {repeat} repeat)"
    return epoch, 0, min(used, n), note
