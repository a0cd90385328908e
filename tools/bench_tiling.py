#!/usr/bin/env python
"""Tiled vs untiled decode/encode: accuracy (PSNR, seams, tone), time and peak memory.

  python tools/bench_tiling.py --vae runs/demo                       # a trained VAE, real photos
  python tools/bench_tiling.py --sizes 1024 --num-images 2 --no-memory   # quick look
  python tools/bench_tiling.py --memory-only --memory-sizes 2048 4096    # SD-size memory check

VAE: --vae PATH (anything latentae.io.load_vae reads); without it, the model section of
configs/sd-f8c4.yaml with RANDOM weights (said in the output: random weights make a
poor test of seams and statistics, rerun with a trained VAE).
Images: --images DIR, else /work/shared/data/photos if present, else scikit-image's sample
photos; each resized (bicubic, antialiased) to every --sizes value, square.

Accuracy, per image and size: the image is encoded untiled (posterior mean), decoded
untiled (the reference) and tiled with each --modes entry:
  exact / sample / proxy / tile  = latentae.tiling.tiled_decode(stats=...),
  diffusers                      = diffusers.AutoencoderKL (same weights) with
                                   enable_tiling() at the same tile size and overlap.
Printed: PSNR vs untiled (data range 2, images in [-1, 1]), max |diff|, "tone" = the
largest |mean diff| over the tiles' cores in 8-bit levels, "seam" = mean |diff| within
4 px of a core boundary / mean |diff| elsewhere (1 = no seam), and seconds. The tiled
encoder is compared the same way on latents (PSNR over the latent's own range).

Memory (--memory-sizes): peak resident memory of one tiled_decode in a fresh child
process (kernel high-water mark): total, and extra over what the process held
before the call; untiled too up to --untiled-max px.
"""

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from latentae.fast import PeakRSS  # noqa: E402
from latentae.io import diffusers_config, load_vae  # noqa: E402
from latentae.model import ModelConfig, build_vae  # noqa: E402
from latentae.tiling import _windows, statistics_sample, tiled_decode, tiled_encode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = Path("/work/shared/data/photos")


def get_vae(path: str | None, quiet: bool = False):
    if path:
        return load_vae(path), f"{path}"
    from latentae.config import from_dict, read_yaml

    cfg = from_dict(ModelConfig, read_yaml(ROOT / "configs" / "sd-f8c4.yaml")["model"], "model")
    torch.manual_seed(0)
    from latentae.fast import optimize_for_inference

    vae = optimize_for_inference(build_vae(cfg).eval())
    if not quiet:
        print("NOTE: no --vae given: SD-size f8c4 architecture with RANDOM weights (a poor test of seams)")
    return vae, "random sd-f8c4"


