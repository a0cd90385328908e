"""Encoded latents on disk: the shard format, and a loader that feeds a diffusion model.

Layout of an output folder written by ``tools/encode.py`` (:mod:`latentae.encode`)::

    DIR/job.json             what is being encoded (VAE identity, preprocessing, input): written first
    DIR/part-000000.tar      WebDataset shards, one per part of ``shard_size`` inputs
    DIR/part-000000.json     that part's counts and skipped inputs (written just before the tar)
    DIR/manifest.json        everything above merged, written once every part exists

One sample of a shard (member names ``<key>.<field>``; the key has '.' and '%' escaped as
``%2E`` / ``%25`` because WebDataset splits a member name at its first dot)::

    <key>.json          {"key", "index", "source", "original_size", "resized_size", "crop_box",
                         "size", "padded_size", "latent_size", "dtype", "store", ...}
    <key>.mean.npy      [C, h, w]  posterior mean        } store="dist" (the default)
    <key>.logvar.npy    [C, h, w]  posterior log-variance }
    <key>.latent.npy    [C, h, w]  store="mode" (the mean) or "sample" (one seeded draw)
    <key>.flip_*.npy    the same for the horizontally flipped image (``--flip``)

Sizes are ``[width, height]`` (PIL order), ``crop_box`` is ``[left, top, right, bottom]`` in
the resized image. Arrays are fp16, fp32, or bf16; NumPy has no bf16, so bf16 is stored as
the raw 16-bit pattern in a ``uint16`` array and ``"dtype": "bf16"`` in the json says so
(:func:`from_stored` turns it back into a tensor).

Reading for diffusion training: :class:`LatentDataset` / :func:`latent_loader` draw
``z = mean + std * eps`` with a generator seeded by (seed, epoch, sample index), so the
draw does not depend on workers or ranks, then normalise with the VAE's factors
(:class:`LatentNorm`, from the manifest unless given).
"""

from __future__ import annotations

import glob
import io
import json
import math
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

FORMAT = "latentae.latents/1"
MANIFEST = "manifest.json"
JOB = "job.json"
STORED_DTYPES = ("fp16", "bf16", "fp32")
STORE_MODES = ("dist", "mode", "sample")


class LatentFormatError(ValueError):
    """A latents folder or shard that does not follow the format above; names the file."""


# ----------------------------------------------------------------------------- storage


def to_stored(t: torch.Tensor, dtype: str) -> np.ndarray:
    """Float tensor -> the array written to ``.npy`` (bf16 as its uint16 bit pattern)."""
    t = t.detach().cpu()
    if dtype == "fp32":
        return t.float().numpy()
    if dtype == "fp16":
        return t.half().numpy()
    if dtype == "bf16":
        # torch rounds to nearest-even; the int16 view keeps the bits, NumPy then reads them as uint16.
        return t.bfloat16().view(torch.int16).numpy().view(np.uint16)
    raise ValueError(f"unknown latent dtype {dtype!r}, expected one of {STORED_DTYPES}")


def from_stored(a: np.ndarray, dtype: str, where: str = "array") -> torch.Tensor:
    """Array read from ``.npy`` -> float32 tensor."""
    if dtype == "bf16":
        if a.dtype != np.uint16:
            raise LatentFormatError(f"{where}: dtype says bf16, so a uint16 array was expected, got {a.dtype}")
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16).float()
    want = {"fp16": np.float16, "fp32": np.float32}.get(dtype)
    if want is None:
        raise LatentFormatError(f"{where}: unknown dtype {dtype!r}, expected one of {STORED_DTYPES}")
    if a.dtype != want:
        raise LatentFormatError(f"{where}: dtype says {dtype}, but the array is {a.dtype}")
    return torch.from_numpy(np.ascontiguousarray(a)).float()


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def escape_key(key: str) -> str:
    """A sample key safe as a WebDataset member prefix: no '.' in it (reversible)."""
    return key.replace("%", "%25").replace(".", "%2E")


def unescape_key(key: str) -> str:
    return key.replace("%2E", ".").replace("%25", "%")


# ----------------------------------------------------------------------------- one sample


