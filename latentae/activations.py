"""Image-wide activations kept between the layers of a streamed encode/decode, and their statistics.

A streamed run (``latentae.streaming``) computes each layer over the whole image, band
of rows by band of rows, and keeps the layer's output until the next layer has read
it: the next group norm needs the statistics of the *whole* tensor before any band of
it can be normalised. Where those tensors live:

* in memory (on the compute device) while their total stays within ``memory`` bytes;
* beyond that, **on disk**: one anonymous temporary file per tensor under
  ``spill_dir`` (default: the system temp folder, ``$TMPDIR``), laid out
  [N, H, W, C] so that a band of rows is one contiguous read or write per sample.
  The file has no name (deleted on close, and by the kernel if the process dies),
  and its size is reserved up front (``posix_fallocate``): a full disk fails
  before the work, with a message naming the folder and the size.

At most three such tensors are alive at a time (a resnet's input, its inner
activation and, in half precision, its output), so the disk space needed is about
three of the largest activations (an SD-size decode at 4096 x 4096 px: 3 x 8 GiB
in fp32 at the top level); ``ActivationStore.peak_disk`` reports it.

``ChannelMoments`` accumulates per-channel statistics of everything written, in
float64, so group-norm statistics of the whole tensor are ready when the last
band is written.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


class ChannelMoments:
    """Running per-(sample, channel) count, sum and sum of squares, in float64."""

    def __init__(self):
        self.count = 0
        self.sum: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        """Add every pixel of ``x`` [N, C, h, w]."""
        n = x.shape[-1] * x.shape[-2]
        if n == 0:
            return
        mean, var = _channel_moments(x)
        s, sq = mean * n, (var + mean * mean) * n
        if self.sum is None:
            self.sum, self.sumsq = s, sq
        else:
            self.sum += s
            self.sumsq += sq
        self.count += n

    def group_stats(self, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, var) per [N, G]: pooled over the group's channels (equal counts each)."""
        if self.sum is None:
            raise RuntimeError("no pixels were accumulated")
        n, c = self.sum.shape
        m = (self.sum / self.count).view(n, groups, c // groups).mean(-1)
        m2 = (self.sumsq / self.count).view(n, groups, c // groups).mean(-1)
        return m, (m2 - m * m).clamp_min(0.0)

    def finite(self) -> bool:
        """False when anything written had an inf or nan (the statistics then do too)."""
        return self.sum is None or bool(torch.isfinite(self.sum).all() & torch.isfinite(self.sumsq).all())


def _channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, channel) mean and variance of x [N, C, h, w], float64 [N, C].

    Uses the group-norm kernel with one group per channel: ~2.5x faster than
    ``var_mean`` over the spatial dims (slow for channels-last) and as accurate as
    the group norms of an untiled run, which use the same kernel (~1e-5 relative).
    """
    if x.dtype != torch.float32:
        x = x.float()
    # The CPU kernel takes channels-last as it is; the CUDA kernel only takes NCHW-contiguous
    # input (it raises otherwise: found by tools/gpu_check.py on an H200).
    cl = x.device.type == "cpu" and x.stride(1) == 1 and x.shape[1] > 1
    x = x.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)  # no-op if already
    n, c, h, w = x.shape
    _, mean, rstd = torch.ops.aten.native_group_norm(x, None, None, n, c, h * w, c, 0.0)
    return mean.double().view(n, c), rstd.double().pow(-2).view(n, c)


class Activation:
    """An [N, C, H, W] tensor written and read by bands of rows; ``moments`` sees every write."""

    def __init__(self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = shape, dtype, device
        self.nbytes = _nbytes(shape, dtype)
        self.moments = ChannelMoments()

    def pieces(self, a: int, b: int) -> list[torch.Tensor]:
        """Rows [a, b) as consecutive [N, C, r_i, W] blocks on the compute device (views when in memory)."""
        raise NotImplementedError

    def rows(self, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) as one [N, C, b - a, W] tensor (a view when it lies in one written band)."""
        p = self.pieces(a, b)
        return p[0] if len(p) == 1 else torch.cat(p, dim=2)

    def write(self, r0: int, band: torch.Tensor) -> None:
        """Store ``band`` [N, C, r, W] at rows [r0, r0 + r) and add it to ``moments``."""
        self._store(r0, band)
        self.moments.add(band)

    def rewrite(self) -> None:
        """Start overwriting in place (rows already read are replaced): fresh statistics."""
        self.moments = ChannelMoments()

    def _store(self, r0: int, band: torch.Tensor) -> None:
        raise NotImplementedError

    def free(self) -> None:
        pass


class InMemory(Activation):
    """The written bands themselves, kept as they came (no copy into one big tensor); or, with
    ``dense`` (a final result), copied into one preallocated tensor (no second copy to join them)."""

    def __init__(self, shape, dtype, device, store: "ActivationStore | None", dense: bool = False):
        super().__init__(shape, dtype, device)
        self._bands: dict[int, torch.Tensor] = {}  # first row -> band
        self._dense = torch.empty(shape, dtype=dtype, device=device) if dense else None
        self._store_ref = store

    @classmethod
    def wrap(cls, tensor: torch.Tensor) -> "InMemory":
        """An existing tensor (an input), outside any store's budget; moments not computed."""
        act = cls(tuple(tensor.shape), tensor.dtype, tensor.device, None)
        act._bands[0] = tensor
        return act

    @property
    def tensor(self) -> torch.Tensor:
        """All rows as one tensor."""
        return self._dense if self._dense is not None else self.rows(0, self.shape[2])

    def pieces(self, a: int, b: int) -> list[torch.Tensor]:
        if self._dense is not None:
            return [self._dense[:, :, a:b]]
        out = []
        for r0 in sorted(self._bands):
            t = self._bands[r0]
            r1 = r0 + t.shape[2]
            if r1 > a and r0 < b:
                out.append(t[:, :, max(a, r0) - r0 : min(b, r1) - r0])
        return out

    def _store(self, r0: int, band: torch.Tensor) -> None:
        if self._dense is not None:
            self._dense[:, :, r0 : r0 + band.shape[2]] = band
            return
        if any(k != r0 and r0 <= k < r0 + band.shape[2] for k in self._bands):
            raise RuntimeError(f"band at row {r0} overlaps another: a tensor is rewritten in the bands it was written in")
        self._bands[r0] = band

    def free(self) -> None:
        if self._store_ref is not None:
            self._store_ref.in_memory -= self.nbytes
            self._store_ref = None
        self._bands, self._dense = {}, None


class OnDisk(Activation):
    """Rows in an anonymous temporary file, laid out [N, H, W, C]."""

    def __init__(self, shape, dtype, device, store: "ActivationStore"):
        super().__init__(shape, dtype, device)
        self._store_ref = store
        self._file = tempfile.TemporaryFile(dir=store.spill_dir)
        try:
            os.posix_fallocate(self._file.fileno(), 0, self.nbytes)
        except OSError as e:
            # Filesystems without fallocate: check the free space instead (writes may still fail later).
            if e.errno in (errno.ENOSPC, errno.EDQUOT) or shutil.disk_usage(store.spill_dir).free < self.nbytes:
                self._file.close()
                raise _no_room(store, self.nbytes, e) from e
        store.on_disk += self.nbytes
        store.peak_disk = max(store.peak_disk, store.on_disk)
        n, c, h, w = shape
        es = dtype.itemsize
        self._sample_bytes, self._row_bytes = h * w * c * es, w * c * es

    def pieces(self, a: int, b: int) -> list[torch.Tensor]:
        n, c, _, w = self.shape
        buf = torch.empty((n, b - a, w, c), dtype=self.dtype)
        raw = buf.view(torch.uint8).numpy().reshape(n, -1)
        for i in range(n):
            _read_exact(self._file.fileno(), memoryview(raw[i]), i * self._sample_bytes + a * self._row_bytes)
        return [buf.permute(0, 3, 1, 2).to(self.device)]  # [N, C, r, W], channels-last

    def _store(self, r0: int, band: torch.Tensor) -> None:
        n = band.shape[0]
        raw = band.detach().permute(0, 2, 3, 1).to("cpu", self.dtype).contiguous().view(torch.uint8).numpy()
        raw = raw.reshape(n, -1)
        try:
            for i in range(n):
                _write_exact(self._file.fileno(), memoryview(raw[i]), i * self._sample_bytes + r0 * self._row_bytes)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _no_room(self._store_ref, self.nbytes, e) from e
            raise

    def free(self) -> None:
        if self._file is not None:
            self._file.close()
            self._store_ref.on_disk -= self.nbytes
            self._file = None


def _no_room(store: "ActivationStore", nbytes: int, e: OSError) -> OSError:
    free = shutil.disk_usage(store.spill_dir).free
    return OSError(
        e.errno,
        f"streamed encode/decode: no room for {nbytes / 2**30:.2f} GiB of activations in {store.spill_dir} "
        f"({free / 2**30:.2f} GiB free; {store.on_disk / 2**30:.2f} GiB already used by this run). Give it more "
        "memory (memory=...), a folder with more space (spill_dir=...), or a smaller image.",
    )


def _read_exact(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        got = os.preadv(fd, [buf], offset)
        if got <= 0:
            raise OSError(errno.EIO, f"short read from the activation spill file at offset {offset}")
        buf, offset = buf[got:], offset + got


def _write_exact(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        done = os.pwritev(fd, [buf], offset)
        buf, offset = buf[done:], offset + done


class ActivationStore:
    """Creates ``Activation`` s: in memory while they fit ``memory`` bytes (None: always), else on disk."""

    def __init__(self, device: torch.device, memory: int | None, spill_dir: str | Path | None = None):
        self.device, self.memory = device, memory
        self.spill_dir = str(spill_dir) if spill_dir is not None else tempfile.gettempdir()
        self.in_memory = self.on_disk = 0
        self.peak_in_memory = self.peak_disk = 0
        self._live: list[Activation] = []

    def new(self, shape: tuple[int, int, int, int], dtype: torch.dtype, result: bool = False) -> Activation:
        """A tensor of ``shape``; ``result=True``: a final result, in memory whatever the budget, as one tensor."""
        nbytes = _nbytes(shape, dtype)
        if result or self.memory is None or self.in_memory + nbytes <= self.memory:
            act: Activation = InMemory(shape, dtype, self.device, self, dense=result)
            self.in_memory += nbytes
            self.peak_in_memory = max(self.peak_in_memory, self.in_memory)
        else:
            act = OnDisk(shape, dtype, self.device, self)
        self._live.append(act)
        return act

    def close(self) -> None:
        for act in self._live:
            act.free()
        self._live.clear()


__all__ = ["ActivationStore", "Activation", "ChannelMoments", "InMemory", "OnDisk"]
