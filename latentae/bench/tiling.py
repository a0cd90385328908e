"""Tiled vs untiled decode/encode: accuracy (PSNR, seams, tone), cost (time ratio) and peak memory.

  latentae bench tiling --vae runs/demo                        # everything, a trained VAE, photos
  latentae bench tiling --cost-only --cost-sizes 1024           # SD-size: tiled/untiled time at 1 tile of memory
  latentae bench tiling --memory-only --memory-sizes 4096       # SD-size: 4096 x 4096 decode, default settings

VAE: --vae PATH (anything latentae.io.load_vae reads); without it, the model section of
configs/sd-f8c4.yaml with RANDOM weights (said in the output: random weights make a
poor test of seams and statistics, rerun with a trained VAE).

Accuracy (--sizes), per image: encoded untiled (posterior mean), decoded untiled (the
reference) and tiled with each --modes entry:
  exact / tile  = latentae.tiling.tiled_decode(stats=...) (exact: streamed, image-wide statistics;
                  tile: each tile its own statistics),
  diffusers     = diffusers.AutoencoderKL (same weights), enable_tiling() at the same tile and overlap.
Printed: PSNR vs untiled (data range 2), max |diff|, "tone" = the largest |mean diff| over
--tile cores in 8-bit levels, "seam" = mean |diff| within 4 px of a core boundary / mean
|diff| elsewhere (1 = no seam), seconds. The tiled encoder is compared the same way on latents.

Cost (--cost-sizes): random latents, untiled decode and tiled_decode(stats="exact") with
memory = ONE TILE (the bytes of one --tile x --tile latent px tile's widest activation at
full resolution, fp32), so the kept activations mostly go to disk: each in a fresh process,
alternated --cost-repeats times; median times, their ratio, PSNR of tiled vs untiled, peak
resident memory of each process (total and extra over what it held before the call), and
the peak bytes kept in memory and on disk. Also the same for tiled_encode (--cost-encode).

Memory (--memory-sizes): one tiled_decode with default settings (memory=1.5 GiB, tile 64) in
a fresh process: peak resident memory of the whole process, time, disk used; untiled too
up to --untiled-max px.
"""

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


import numpy as np
import torch

from latentae.bench import child_env
from latentae.cli.common import Parser
import torch.nn.functional as F

from latentae.benchmarking import PeakRSS
from latentae.io import diffusers_config, load_vae
from latentae.model import ModelConfig, build_vae
from latentae.streaming import tile_bytes
from latentae.tiling import DEFAULT_MEMORY, tiled_decode, tiled_encode, windows

PHOTOS = Path("/work/shared/data/photos")