@dataclass
class StoredLatent:
    """One stored sample. ``mean``/``logvar`` are float32 [C, h, w]; when only a point
    was stored (``store`` "mode" or "sample"), ``mean`` is that point and ``logvar`` None."""

    key: str
    meta: dict[str, Any]
    mean: torch.Tensor
    logvar: torch.Tensor | None = None
    flip_mean: torch.Tensor | None = None
    flip_logvar: torch.Tensor | None = None

    @property
    def index(self) -> int:
        return int(self.meta["index"])

    def draw(self, generator: torch.Generator | None, flipped: bool = False) -> torch.Tensor:
        """A sample from the stored distribution (the point itself when no logvar is stored)."""
        mean, logvar = (self.flip_mean, self.flip_logvar) if flipped else (self.mean, self.logvar)
        if mean is None:
            raise LatentFormatError(f"sample '{self.key}' has no flipped latents (encode with --flip)")
        if logvar is None or generator is None:
            return mean
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * eps


_ARRAY_FIELDS = {
    "mean.npy": "mean",
    "logvar.npy": "logvar",
    "latent.npy": "mean",
    "flip_mean.npy": "flip_mean",
    "flip_logvar.npy": "flip_logvar",
    "flip_latent.npy": "flip_mean",
}


def _build_sample(shard: str, key: str, members: dict[str, bytes]) -> StoredLatent:
    where = f"{shard}:{key}"
    if "json" not in members:
        raise LatentFormatError(f"{where}: sample has no .json metadata (members: {sorted(members)})")
    try:
        meta = json.loads(members["json"])
    except json.JSONDecodeError as e:
        raise LatentFormatError(f"{where}.json: invalid JSON: {e}") from e
    dtype = meta.get("dtype")
    arrays: dict[str, torch.Tensor] = {}
    for ext, name in _ARRAY_FIELDS.items():
        if ext in members:
            try:
                a = np.load(io.BytesIO(members[ext]), allow_pickle=False)
            except (ValueError, OSError) as e:
                raise LatentFormatError(f"{where}.{ext}: not a readable .npy array: {e}") from e
            arrays[name] = from_stored(a, dtype, f"{where}.{ext}")
    if "mean" not in arrays:
        raise LatentFormatError(f"{where}: no latent array (expected mean.npy or latent.npy)")
    return StoredLatent(key=meta.get("key", unescape_key(key)), meta=meta, **arrays)


def iter_shard_latents(path: str | Path) -> Iterator[StoredLatent]:
    """The samples of one latent shard, in file order."""
    path = str(path)
    try:
        tf = tarfile.open(path, mode="r|")
    except (OSError, tarfile.TarError) as e:
        raise LatentFormatError(f"{path}: cannot open latent shard: {e}") from e
    current: str | None = None
    members: dict[str, bytes] = {}
    with tf:
        for m in tf:
            if not m.isfile():
                continue
            slash = m.name.rfind("/")
            dot = m.name.find(".", slash + 1)
            if dot < 0:
                continue
            key, ext = m.name[:dot], m.name[dot + 1 :]
            if key != current:
                if current is not None:
                    yield _build_sample(path, current, members)
                current, members = key, {}
            f = tf.extractfile(m)
            members[ext] = f.read() if f is not None else b""
        if current is not None:
            yield _build_sample(path, current, members)


# ----------------------------------------------------------------------------- folders


