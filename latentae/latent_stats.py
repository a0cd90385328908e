"""Latent statistics of an encoded dataset: the normalisation a diffusion model needs.

What is measured, and why: a diffusion model is trained on *samples* z ~ q(z|x), so
the statistics default to samples (``use="sample"``: one draw per latent, seeded by
its index, exactly what :class:`latentae.latents.LatentDataset` yields). That is how
SD3 and FLUX computed their factors. Sample variance = variance of the means plus the
average posterior variance, so ``use="mean"`` (posterior means only) gives a slightly
smaller std; use it if you train on the means. Shards stored with ``--store mode`` or
``sample`` hold a single point per image: the statistics are then of that point.

Accumulation is streaming and in float64: per-channel count / mean / M2 merged batch by
batch with Chan et al.'s parallel update (no catastrophic cancellation, unlike sum and
sum of squares), and the global figures are merged from the per-channel ones.
Standard deviations are population std (ddof=0).

Factors (see :meth:`LatentStats.factors`):
* ``global`` (SD3 / FLUX):  shift_factor = mean, scaling_factor = 1 / std over all
  elements, so (z - shift) * scale has mean 0 and std 1.
* ``no-shift`` (SD 1.x / SDXL pipelines never subtract a shift): shift_factor = null,
  scaling_factor = 1 / rms, so z * scale has unit second moment.
* ``per-channel``: latents_mean / latents_std per channel, scaling_factor = 1 (diffusers
  pipelines that read latents_mean compute (z - mean_c) * scaling_factor / std_c).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from latentae.latents import LatentDataset

FactorMode = Literal["global", "no-shift", "per-channel"]


class ChannelMoments:
    """Running per-channel count, mean and sum of squared deviations (float64)."""

    def __init__(self, channels: int):
        self.count = np.zeros(channels, dtype=np.int64)
        self.mean = np.zeros(channels, dtype=np.float64)
        self.m2 = np.zeros(channels, dtype=np.float64)

    def update(self, x: np.ndarray) -> None:
        """Add values ``x`` [C, N] (any float dtype)."""
        if x.ndim != 2 or x.shape[0] != len(self.count):
            raise ValueError(f"expected an array [C={len(self.count)}, N], got shape {x.shape}")
        n_b = x.shape[1]
        if n_b == 0:
            return
        x = x.astype(np.float64, copy=False)
        mean_b = x.mean(axis=1)
        m2_b = np.square(x - mean_b[:, None]).sum(axis=1)
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + np.square(delta) * (self.count * n_b / n)
        self.count = n

    def merge(self, other: "ChannelMoments") -> None:
        n = self.count + other.count
        safe = np.maximum(n, 1)
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / safe)
        self.m2 = self.m2 + other.m2 + np.square(delta) * (self.count * other.count / safe)
        self.count = n

    def overall(self) -> tuple[int, float, float]:
        """(count, mean, M2) over all channels together (Chan's merge of the channels)."""
        n = int(self.count.sum())
        mean = float((self.count * self.mean).sum() / n)
        m2 = float(self.m2.sum() + (self.count * np.square(self.mean - mean)).sum())
        return n, mean, m2


@dataclass(frozen=True)
class LatentStats:
    num_latents: int  # latent tensors (images, x2 with flips)
    count: int  # elements over all channels
    channel_mean: tuple[float, ...]
    channel_std: tuple[float, ...]
    mean: float
    std: float
    rms: float
    use: str  # "sample", "mean", or "stored point"

    @property
    def scaling_factor(self) -> float:
        return 1.0 / self.std

    @property
    def shift_factor(self) -> float:
        return self.mean

    def factors(self, mode: FactorMode = "global") -> dict[str, Any]:
        """The diffusers config fields for one normalisation convention (module docstring)."""
        if mode == "global":
            return {"scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor}
        if mode == "no-shift":
            return {"scaling_factor": 1.0 / self.rms, "shift_factor": None}
        if mode == "per-channel":
            return {
                "scaling_factor": 1.0,
                "shift_factor": None,
                "latents_mean": list(self.channel_mean),
                "latents_std": list(self.channel_std),
            }
        raise ValueError(f"unknown factor mode {mode!r}: expected 'global', 'no-shift' or 'per-channel'")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channel_mean"], d["channel_std"] = list(self.channel_mean), list(self.channel_std)
        d.update(scaling_factor=self.scaling_factor, shift_factor=self.shift_factor)
        return d


def compute_latent_stats(
    source: str | Path | Sequence[str | Path],
    *,
    use: Literal["sample", "mean"] = "sample",
    seed: int = 0,
    include_flip: bool = False,
    batch: int = 64,
    progress: bool = False,
) -> LatentStats:
    """Statistics of the latents in ``source`` (a latents folder, shard pattern or list)."""
    if use not in ("sample", "mean"):
        raise ValueError(f"use must be 'sample' or 'mean', got {use!r}")
    ds = LatentDataset(  # one plain pass in the stored order: statistics need no shuffling
        source, sample=use == "sample", seed=seed, normalize=False, flip="both" if include_flip else "none",
        shuffle=False,
    )
    moments: ChannelMoments | None = None
    pending: list[np.ndarray] = []
    n_lat = 0
    point_only = False
    it = ds
    if progress:
        from tqdm import tqdm

        it = tqdm(ds, unit="latent", desc="stats")

    def flush():
        if pending:
            moments.update(np.concatenate(pending, axis=1))
            pending.clear()

    for item in it:
        z: torch.Tensor = item["latent"]  # [C, h, w]
        if moments is None:
            moments = ChannelMoments(z.shape[0])
        elif z.shape[0] != len(moments.count):
            raise ValueError(f"sample '{item['key']}' has {z.shape[0]} channels, earlier ones {len(moments.count)}")
        point_only = point_only or item["meta"].get("store", "dist") != "dist"
        pending.append(z.reshape(z.shape[0], -1).numpy())
        n_lat += 1
        if len(pending) >= batch:
            flush()
    if moments is None:
        raise ValueError(f"no latents in {source}")
    flush()
    n, mean, m2 = moments.overall()
    var = m2 / n
    return LatentStats(
        num_latents=n_lat,
        count=n,
        channel_mean=tuple(float(v) for v in moments.mean),
        channel_std=tuple(float(v) for v in np.sqrt(moments.m2 / moments.count)),
        mean=mean,
        std=math.sqrt(var),
        rms=math.sqrt(var + mean * mean),
        use="stored point" if point_only else use,
    )


def write_diffusers_config(stats: LatentStats, folder: str | Path, mode: FactorMode = "global") -> dict[str, Any]:
    """Put the factors into ``folder/config.json`` (a diffusers AutoencoderKL folder, or a
    pipeline folder with ``vae/``), keeping every other field as it is. Returns the fields written."""
    folder = Path(folder)
    if (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {folder} (export the VAE with tools/export.py --format diffusers)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    channels = len(stats.channel_mean)
    if cfg.get("latent_channels", channels) != channels:
        raise ValueError(
            f"{path}: latent_channels is {cfg['latent_channels']}, but the latents have {channels} channels "
            "(statistics of another VAE?)"
        )
    fields = stats.factors(mode)
    cfg.update(fields)  # existing keys keep their place; new ones go at the end
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    os.replace(tmp, path)
    return fields


__all__ = ["ChannelMoments", "LatentStats", "compute_latent_stats", "write_diffusers_config"]
