"""``latentae bench <name> [options]``: the benchmarks, each printing its numbers side by side.

    latentae bench inference   encode/decode speed, FLOP/s and memory: ours vs diffusers.AutoencoderKL
    latentae bench tiling      tiled vs untiled decode: quality and peak memory, ours vs diffusers' tiling
    latentae bench train       one training step: latentae's trainer vs a plain diffusers step
    latentae bench encode      dataset encoding end to end vs model-only throughput
    latentae bench data        the data layer: resume reads, shard mixing, file-list memory, listing
    latentae bench latents     latent loader throughput, shuffled vs stored order
    latentae bench busy        training step time with a core kept busy, before vs after the CPU policy

``latentae bench <name> --help`` shows each one's options. In a checkout the same code runs
as ``python tools/bench*.py``. Every benchmark runs with OMP_WAIT_POLICY=PASSIVE unless the
environment sets it (as every latentae command: ``latentae.runtime``).
"""

from __future__ import annotations

import importlib
import sys

from latentae import runtime
from latentae.cli.common import fail

BENCHES: dict[str, str] = {
    "inference": "latentae.bench.inference",
    "tiling": "latentae.bench.tiling",
    "train": "latentae.bench.train",
    "encode": "latentae.bench.encode",
    "data": "latentae.bench.data",
    "latents": "latentae.bench.latents",
    "busy": "latentae.bench.busy",
}


def run(name: str, argv: list[str], prog: str) -> int:
    """One benchmark's ``main``; its module (which may import torch at the top) loads after
    the wait policy is set."""
    runtime.prefer_passive_waiting()
    return importlib.import_module(BENCHES[name]).main(argv, prog=prog)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or "latentae bench"
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {prog} <name> [options]\n\n" + __doc__.replace("``", ""))
        return 0 if argv else 2
    name = argv[0]
    if name not in BENCHES:
        return fail(f"unknown benchmark {name!r} (benchmarks: {', '.join(BENCHES)}; {prog} --help)")
    return run(name, argv[1:], f"{prog} {name}")


__all__ = ["BENCHES", "main", "run"]