def read_manifest(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    p = folder / MANIFEST
    if not p.is_file():
        hint = (
            " (job.json is there: the encoding job has not finished; re-run the same encode command)"
            if (folder / JOB).is_file()
            else ""
        )
        raise FileNotFoundError(f"no {MANIFEST} in {folder}{hint}")
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise LatentFormatError(f"{p}: invalid JSON: {e}") from e
    if m.get("format") != FORMAT:
        raise LatentFormatError(f"{p}: format is {m.get('format')!r}, expected {FORMAT!r}")
    return m


def resolve_shards(source: str | Path | Sequence[str | Path]) -> tuple[list[str], dict[str, Any] | None]:
    """A latents folder (its manifest lists the shards), a glob / brace pattern, a shard
    file, or a list of shard files -> (sorted shard paths, manifest or None)."""
    if isinstance(source, (list, tuple)):
        paths = [str(p) for p in source]
        manifest = None
    elif Path(source).is_dir():
        manifest = read_manifest(source)
        paths = [str(Path(source) / s["file"]) for s in manifest["shards"] if s["num_encoded"] > 0]
    else:
        import braceexpand  # a webdataset dependency

        manifest = None
        paths = sorted({p for pat in braceexpand.braceexpand(str(source)) for p in glob.glob(pat)})
        if not paths:
            raise FileNotFoundError(f"no latent shards match {source}")
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} latent shards not found, e.g. {missing[0]}")
    return paths, manifest


# ----------------------------------------------------------------------------- normalisation


@dataclass(frozen=True)
class LatentNorm:
    """How raw VAE latents become the latents a diffusion model sees.

    Global (SD / SDXL / SD3 / FLUX): ``z' = (z - shift) * scale``, as ``AutoencoderKL.scale_latents``.
    Per channel (``per_channel=True``, diffusers' latents_mean/latents_std convention):
    ``z' = (z - mean_c) * scale / std_c``.
    """

    scaling_factor: float = 1.0
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    per_channel: bool = False

    def __post_init__(self):
        if not math.isfinite(self.scaling_factor) or self.scaling_factor == 0:
            raise ValueError(f"scaling_factor must be finite and non-zero, got {self.scaling_factor}")
        if self.per_channel and (self.latents_mean is None or self.latents_std is None):
            raise ValueError("per_channel normalisation needs latents_mean and latents_std")

    @classmethod
    def from_config(cls, cfg: dict[str, Any], per_channel: bool = False) -> "LatentNorm":
        """From a model config dict (ours, as stored in the manifest, or a diffusers config.json)."""
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        return cls(
            scaling_factor=float(cfg.get("scaling_factor", 1.0)),
            shift_factor=cfg.get("shift_factor"),
            latents_mean=tuple(mean) if mean is not None else None,
            latents_std=tuple(std) if std is not None else None,
            per_channel=per_channel,
        )

    def _channel(self, values: tuple[float, ...], z: torch.Tensor) -> torch.Tensor:
        if len(values) != z.shape[-3]:
            raise ValueError(f"latents have {z.shape[-3]} channels, the per-channel statistics {len(values)}")
        return torch.tensor(values, dtype=z.dtype, device=z.device).view(-1, 1, 1)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:  # [..., C, h, w]
        if self.per_channel:
            return (z - self._channel(self.latents_mean, z)) * self.scaling_factor / self._channel(self.latents_std, z)
        return (z - (self.shift_factor or 0.0)) * self.scaling_factor

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        if self.per_channel:
            return z * self._channel(self.latents_std, z) / self.scaling_factor + self._channel(self.latents_mean, z)
        return z / self.scaling_factor + (self.shift_factor or 0.0)


def manifest_norm(manifest: dict[str, Any], per_channel: bool = False) -> LatentNorm:
    return LatentNorm.from_config(manifest["job"]["vae"]["config"], per_channel=per_channel)


# ----------------------------------------------------------------------------- dataset


def sample_seed(seed: int, epoch: int, index: int, flipped: bool = False) -> int:
    """63-bit seed of one sample's draw: depends on nothing but these values."""
    return random.Random(f"latents/{seed}/{epoch}/{index}/{int(flipped)}").getrandbits(63)


def _split(items: list[str], n: int, i: int) -> tuple[list[str], tuple[int, int] | None]:
    """Consumer i of n: whole shards when there are enough, else every shard and a sample filter."""
    if len(items) >= n:
        return items[i::n], None
    return items, (n, i)


