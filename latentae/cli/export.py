"""Export a VAE as a diffusers folder or an LDM (CompVis) single .safetensors file.

SOURCE is anything latentae reads: a training run or checkpoint folder (EMA weights unless
--no-ema), a diffusers folder, an LDM single file (.safetensors), a .ckpt/.pt read with
weights_only (never a full unpickle), or a Hugging Face hub id (the local cache first).

Examples:
  latentae export runs/demo --out vae-diffusers --format diffusers
  latentae export runs/demo --out vae.safetensors --format ldm      # ComfyUI models/vae/, A1111 models/VAE/
  latentae export vae-diffusers --out vae-sd3 --format diffusers --scaling-factor 1.5305 --shift-factor 0.0609
  python tools/export.py ...                                         # the same, from a checkout

diffusers output: AutoencoderKL.from_pretrained(OUT). ldm output: the standalone VAE file
that ComfyUI and A1111 load, with NO key prefix (ComfyUI's VAE loader rejects a standalone
file whose keys start with first_stage_model.), and what
AutoencoderKL.from_single_file(OUT, config=<a diffusers folder>) reads for non-SD
architectures. --ldm-prefix first_stage_model. is only for weights that go INTO a full
checkpoint (merged with a UNet and text encoders), where the VAE lives under that prefix.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from latentae import runtime
from latentae.cli.common import Parser, config_problem, fail, vae_errors, vae_source_problem


def floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=__doc__)
    p.add_argument("source", help="checkpoint / run dir / diffusers folder / LDM file / weights-only pickle / hub id")
    p.add_argument("--out", required=True, help="output folder (diffusers) or .safetensors file (ldm)")
    p.add_argument("--format", choices=["diffusers", "ldm"], required=True)
    p.add_argument("--scaling-factor", type=float, help="set scaling_factor (default: keep the source's)")
    p.add_argument("--shift-factor", type=float, help="set shift_factor (SD3 / FLUX style)")
    p.add_argument("--latents-mean", type=floats, help="per-channel means, comma separated")
    p.add_argument("--latents-std", type=floats, help="per-channel stds, comma separated")
    p.add_argument("--ldm-prefix", default="",
                   help="key prefix for --format ldm. Default none: the standalone VAE file ComfyUI and A1111 load. "
                        "'first_stage_model.' only to merge the VAE into a full SD checkpoint")
    p.add_argument("--no-ema", action="store_true", help="from a training checkpoint: export raw, not EMA, weights")
    p.add_argument("--config", help="YAML (path or packaged name) whose model section gives the architecture "
                   "(for files without one)")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = build_parser(prog)
    a = p.parse_args(argv)
    if a.format == "ldm" and Path(a.out).suffix != ".safetensors":
        p.error(f"--out for --format ldm must end in .safetensors, got {a.out}")
    problem = vae_source_problem(a.source) or config_problem(a.config)  # before the heavy imports
    if problem:
        return fail(problem)
    runtime.prefer_passive_waiting()  # before torch loads (the imports below)
    from latentae.export import export_vae
    from latentae.recipe import load_config

    try:
        cfg = load_config(a.config).model if a.config else None
        out = export_vae(
            a.source, a.out, a.format,
            scaling_factor=a.scaling_factor, shift_factor=a.shift_factor,
            latents_mean=a.latents_mean, latents_std=a.latents_std,
            ldm_prefix=a.ldm_prefix, ema=not a.no_ema, config=cfg,
        )  # fmt: skip
    except (*vae_errors(), ValueError, OSError) as e:
        return fail(e)
    print(f"wrote {a.format} export to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m latentae.cli.export"))
