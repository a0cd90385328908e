"""The ``latentae`` command: one entry point, a subcommand per job.

    latentae train   --config tiny-f8c4 --output-dir runs/t data.path=photos/
    latentae encode  --vae runs/t --data photos/ --out latents/
    latentae stats   latents/ --write-config runs/t/export
    latentae compare --vae sd=stabilityai/sd-vae-ft-mse --vae ours=runs/t --data photos/ --out reports/cmp
    latentae export  runs/t --out vae.safetensors --format ldm
    latentae bench   inference|tiling|train|encode|data|latents|busy ...
    latentae demo    --output-dir runs/demo

Each subcommand lives in ``latentae/cli/<name>.py`` with ``build_parser()`` and
``main(argv) -> int``; ``train/train.py`` and ``tools/*.py`` in a checkout are thin scripts
over the same functions. Module forms for launchers: ``python -m latentae <command> ...``,
``python -m latentae.train ...`` (so ``accelerate launch -m latentae.train`` and
``torchrun -m latentae.train`` work from an installed package). The dispatcher imports
only the chosen command, so ``latentae --help`` and argument errors are instant.
"""

from __future__ import annotations

import importlib
import sys

from latentae import __version__
from latentae.cli.common import fail

# name -> (module, one line of help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("latentae.cli.train", "train a VAE from a YAML config (single process, accelerate or torchrun)"),
    "encode": ("latentae.cli.encode", "encode an image dataset to latents (WebDataset shards + manifest)"),
    "stats": ("latentae.cli.stats", "statistics of encoded latents -> scaling_factor / shift_factor"),
    "compare": ("latentae.cli.compare", "compare VAEs on the same images: metrics, latent health, HTML report"),
    "export": ("latentae.cli.export", "export a VAE as a diffusers folder or an LDM (ComfyUI/A1111) file"),
    "bench": ("latentae.cli.bench", "benchmarks: inference, tiling, train, encode, data, latents, busy"),
    "demo": ("latentae.cli.demo", "train a tiny VAE on bundled photos in a few CPU minutes, offline"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: latentae <command> [options]   (latentae <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", f"latentae {__version__}. Also: python -m latentae <command>; python -m latentae.train "
              "(accelerate launch -m latentae.train, torchrun -m latentae.train)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"latentae {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        return fail(f"unknown command {name!r} (commands: {', '.join(COMMANDS)}; latentae --help)")
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(argv[1:], prog=f"latentae {name}")


__all__ = ["COMMANDS", "main"]
