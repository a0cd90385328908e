#!/usr/bin/env python
"""Export a VAE as a diffusers folder or an LDM (CompVis) single .safetensors file.

SOURCE is anything latentae reads: a training run or checkpoint folder (EMA weights unless
--no-ema), a diffusers folder, an LDM single file (.safetensors), or a .ckpt/.pt read with
weights_only (never a full unpickle).

Examples:
  python tools/export.py runs/demo --out vae-diffusers --format diffusers
  python tools/export.py runs/demo --out vae.safetensors --format ldm --ldm-prefix first_stage_model.
  python tools/export.py vae-diffusers --out vae-sd3 --format diffusers --scaling-factor 1.5305 --shift-factor 0.0609

diffusers output: AutoencoderKL.from_pretrained(OUT). ldm output: what ComfyUI / A1111 load, and
AutoencoderKL.from_single_file(OUT, config=<a diffusers folder>) for non-SD architectures.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentae.config import ConfigError  # noqa: E402
from latentae.export import export_vae  # noqa: E402
from latentae.io import WeightsError  # noqa: E402
from latentae.recipe import load_config  # noqa: E402


def floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="checkpoint / run dir / diffusers folder / LDM file / weights-only pickle")
    p.add_argument("--out", required=True, help="output folder (diffusers) or .safetensors file (ldm)")
    p.add_argument("--format", choices=["diffusers", "ldm"], required=True)
    p.add_argument("--scaling-factor", type=float, help="set scaling_factor (default: keep the source's)")
    p.add_argument("--shift-factor", type=float, help="set shift_factor (SD3 / FLUX style)")
    p.add_argument("--latents-mean", type=floats, help="per-channel means, comma separated")
    p.add_argument("--latents-std", type=floats, help="per-channel stds, comma separated")
    p.add_argument("--ldm-prefix", default="", help="key prefix for ldm, e.g. first_stage_model.")
    p.add_argument("--no-ema", action="store_true", help="from a training checkpoint: export raw, not EMA, weights")
    p.add_argument("--config", help="YAML whose model section gives the architecture (for files without one)")
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config).model if a.config else None
        out = export_vae(
            a.source, a.out, a.format,
            scaling_factor=a.scaling_factor, shift_factor=a.shift_factor,
            latents_mean=a.latents_mean, latents_std=a.latents_std,
            ldm_prefix=a.ldm_prefix, ema=not a.no_ema, config=cfg,
        )
    except (WeightsError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.format} export to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