class LatentDataset(IterableDataset):
    """Stored latents -> dicts ready for a diffusion model, one pass per epoch.

    Yields ``{"latent": FloatTensor[C, h, w] (normalised), "key": str, "index": int,
    "flipped": bool, "meta": dict}``.

    * ``sample=True`` draws from the stored distribution with a generator seeded by
      (seed, epoch, index); ``False`` returns the mean (or the stored point).
    * ``flip``: "none", "random" (flipped latents with probability 1/2, seeded like the
      draw; needs shards encoded with ``--flip``) or "both" (every sample twice).
    * ``norm``: None = the VAE factors recorded in the manifest; ``normalize=False`` = raw.
    * Split: shards are dealt to ``world_size`` ranks, then to DataLoader workers; when
      there are fewer shards than consumers every consumer reads all shards and keeps
      every n-th sample (correct, but each reads everything). Different ranks may then
      get counts differing by one: drop the tail if your trainer needs equal steps.
    * ``shuffle_shards``: a seeded per-epoch shard order (same on every rank).
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
        shuffle_shards: bool = False,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if flip not in ("none", "random", "both"):
            raise ValueError(f"flip must be 'none', 'random' or 'both', got {flip!r}")
        self.shards, self.manifest = resolve_shards(source)
        if normalize and norm is None:
            if self.manifest is None:
                raise ValueError(
                    "normalize=True needs the VAE factors: read a latents folder (with manifest.json), "
                    "or pass norm=LatentNorm(scaling_factor=..., shift_factor=...), or normalize=False"
                )
            norm = manifest_norm(self.manifest, per_channel)
        if flip != "none" and self.manifest is not None and not self.manifest["job"]["storage"]["flip"]:
            raise ValueError(f"flip={flip!r} needs latents encoded with --flip; this folder has none")
        self.norm = norm if normalize else None
        self.sample, self.seed, self.flip = sample, seed, flip
        self.rank, self.world_size = rank, world_size
        self.shuffle_shards = shuffle_shards
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _my_samples(self) -> Iterator[StoredLatent]:
        shards = list(self.shards)
        if self.shuffle_shards:
            random.Random(f"shards/{self.seed}/{self.epoch}").shuffle(shards)
        shards, rank_filter = _split(shards, self.world_size, self.rank)
        info = get_worker_info()
        nw, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        shards, worker_filter = _split(shards, nw, wid)

        stream: Iterator[StoredLatent] = (s for path in shards for s in iter_shard_latents(path))
        # A rank-level sample filter counts over the rank's whole stream, so when both
        # filters apply every worker reads the rank's shards and counts the same way.
        if rank_filter is not None:
            n, i = rank_filter
            stream = (s for j, s in enumerate(stream) if j % n == i)
        if worker_filter is not None:
            n, i = worker_filter
            stream = (s for j, s in enumerate(stream) if j % n == i)
        return stream

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for s in self._my_samples():
            if self.flip == "both":
                choices = (False, True)
            elif self.flip == "random":
                choices = (random.Random(sample_seed(self.seed, self.epoch, s.index, True)).random() < 0.5,)
            else:
                choices = (False,)
            for flipped in choices:
                g = None
                if self.sample:
                    g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, s.index, flipped))
                z = s.draw(g, flipped)
                if self.norm is not None:
                    z = self.norm.normalize(z)
                yield {"latent": z, "key": s.key, "index": s.index, "flipped": flipped, "meta": s.meta}


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


def latent_loader(
    source: str | Path | Sequence[str | Path],
    batch_size: int | None,
    *,
    num_workers: int = 0,
    **dataset_kwargs: Any,
) -> DataLoader:
    """A DataLoader over :class:`LatentDataset` (keyword arguments go to it) with
    :func:`collate_latents`. Call ``loader.dataset.set_epoch(e)`` between epochs."""
    ds = LatentDataset(source, **dataset_kwargs)
    return DataLoader(
        ds,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_latents if batch_size is not None else None,
        persistent_workers=False,
    )


__all__ = [
    "FORMAT",
    "JOB",
    "MANIFEST",
    "LatentDataset",
    "LatentFormatError",
    "LatentNorm",
    "StoredLatent",
    "collate_latents",
    "escape_key",
    "from_stored",
    "iter_shard_latents",
    "latent_loader",
    "manifest_norm",
    "read_manifest",
    "resolve_shards",
    "sample_seed",
    "to_stored",
    "unescape_key",
]
