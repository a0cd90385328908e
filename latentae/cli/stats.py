"""Per-channel and global statistics of encoded latents -> scaling_factor / shift_factor.

  latentae stats LATENTS [--use sample|mean] [--json stats.json]
                 [--write-config DIFFUSERS_DIR [--mode global|no-shift|per-channel]]
  python tools/latent_stats.py ...      (the same, from a checkout)

LATENTS: an output folder of `latentae encode`, a shard glob/brace pattern ('out/part-*.tar'), or shard files.

Streaming float64 statistics over every latent element. By default over *samples* of the stored
posterior (one seeded draw per image, as SD3 / FLUX computed theirs); --use mean for the means.
Prints per-channel mean/std, the global mean/std/rms and the factors:
  global      shift_factor = mean, scaling_factor = 1/std        (SD3 / FLUX convention; default)
  no-shift    shift_factor = null, scaling_factor = 1/rms        (SD 1.x / SDXL pipelines never shift)
  per-channel latents_mean / latents_std, scaling_factor = 1      (pipelines that read latents_mean)
--write-config puts the chosen fields into DIFFUSERS_DIR/config.json and leaves the rest intact.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from latentae import runtime
from latentae.cli.common import Parser, fail


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=__doc__)
    p.add_argument("latents", nargs="+", help="latents folder, shard pattern, or shard files")
    p.add_argument("--use", choices=["sample", "mean"], default="sample", help="statistics of samples or of means")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws for --use sample")
    p.add_argument("--include-flip", action="store_true", help="also count the flipped latents (--flip shards)")
    p.add_argument("--json", type=Path, help="write the statistics here")
    p.add_argument("--write-config", type=Path, metavar="DIFFUSERS_DIR", help="update this VAE's config.json")
    p.add_argument("--mode", choices=["global", "no-shift", "per-channel"], default="global",
                   help="which factors --write-config writes (see above)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    a = build_parser(prog).parse_args(argv)
    if a.write_config is not None and not any((a.write_config / f).is_file() for f in ("config.json", "vae/config.json")):
        # checked before the (long) pass over the latents, not after it
        return fail(f"--write-config {a.write_config}: no config.json there (expected a diffusers VAE folder)")
    runtime.prefer_passive_waiting()  # before torch loads (the imports below)
    from latentae.latent_stats import compute_latent_stats, write_diffusers_config
    from latentae.latents import LatentFormatError

    source = a.latents[0] if len(a.latents) == 1 else a.latents
    try:
        stats = compute_latent_stats(source, use=a.use, seed=a.seed, include_flip=a.include_flip,
                                     progress=not a.no_progress)
    except (FileNotFoundError, LatentFormatError, ValueError) as e:
        return fail(e)
    print(f"{stats.num_latents} latents, {stats.count} values, statistics of {stats.use}s")
    print(f"{'channel':>8} {'mean':>12} {'std':>12}")
    for c, (m, s) in enumerate(zip(stats.channel_mean, stats.channel_std)):
        print(f"{c:>8} {m:>12.6f} {s:>12.6f}")
    print(f"all: mean {stats.mean:.6f}  std {stats.std:.6f}  rms {stats.rms:.6f}")
    print(f"scaling_factor {stats.scaling_factor:.6f}  shift_factor {stats.shift_factor:.6f}  "
          f"(no-shift scaling_factor {1.0 / stats.rms:.6f})")
    try:
        if a.json:
            a.json.write_text(json.dumps(stats.to_dict(), indent=2) + "\n")
            print(f"wrote {a.json}")
        if a.write_config:
            fields = write_diffusers_config(stats, a.write_config, a.mode)
            print(f"updated {a.write_config}/config.json: " + ", ".join(f"{k}={v}" for k, v in fields.items()))
    except (OSError, ValueError) as e:
        return fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m latentae.cli.stats"))
