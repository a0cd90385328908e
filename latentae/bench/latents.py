"""Latent loader throughput: shuffled vs unshuffled reading of the same shards, side by side.

  latentae bench latents                                   # synthetic SD-like latents (4x32x32 fp16, mean+logvar)
  latentae bench latents --channels 16 --side 64 --num-workers 4
  latentae bench latents --latents runs/latents/           # an encoded folder (its manifest)

Each run is one epoch of ``latentae.latents.latent_loader`` (batch --batch-size, --num-workers
DataLoader workers, seeded draws z = mean + std * eps, normalisation) over the same shards:
shuffle=False reads the stored order; shuffle=True reads the epoch's shard order as
--interleave lanes through a shuffle buffer of --buffer-size. Runs alternate (unshuffled,
shuffled, unshuffled, ...) so that a drifting machine load hits both alike; medians and their
ratio are printed. Synthetic shards are written to a temporary folder first (not timed).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


import numpy as np
import torch

from latentae.cli.common import Parser
from latentae.latents import LatentNorm, LatentTarWriter, latent_loader


def write_synthetic(folder: Path, shards: int, per_shard: int, channels: int, side: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths, idx = [], 0
    for s in range(shards):
        path = folder / f"part-{s:06d}-0000.tar"
        with open(path, "wb") as f:
            w = LatentTarWriter(f)
            for _ in range(per_shard):
                mean = rng.standard_normal((channels, side, side), dtype=np.float32).astype(np.float16)
                logvar = np.full_like(mean, -2.0)
                meta = {"key": f"img{idx:08d}", "index": idx, "dtype": "fp16", "store": "dist",
                        "size": [side * 8, side * 8], "latent_size": [side, side]}
                w.add(meta, {"mean.npy": mean, "logvar.npy": logvar})
                idx += 1
            w.close()
        paths.append(str(path))
    return paths


def one_epoch(source, shuffle: bool, a, norm) -> tuple[float, int]:
    loader = latent_loader(source, a.batch_size, num_workers=a.num_workers, shuffle=shuffle,
                           buffer_size=a.buffer_size, interleave=a.interleave, seed=0, norm=norm)
    t, n = time.perf_counter(), 0
    for batch in loader:
        n += batch["latent"].shape[0]
    return n / (time.perf_counter() - t), n


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = Parser(prog=prog, description=__doc__)
    p.add_argument("--latents", help="an encoded latents folder (default: synthetic shards)")
    p.add_argument("--shards", type=int, default=20)
    p.add_argument("--per-shard", type=int, default=500)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--side", type=int, default=32, help="latent side (32 = a 256 px image at f8)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--buffer-size", type=int, default=1000)
    p.add_argument("--interleave", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="epochs per setting (median reported)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="bench_latents_") as tmp:
        if a.latents:
            source, norm, what = a.latents, None, a.latents
        else:
            source = write_synthetic(Path(tmp), a.shards, a.per_shard, a.channels, a.side)
            norm = LatentNorm(scaling_factor=0.18215)
            what = (f"synthetic: {a.shards} shards x {a.per_shard} latents of {a.channels}x{a.side}x{a.side} fp16 "
                    "(mean + logvar)")
        print(f"{what}; batch {a.batch_size}, {a.num_workers} workers, buffer {a.buffer_size}, "
              f"{a.interleave} lanes; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
        rates: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(a.repeats):
            for shuffle in (False, True):
                rate, n = one_epoch(source, shuffle, a, norm)
                rates[shuffle].append(rate)
    med = {k: statistics.median(v) for k, v in rates.items()}
    for shuffle in (False, True):
        print(f"{'shuffled  ' if shuffle else 'unshuffled'} {med[shuffle]:10.0f} latents/s  median of "
              f"{', '.join(f'{v:.0f}' for v in rates[shuffle])}  ({n} latents per epoch)")
    print(f"ratio shuffled / unshuffled = {med[True] / med[False]:.3f} (medians)")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m latentae.bench.latents"))
