"""Benchmark one training step: latentae's trainer vs. a plain diffusers.AutoencoderKL step.

    latentae bench train                                  # tiny-f8c4, 64 px, batch 8, CPU
    latentae bench train --config sd-f8c4 --resolution 256 --batch-size 4   # on a GPU

    latentae bench train --mixed-precision bf16 train.compile=true    # compiles ours; the reference stays eager

Both sides run the same work on the same batch: VAE forward/backward with the same
VAELoss (L1 + LPIPS + KL + adaptive-weight GAN, all active), the discriminator step,
Adam, gradient clipping and EMA as the config says. "ours" is the real
``Trainer.one_step`` (the step plus its agreement: finite check, logs, stop/checkpoint
flags) fed a fixed batch; "reference" is the loop one would write by hand around
``diffusers.AutoencoderKL`` (eager, torch's default Adam, no logging at all).

Each side runs in its own subprocess (so memory is measured cleanly), ``--rounds`` times,
alternating, and the best round counts. Printed per side: milliseconds per step, img/s
(wall clock, and per CPU-second: on a shared machine the steadier measure of work; run
with OMP_NUM_THREADS=1 there, or spinning threads inflate it), peak memory of the step
(CUDA: max_memory_allocated; CPU: the peak resident set, Linux; both counted above what
was allocated before the first step) and host syncs per step (counted by
``latentae.training.host_syncs.HostSyncCounter`` over extra, untimed steps), then the
ratios ours / reference (speed > 1 and memory < 1 are better).
The LPIPS backbone is random (no download), which costs the same as the real one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from latentae.bench import child_env
from latentae.cli.common import Parser



def _peak_rss_reset() -> int:
    """Reset the kernel's peak-RSS mark (Linux), return the current RSS in bytes."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_kb("VmRSS") * 1024


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _config(args):
    from latentae.recipe import load_config

    overrides = [
        "loss.lpips_pretrained=false",
        "loss.disc_start=0",  # the whole step: GAN term, adaptive weight, discriminator
        "loss.disc_train_start=0",
        f"data.resolution={args.resolution}",
        f"train.batch_size={args.batch_size}",
        "train.num_val_images=0",
        "train.warmup_steps=0",
        f"train.mixed_precision={args.mixed_precision}",
        *args.overrides,
    ]
    return load_config(args.config, overrides)


class _KLView:
    """diffusers' posterior -> the per-element kl() VAELoss expects (same formula as ours)."""

    def __init__(self, dist):
        self.mean, self.logvar = dist.mean, dist.logvar

    def kl(self):
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)


def run_variant(args) -> dict:
    import torch

    torch.manual_seed(0)
    cfg = _config(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(args.batch_size, 3, args.resolution, args.resolution, generator=g) * 2 - 1).to(device)

    if args.variant == "ours":
        step_fn, sync = _ours(cfg, x, device)
    else:
        step_fn, sync = _reference(cfg, x, device)
    # Memory: the peak over warm-up and timed steps above what was allocated before the
    # first step (activations, gradients, optimizer state: everything a step adds).
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _peak_rss_reset()
    for _ in range(args.warmup):
        step_fn()
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        step_fn()
    sync()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else _status_kb("VmHWM") * 1024 - base
    # Host syncs, over separate steps: the counter intercepts every torch call, which costs time.
    from latentae.training.host_syncs import HostSyncCounter

    counted = max(1, min(args.steps, 3))
    with HostSyncCounter() as syncs:
        for _ in range(counted):
            step_fn()
    return {
        "img_per_s": args.steps * args.batch_size / seconds,
        "cpu_img_per_s": args.steps * args.batch_size / cpu_seconds,
        "ms_per_step": 1000.0 * seconds / args.steps,
        "peak_bytes": peak,
        "syncs_per_step": syncs.count / counted,
        "sync_kinds": {k: v / counted for k, v in syncs.by_kind.items()},
        "device": str(device),
    }


def _ours(cfg, x, device):
    import itertools

    import torch
    from PIL import Image

    from latentae.config import replace
    from latentae.training.loop import Trainer

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    data = tmp / "data"
    data.mkdir()
    for i in range(4):  # the trainer checks its data source at start-up; the step uses the fixed batch
        Image.new("RGB", (cfg.data.resolution,) * 2, (i * 40, 80, 120)).save(data / f"{i}.png")
    cfg = replace(cfg, data=replace(cfg.data, path=str(data), num_val=1, num_workers=0))
    trainer = Trainer(cfg, tmp / "run")
    batch = {"image": x, "key": [""] * len(x), "skipped": []}
    trainer.batches = itertools.repeat(batch)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return trainer.one_step, sync