def get_vae(path: str | None, quiet: bool = False):
    if path:
        return load_vae(path), f"{path}"
    from latentae.config import config_path, from_dict, read_yaml
    from latentae.fast import optimize_for_inference

    cfg = from_dict(ModelConfig, read_yaml(config_path("sd-f8c4"))["model"], "model")
    torch.manual_seed(0)
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
    cores = [(a * f, b * f) for _, _, a, b in windows(size_latent, tile, overlap)]
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
                z = vae.encode(x).mean
                ref = vae.decode(z)
            for mode in args.modes:
                t0 = time.perf_counter()
                with torch.no_grad():
                    if mode == "diffusers":
                        y = dvae.decode(z).sample
                    else:
                        y = tiled_decode(vae, z, tile=args.tile, overlap=args.overlap, stats=mode)
                dt = time.perf_counter() - t0
                tone, seam = seam_and_tone(y - ref, size // f, args.tile, args.overlap, f)
                row = dict(image=img_name, size=size, op="decode", mode=mode, psnr=psnr(y, ref),
                           max_abs=(y - ref).abs().max().item(), tone_8bit=tone, seam=seam, seconds=dt)
                if args.encode and mode != "diffusers":
                    t0 = time.perf_counter()
                    m = tiled_encode(vae, x, tile=args.tile * f, overlap=args.overlap * f, stats=mode).mean
                    row["encode_seconds"] = time.perf_counter() - t0
                    row["encode_psnr"] = psnr(m, z, (z.max() - z.min()).item())
                rows.append(row)
                enc = f"  encode PSNR {row['encode_psnr']:6.1f} ({row['encode_seconds']:.1f}s)" if "encode_psnr" in row else ""
                print(f"{img_name[:14]:14} {size:5} {mode:9} PSNR {row['psnr']:6.1f} dB  max|d| {row['max_abs']:.1e}  "
                      f"tone {tone:5.2f}  seam {seam:5.2f}  {dt:6.1f}s{enc}", flush=True)
    print(f"\nmedian over images ({name}, tile {args.tile}, overlap {args.overlap} latent px):")
    for size in args.sizes:
        for mode in args.modes:
            sel = [r for r in rows if r["size"] == size and r["mode"] == mode]
            med = lambda k: statistics.median(r[k] for r in sel)  # noqa: E731
            enc = f", encode {med('encode_psnr'):.1f} dB" if sel and "encode_psnr" in sel[0] else ""
            print(f"  {size:5} {mode:9} decode PSNR median {med('psnr'):6.1f} dB (worst {min(r['psnr'] for r in sel):6.1f}), "
                  f"tone {med('tone_8bit'):.2f}, seam {med('seam'):.2f}, {med('seconds'):.1f}s{enc}")
    return rows


def child(args) -> None:
    """In a fresh process: one call; prints time, peak memory, kept bytes; saves the output if asked."""
    op, size, mode, memory, save = args.child
    size, memory = int(size), (None if memory == "none" else int(memory))
    vae, _ = get_vae(args.vae, quiet=True)
    f, g = vae.config.downsample_factor, torch.Generator().manual_seed(0)
    if op == "decode":
        x = torch.randn(1, vae.config.latent_channels, size // f, size // f, generator=g)
    else:
        x = torch.rand(1, 3, size, size, generator=g) * 2 - 1
    report = {}
    t0 = time.perf_counter()
    with torch.no_grad(), PeakRSS(where=True) as m:
        if mode == "untiled":
            y = vae.decode(x) if op == "decode" else vae.encode(x).mean
        else:
            tile = args.tile if op == "decode" else args.tile * f
            fn = tiled_decode if op == "decode" else (lambda *a, **k: tiled_encode(*a, **k).mean)
            y = fn(vae, x, tile=tile, stats=mode, memory=memory, report=report)
    seconds = time.perf_counter() - t0
    if save != "-":
        torch.save(y, save)
    print(json.dumps({"extra": m.peak_bytes, "total": m.peak_total_bytes, "exact": m.exact, "seconds": seconds,
                      "peak_at": m.where, **report}))


def run_child(args, op: str, size: int, mode: str, memory: int | None, save: str = "-") -> dict | None:
    cmd = [sys.executable, "-m", "latentae.bench.tiling", "--child", op, str(size), mode, "none" if memory is None else str(memory), save,
           "--tile", str(args.tile)]
    if args.vae:
        cmd += ["--vae", args.vae]
    env = child_env()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        why = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"
        print(f"  {op} {size} {mode}: FAILED: {why}", flush=True)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def gib(b: float) -> str:
    return f"{b / 2**30:5.2f} GiB"


def cost(args, vae, name) -> list[dict]:
    """Tiled (exact, one tile of memory) vs untiled: time ratio, PSNR, peak memory, fresh processes."""
    budget = tile_bytes(vae, "decode", args.tile)  # the decoder's tile, for the encode too
    rows = []
    print(f"\ncost of exact statistics ({name}, tile {args.tile} latent px, memory = one tile = {gib(budget)}; "
          f"fresh process each, {args.cost_repeats} alternations):")
    for op in ["decode"] + (["encode"] if args.cost_encode else []):
        for size in args.cost_sizes:
            runs = {"untiled": [], "exact": []}
            with tempfile.TemporaryDirectory() as tmp:
                for i in range(args.cost_repeats):
                    for mode in (("untiled", "exact") if i % 2 == 0 else ("exact", "untiled")):
                        r = run_child(args, op, size, mode, None if mode == "untiled" else budget,
                                      save=f"{tmp}/{mode}.pt" if i == 0 else "-")
                        if r is not None:
                            runs[mode].append(r)
                if not runs["untiled"] or not runs["exact"]:
                    continue
                a, b = torch.load(f"{tmp}/untiled.pt"), torch.load(f"{tmp}/exact.pt")
            med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
            row = dict(op=op, size=size, memory=budget, untiled_s=med["untiled"], tiled_s=med["exact"],
                       ratio=med["exact"] / med["untiled"], psnr=psnr(b, a, 2.0 if op == "decode" else
                                                                     (a.max() - a.min()).item()),
                       max_abs=(a - b).abs().max().item(), untiled=runs["untiled"][0], tiled=runs["exact"][0])
            rows.append(row)
            u, t = row["untiled"], row["tiled"]
            print(f"  {op} {size:5} px: tiled/untiled time {row['ratio']:.3f} ({med['exact']:.1f}s / {med['untiled']:.1f}s, "
                  f"medians of {len(runs['exact'])}/{len(runs['untiled'])}), PSNR {row['psnr']:.1f} dB, max|d| "
                  f"{row['max_abs']:.1e}\n      peak memory tiled: total {gib(t['total'])}, extra {gib(t['extra'])} "
                  + (f"(kept in memory {gib(t['peak_in_memory'])}, on disk {gib(t['peak_disk'])}); "
                     if "peak_in_memory" in t else "(one tile covers the input: the plain call ran); ")
                  + f"untiled: total {gib(u['total'])}, extra {gib(u['extra'])}", flush=True)
    return rows


def memory(args, name) -> list[dict]:
    rows = []
    print(f"\none decode with default settings ({name}; tiled: tile {args.tile}, memory {gib(DEFAULT_MEMORY)}), "
          "fresh process each:")
    for size in args.memory_sizes:
        for mode in ["exact"] + (["untiled"] if size <= args.untiled_max else []):
            r = run_child(args, "decode", size, mode, DEFAULT_MEMORY)
            if r is None:
                continue
            rows.append(dict(size=size, mode=mode, **r))
            disk = f", on disk {gib(r['peak_disk'])}" if "peak_disk" in r else ""
            print(f"  {size:5} {mode:8} process peak {gib(r['total'])}  extra {gib(r['extra'])}  {r['seconds']:7.1f}s"
                  f"{disk}" + ("" if r["exact"] else " (LOWER BOUND: hwm reset refused)"), flush=True)
            print(f"        highest polled memory at: {r['peak_at']}", flush=True)
    return rows


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = Parser(prog=prog, description=__doc__)
    p.add_argument("--vae", default=None, help="VAE to test (default: SD-size f8c4 with random weights)")
    p.add_argument("--images", default=None, help="image folder (default: /work/shared/data/photos or skimage)")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--sizes", nargs="+", type=int, default=[1024, 2048], help="image px for the accuracy runs")
    p.add_argument("--modes", nargs="+", default=["exact", "tile", "diffusers"], choices=["exact", "tile", "diffusers"])
    p.add_argument("--tile", type=int, default=64, help="latent px (the encoder gets x f)")
    p.add_argument("--overlap", type=int, default=16, help="latent px, for 'tile' and diffusers")
    p.add_argument("--no-encode", dest="encode", action="store_false", help="skip the tiled-encode comparison")
    p.add_argument("--cost-sizes", nargs="+", type=int, default=[1024])
    p.add_argument("--cost-repeats", type=int, default=2, help="fresh processes per contender, alternated")
    p.add_argument("--cost-encode", action="store_true", help="also the tiled encode's cost")
    p.add_argument("--memory-sizes", nargs="+", type=int, default=[2048, 4096])
    p.add_argument("--untiled-max", type=int, default=2048, help="largest size also measured untiled")
    p.add_argument("--accuracy-only", action="store_true")
    p.add_argument("--cost-only", action="store_true")
    p.add_argument("--memory-only", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", nargs=5, metavar=("OP", "SIZE", "MODE", "MEMORY", "SAVE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    only = [k for k in ("accuracy", "cost", "memory") if getattr(args, f"{k}_only")]
    parts = only or ["accuracy", "cost", "memory"]
    vae, name = get_vae(args.vae)
    print(f"VAE: {name}; {torch.get_num_threads()} threads")
    result = {"vae": name}
    if "accuracy" in parts:
        result["accuracy"] = accuracy(args, vae, name)
    if "cost" in parts:
        result["cost"] = cost(args, vae, name)
    if "memory" in parts:
        result["memory"] = memory(args, name)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m latentae.bench.tiling"))