def load_images(folder: str | None, n: int) -> list[tuple[str, torch.Tensor]]:
    """[(name, [1, 3, H, W] in [-1, 1])]"""
    out = []
    d = Path(folder) if folder else (PHOTOS if PHOTOS.is_dir() else None)
    if d is not None:
        from PIL import Image

        files = sorted(p for p in d.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
        if not files:
            raise SystemExit(f"no images in {d}")
        for p in files[:n]:
            a = np.array(Image.open(p).convert("RGB"))
            out.append((p.name, torch.from_numpy(a).permute(2, 0, 1)[None].float() / 127.5 - 1))
    else:
        import skimage.data

        for name in ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left")[:n]:
            a = getattr(skimage.data, name)()[..., :3]
            out.append((name, torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].float() / 127.5 - 1))
    return out


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    mse = (a.double() - b.double()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(data_range**2 / mse)


def seam_and_tone(diff: torch.Tensor, size_latent: int, tile: int, overlap: int, f: int) -> tuple[float, float]:
    """(largest |mean diff| over tile cores in 8-bit levels, near-boundary / elsewhere mean |diff|)."""
    cores = [(a * f, b * f) for _, _, a, b in _windows(size_latent, tile, overlap)]
    d = diff[0].abs().mean(0)  # [H, W]
    tone = max(diff[0, :, r0:r1, c0:c1].mean().abs().item() for r0, r1 in cores for c0, c1 in cores) * 127.5
    near = torch.zeros_like(d, dtype=torch.bool)
    for _, b in cores[:-1]:
        near[max(0, b - 4) : b + 4, :] = True
        near[:, max(0, b - 4) : b + 4] = True
    if not near.any() or near.all():
        return tone, float("nan")
    return tone, (d[near].mean() / d[~near].mean().clamp_min(1e-12)).item()


def diffusers_tiled(vae, tile: int, overlap: int):
    from diffusers import AutoencoderKL

    kw = {k: v for k, v in diffusers_config(vae.config).items() if not k.startswith("_")}
    d = AutoencoderKL(**kw).eval()
    d.load_state_dict(vae.state_dict())
    d.enable_tiling()
    f = vae.config.downsample_factor
    d.tile_latent_min_size, d.tile_sample_min_size = tile, tile * f
    d.tile_overlap_factor = overlap / tile
    return d


def accuracy(args, vae, name) -> list[dict]:
    f = vae.config.downsample_factor
    rows = []
    dvae = diffusers_tiled(vae, args.tile, args.overlap) if "diffusers" in args.modes else None
    for img_name, img in load_images(args.images, args.num_images):
        for size in args.sizes:
            x = resize(img, size)
            with torch.no_grad():
                post = vae.encode(x)
                z = post.mean
                ref = vae.decode(z)
            t, k = statistics_sample(vae, "decode", tuple(z.shape), tile=args.tile, overlap=args.overlap,
                                     stats_memory=args.stats_memory)
            print(f"{img_name[:14]:14} {size:5} stats='sample' runs {k} of {t} tiles side by side"
                  + (" (all: exact)" if k == t else ""))
            for mode in args.modes:
                t0 = time.perf_counter()
                with torch.no_grad():
                    if mode == "diffusers":
                        y = dvae.decode(z).sample
                    else:
                        y = tiled_decode(vae, z, tile=args.tile, overlap=args.overlap, stats=mode,
                                         stats_memory=args.stats_memory)
                dt = time.perf_counter() - t0
                tone, seam = seam_and_tone(y - ref, size // f, args.tile, args.overlap, f)
                row = dict(image=img_name, size=size, op="decode", mode=mode, psnr=psnr(y, ref),
                           max_abs=(y - ref).abs().max().item(), tone_8bit=tone, seam=seam, seconds=dt)
                if args.encode and mode != "diffusers":
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        m = tiled_encode(vae, x, tile=args.tile * f, overlap=args.overlap * f, stats=mode,
                                         stats_memory=args.stats_memory).mean
                    row["encode_seconds"] = time.perf_counter() - t0
                    rng = (z.max() - z.min()).item()
                    row["encode_psnr"] = psnr(m, z, rng)
                rows.append(row)
                enc = ""
                if "encode_psnr" in row:
                    enc = f"  encode PSNR {row['encode_psnr']:6.1f} ({row['encode_seconds']:.1f}s)"
                print(f"{img_name[:14]:14} {size:5} {mode:9} PSNR {row['psnr']:6.1f} dB  max|d| {row['max_abs']:.1e}  "
                      f"tone {tone:5.2f}  seam {seam:5.2f}  {dt:6.1f}s{enc}", flush=True)
    print(f"\nmedian over images ({name}, tile {args.tile}, overlap {args.overlap} latent px):")
    for size in args.sizes:
        for mode in args.modes:
            sel = [r for r in rows if r["size"] == size and r["mode"] == mode]
            med = lambda k: statistics.median(r[k] for r in sel)  # noqa: E731
            worst = min(r["psnr"] for r in sel)
            enc = f", encode {med('encode_psnr'):.1f} dB" if sel and "encode_psnr" in sel[0] else ""
            print(f"  {size:5} {mode:9} decode PSNR median {med('psnr'):6.1f} dB (worst {worst:6.1f}), "
                  f"tone {med('tone_8bit'):.2f}, seam {med('seam'):.2f}, {med('seconds'):.1f}s{enc}")
    return rows


def child_memory(args) -> None:
    """In a fresh process: peak memory of one decode of a --child-memory SIZE MODE latent."""
    size, mode = int(args.child_memory[0]), args.child_memory[1]
    vae, _ = get_vae(args.vae, quiet=True)
    f = vae.config.downsample_factor
    z = torch.randn(1, vae.config.latent_channels, size // f, size // f, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    with torch.no_grad(), PeakRSS() as m:
        if mode == "untiled":
            vae.decode(z)
        else:
            tiled_decode(vae, z, tile=args.tile, overlap=args.overlap, stats=mode, stats_memory=args.stats_memory)
    seconds = time.perf_counter() - t0
    print(json.dumps({"extra": m.peak_bytes, "total": m.peak_total_bytes, "exact": m.exact, "seconds": seconds}))


def memory(args, name) -> list[dict]:
    rows = []
    print(f"\npeak memory of one decode ({name}, tile {args.tile}, overlap {args.overlap}), fresh process each:")
    for size in args.memory_sizes:
        modes = list(args.memory_modes) + (["untiled"] if size <= args.untiled_max else [])
        res = {}
        for mode in modes:
            cmd = [sys.executable, __file__, "--child-memory", str(size), mode, "--tile", str(args.tile),
                   "--overlap", str(args.overlap)]
            cmd += ["--stats-memory", str(args.stats_memory / 2**30 if args.stats_memory else 0)]
            if args.vae:
                cmd += ["--vae", args.vae]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                why = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"
                print(f"  {size:5} {mode:9} FAILED: {why}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            res[mode] = r
            rows.append(dict(size=size, mode=mode, **r))
            print(f"  {size:5} {mode:9} total {r['total'] / 2**30:6.2f} GiB  extra {r['extra'] / 2**30:6.2f} GiB  "
                  f"{r['seconds']:7.1f}s", flush=True)
        if "untiled" in res:
            for mode in args.memory_modes:
                if mode in res:
                    pct = 100 * res[mode]["extra"] / res["untiled"]["extra"]
                    print(f"  {size:5} {mode:9} extra = {pct:.0f}% of untiled")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", default=None, help="VAE to test (default: SD-size f8c4 with random weights)")
    p.add_argument("--images", default=None, help="image folder (default: /work/shared/data/photos or skimage)")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--sizes", nargs="+", type=int, default=[1024, 2048], help="image px for the accuracy runs")
    p.add_argument("--modes", nargs="+", default=["exact", "sample", "proxy", "tile", "diffusers"],
                   choices=["exact", "sample", "proxy", "tile", "diffusers"])
    p.add_argument("--tile", type=int, default=64, help="latent px (the encoder gets x f)")
    p.add_argument("--overlap", type=int, default=16, help="latent px (the encoder gets x f)")
    p.add_argument("--stats-memory", type=float, default=2.0, help="GiB for stats='sample' (0: no limit)")
    p.add_argument("--no-encode", dest="encode", action="store_false", help="skip the tiled-encode comparison")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--memory-only", action="store_true")
    p.add_argument("--memory-sizes", nargs="+", type=int, default=[2048, 4096])
    p.add_argument("--memory-modes", nargs="+", default=["sample"], choices=["exact", "sample", "proxy", "tile"])
    p.add_argument("--untiled-max", type=int, default=2048, help="largest size also measured untiled")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child-memory", nargs=2, metavar=("SIZE", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.stats_memory = None if args.stats_memory <= 0 else int(args.stats_memory * 2**30)
    if args.child_memory:
        return child_memory(args)
    vae, name = get_vae(args.vae)
    print(f"VAE: {name}; {torch.get_num_threads()} threads")
    result = {"vae": name}
    if not args.memory_only:
        result["accuracy"] = accuracy(args, vae, name)
    if not args.no_memory:
        del vae
        result["memory"] = memory(args, name)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