def _reference(cfg, x, device):
    import copy

    import torch
    from diffusers import AutoencoderKL as DiffusersVAE

    from latentae.discriminator import build_discriminator
    from latentae.io import diffusers_config
    from latentae.losses import VAELoss
    from latentae.model import build_vae
    from latentae.training.config import effective_lrs

    tc = cfg.train
    dcfg = {k: v for k, v in diffusers_config(cfg.model).items() if not k.startswith("_")}
    vae = DiffusersVAE(**dcfg)
    vae.load_state_dict(build_vae(cfg.model).state_dict())  # same starting weights as ours
    vae.to(device).train()
    loss_fn = VAELoss(cfg.loss).to(device)
    disc = build_discriminator(cfg.discriminator).to(device).train()
    betas = (tc.betas[0], tc.betas[1])
    lrs = effective_lrs(tc, 1)  # the same rates as ours (train.scale_lr)
    opt = torch.optim.Adam(list(vae.parameters()) + loss_fn.trainable_parameters(), lr=lrs.vae, betas=betas)
    dopt = torch.optim.Adam(disc.parameters(), lr=lrs.disc, betas=betas)
    ema = copy.deepcopy(vae).requires_grad_(False) if tc.ema_decay > 0 else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.mixed_precision)
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)  # noqa: E731
    gen = torch.Generator(device=device).manual_seed(0)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            dist = vae.encode(x).latent_dist
            rec = vae.decode(dist.sample(generator=gen)).sample
            loss, _ = loss_fn.generator_loss(
                x, rec, _KLView(dist), step=1, last_layer=vae.decoder.conv_out.weight, discriminator=disc
            )
        loss.backward()
        if tc.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(vae.parameters(), tc.clip_grad_norm)
        opt.step()
        dopt.zero_grad(set_to_none=True)
        with autocast():
            d_loss, _ = loss_fn.discriminator_loss(x, rec, step=1, discriminator=disc)
        d_loss.backward()
        if tc.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(disc.parameters(), tc.clip_grad_norm)
        dopt.step()
        if ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.parameters()), list(vae.parameters()), 1 - tc.ema_decay)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return step, sync


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = Parser(prog=prog, description=__doc__)
    p.add_argument("--config", default="tiny-f8c4", help="a YAML path or a packaged config name (default tiny-f8c4)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--mixed-precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per side; the best counts")
    p.add_argument("--variant", choices=["ours", "reference"], help=argparse.SUPPRESS)  # internal: one side
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_args(argv)

    if args.variant:
        import warnings

        warnings.simplefilter("ignore")
        print(json.dumps(run_variant(args)))
        return 0

    env = child_env()
    best: dict[str, dict] = {}
    for r in range(args.rounds):
        for variant in ("ours", "reference"):
            cmd = [sys.executable, "-m", "latentae", "bench", "train", "--variant", variant,
                   *(argv if argv is not None else sys.argv[1:])]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(proc.stderr[-4000:], file=sys.stderr)
                return 1
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"round {r + 1} {variant:9s}: {_row(res)}")
            prev = best.get(variant, res)
            best[variant] = res | {k: max(res[k], prev[k]) for k in ("img_per_s", "cpu_img_per_s")} | {
                "ms_per_step": min(res["ms_per_step"], prev["ms_per_step"]),
                "peak_bytes": min(res["peak_bytes"], prev["peak_bytes"]),
            }
    o, ref = best["ours"], best["reference"]
    print(
        f"\n{o['device']}, {Path(args.config).name}, {args.resolution} px, batch {args.batch_size}, "
        f"mixed_precision={args.mixed_precision}"
        + (f", overrides {' '.join(args.overrides)}" if args.overrides else "")
    )
    print(f"ours      : {_row(o)}   per step: {o['sync_kinds']}")
    print(f"reference : {_row(ref)}   (diffusers.AutoencoderKL, eager)")
    print(
        f"speed ratio (ours / reference): {o['img_per_s'] / ref['img_per_s']:.3f}x wall-clock, "
        f"{o['cpu_img_per_s'] / ref['cpu_img_per_s']:.3f}x per CPU-second   "
        f"memory ratio: {o['peak_bytes'] / max(ref['peak_bytes'], 1):.3f}x   "
        f"host syncs per step: {o['syncs_per_step']:g} vs {ref['syncs_per_step']:g}"
    )
    return 0


def _row(res: dict) -> str:
    return (
        f"{res['ms_per_step']:9.1f} ms/step {res['img_per_s']:8.2f} img/s   "
        f"peak {res['peak_bytes'] / 2**20:8.1f} MiB   "
        f"{res['syncs_per_step']:g} host syncs/step"
    )


if __name__ == "__main__":
    sys.exit(main(prog="python -m latentae.bench.train"))
