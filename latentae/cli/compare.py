"""Compare VAEs side by side on the same images: metrics, latent health and an HTML report.

    latentae compare --vae sd=stabilityai/sd-vae-ft-mse --vae ours=runs/demo --data photos/ --out reports/cmp [--size 256]
    python tools/compare.py ...                              # the same, from a checkout

Each --vae is NAME=PATH, PATH anything latentae.io.load_vae reads (training run or
checkpoint folder, diffusers folder, LDM .safetensors, weights-only .ckpt/.pt, a Hugging
Face hub id: the local cache first). The first VAE is the baseline for the paired
differences. --data is an image folder (recursive) or WebDataset shards. Writes
OUT/metrics.csv (per image x VAE, streamed), OUT/metrics.json (per image, aggregates with
95% Student-t intervals, paired differences, rFID, latent health, the dtype each VAE
computed in) and OUT/report.html (self-contained: rate-distortion plot, per-image
distributions, spectra, gallery).

Metrics: PSNR, SSIM, MS-SSIM (images >= 176 px), LPIPS-VGG/-AlexNet, rFID, and the latent
rate in bits per pixel (latent elements x --latent-bits / pixels), so a 16-channel VAE is
compared at its real rate. Diffusability: the share of the latent's energy above half its
Nyquist frequency next to the image's, and the equivariance PSNR of decode(T(z)) vs T(x)
for T = area downsampling (--eq-scales) and a 90-degree rotation (latentae.diffusability).

LPIPS and rFID need pretrained backbones on disk (nothing is downloaded): by default
they are skipped with a notice naming the missing file; --offline (or --lpips random /
--fid random) runs them on seeded random backbones, clearly labelled as not-a-metric,
for tests and demos.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from latentae import runtime
from latentae.cli.common import Parser, fail, vae_errors, vae_source_problem

# latentae.health.DEFAULT_ACTIVE_KL (nats per latent element; equal by test), spelled here so that
# parsing the arguments imports no torch
DEFAULT_ACTIVE_KL = 0.01



def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=__doc__)
    p.add_argument("--vae", action="append", required=True, metavar="NAME=PATH", help="a VAE to compare (repeat)")
    p.add_argument("--data", required=True, help="image folder (recursive) or WebDataset shard pattern")
    p.add_argument("--out", required=True, type=Path, help="report directory (created)")
    geo = p.add_mutually_exclusive_group()
    geo.add_argument("--size", type=int, help="resize the shorter side to N and centre-crop NxN")
    geo.add_argument("--crop", type=int, help="centre-crop NxN at native resolution (smaller images are skipped)")
    p.add_argument("--tile", action="store_true", help="tiled encode/decode (large images, bounded memory)")
    p.add_argument("--tile-size", type=int, default=512, help="tile side in image pixels (default 512)")
    p.add_argument("--tile-overlap", type=int, default=128, help="tile overlap in image pixels (default 128)")
    p.add_argument("--lpips", choices=["auto", "pretrained", "random", "off"], default="auto",
                   help="auto: pretrained if on disk, else skipped with a notice (default)")
    p.add_argument("--fid", choices=["auto", "pretrained", "random", "off"], default="auto",
                   help="rFID with torchvision Inception-v3; same choices as --lpips")
    p.add_argument("--lpips-random", action="store_true", help="same as --lpips random")
    p.add_argument("--offline", action="store_true", help="random LPIPS and Inception backbones (tests/demos only)")
    p.add_argument("--max-images", type=int, help="stop after N images")
    p.add_argument("--max-report-images", type=int, default=24, help="gallery entries in report.html (default 24)")
    p.add_argument("--thumb-size", type=int, default=256, help="gallery thumbnail size in pixels (default 256)")
    p.add_argument("--thumb-format", choices=["jpeg", "webp", "png"], default="jpeg",
                   help="gallery thumbnails (default jpeg: q90 4:4:4, heat maps q75; zoomed crops and latents are always PNG)")
    p.add_argument("--thumb-quality", type=int, default=90, help="JPEG/WebP quality 1-100 (default 90)")
    p.add_argument("--eq-scales", type=int, nargs="*", default=[2, 4], metavar="S",
                   help="equivariance PSNR at 1/S scale for each S (default 2 4; none: --eq-scales)")
    p.add_argument("--no-eq-rotation", action="store_true", help="skip the 90-degree rotation equivariance PSNR")
    p.add_argument("--active-kl", type=float, default=DEFAULT_ACTIVE_KL,
                   help=f"a latent channel is active if its KL per element exceeds this many nats (default {DEFAULT_ACTIVE_KL})")
    p.add_argument("--latent-bits", type=int, default=16, choices=[8, 16, 32], help="bits per stored latent element (default 16)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="VAE compute dtype")
    p.add_argument("--seed", type=int, default=0, help="seed of the posterior samples used for latent statistics")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = build_parser(prog)
    a = p.parse_args(argv)
    runtime.prefer_passive_waiting()  # before torch loads (latentae.compare imports it)
    from latentae.compare import CompareConfig, format_table, parse_vae_arg, run_compare
    from latentae.sources import check_path, expand_shards, is_shard_source

    # Cheap checks before any model loads: a typo in a path is one line, not a traceback.
    try:
        vaes = [parse_vae_arg(v) for v in a.vae]
    except ValueError as e:
        p.error(str(e))
    for name, path in vaes:
        problem = vae_source_problem(path)
        if problem:
            return fail(f"--vae {name}: {problem}")
    try:  # the data layer's own start-up checks (no listing of a folder yet)
        if is_shard_source(check_path(a.data)):
            expand_shards(a.data)
    except (FileNotFoundError, ValueError) as e:
        return fail(f"--data: {e}")
    if a.out.exists() and not a.out.is_dir():
        return fail(f"--out is a file, not a folder: {a.out}")
    import torch

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    lpips = "random" if (a.offline or a.lpips_random) else a.lpips
    fid = "random" if a.offline else a.fid
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        cfg = CompareConfig(
            size=a.size, crop=a.crop, tile=a.tile, tile_size=a.tile_size, tile_overlap=a.tile_overlap,
            lpips=lpips, fid=fid, max_images=a.max_images, max_report_images=a.max_report_images,
            thumb_size=a.thumb_size, thumb_format=a.thumb_format, thumb_quality=a.thumb_quality,
            equivariance_scales=tuple(a.eq_scales), equivariance_rotation=not a.no_eq_rotation,
            active_kl=a.active_kl, latent_bits=a.latent_bits,
            device=device, dtype=a.dtype, seed=a.seed,
        )  # fmt: skip
    except ValueError as e:
        p.error(str(e))

    def progress(n: int, key: str) -> None:
        print(f"\r[{n}] {key[:60]:<60}", end="", file=sys.stderr, flush=True)

    from latentae.perceptual import MissingWeightsError
    from latentae.precision import PrecisionError

    try:
        summary = run_compare(vaes, a.data, a.out, cfg, progress=progress)
    except (*vae_errors(), MissingWeightsError, PrecisionError) as e:
        print(file=sys.stderr)
        return fail(e)
    print(file=sys.stderr)
    for n in summary["notices"]:
        print(f"NOTE: {n}", file=sys.stderr)
    print(format_table(summary))
    for v in summary["vaes"]:
        pr = v["precision"]
        up = f" ({', '.join(pr['upcast_to_float32'])} in float32 after overflowing)" if pr["upcast_to_float32"] else ""
        print(f"{v['name']}: computed in {pr['compute_dtype']}{up}")
    print(f"\n{summary['interval']}")
    print(f"wrote {a.out / 'metrics.csv'}, {a.out / 'metrics.json'}, {a.out / 'report.html'}")
    return 130 if summary["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m latentae.cli.compare"))
