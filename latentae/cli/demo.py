"""Train a tiny VAE on CPU in a few minutes, offline, and export it (what `make demo` runs).

    latentae demo --output-dir runs/demo
    latentae demo --output-dir runs/demo --steps 3000 train.batch_size=16   # longer / other overrides
    python tools/demo.py --output-dir runs/demo                            # the same, from a checkout

What it does:
  1. writes scikit-image's bundled sample photos (astronaut, coffee, chelsea, rocket,
     textures ...; no download) as PNGs into OUTPUT/data/ (shorter side 256 px);
  2. trains the packaged tiny-f8c16 config (16 latent channels, the SD3/FLUX layout:
     sharper than 4 channels after a few minutes) on random 64 px crops of them, through
     the same library call as `latentae train` (latentae.training.loop.train), with the
     perceptual loss on a RANDOM LPIPS AlexNet backbone (loss.lpips_pretrained=false: the
     torchvision weights are not downloaded; the term then means little, see the notice);
  3. leaves TensorBoard logs, validation grids (input | reconstruction | error) and a
     diffusers export in OUTPUT/run/, and prints where everything is.

Re-running continues the same run (--resume latest), so an interrupted demo picks up
where it stopped; --fresh deletes the old run first. On a busy machine it behaves like
`latentae train` (sleeping OpenMP waits, a thread count that leaves the data worker a core).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from latentae import runtime
from latentae.cli.common import Parser, config_problem, fail, positive_int

# (name, loader) of scikit-image photos that ship inside the package (no pooch download).
SAMPLES = (
    "astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
    "colorwheel", "logo", "brick", "grass", "gravel", "camera", "coins", "moon", "page", "text", "clock",
)  # fmt: skip
DEFAULT_CONFIG = "tiny-f8c16"


def write_sample_photos(folder: Path, shorter_side: int = 256) -> list[Path]:
    """scikit-image's bundled photos -> PNGs with the given shorter side; returns the files."""
    import numpy as np
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    arrays = {name: getattr(skimage.data, name)() for name in SAMPLES}
    arrays["motorcycle"] = skimage.data.stereo_motorcycle()[0]
    written = []
    for name, a in arrays.items():
        img = Image.fromarray(np.asarray(a))
        img = img.convert("RGBA").convert("RGB") if img.mode in ("RGBA", "LA", "P") else img.convert("RGB")
        w, h = img.size
        s = shorter_side / min(w, h)
        img = img.resize((max(shorter_side, round(w * s)), max(shorter_side, round(h * s))), Image.Resampling.LANCZOS)
        path = folder / f"{name}.png"
        if not path.exists():
            img.save(path)
        written.append(path)
    return written


def demo_overrides(data: Path, steps: int) -> list[str]:
    """The demo's recipe on top of its config (also what `latentae bench busy` trains)."""
    return [
        f"data.path={data}",
        "data.resize_shorter=false",  # random 64 px crops of the 256 px photos: more variety than whole images
        "loss.lpips_pretrained=false",
        "loss.lpips_net=alex",  # a random backbone means little anyway; AlexNet costs ~10x less than VGG on CPU
        f"train.max_steps={steps}",
        "train.lr=1.0e-3",  # a few hundred steps: measured ~1 dB PSNR better than the config's 2e-4
        # the GAN starts at 75% of the run, the discriminator trains from 50%
        f"loss.disc_start={steps * 3 // 4}",
        f"loss.disc_train_start={steps // 2}",
        "train.checkpoint_every=200",
    ]


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=__doc__)
    p.add_argument("--output-dir", default="runs/demo", help="demo folder (data/ and run/ go inside)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="model/training config: a path or a packaged name")
    p.add_argument("--steps", type=positive_int, default=800, help="optimizer steps (~3-5 minutes on 2 CPU cores)")
    p.add_argument("--fresh", action="store_true", help="delete a previous demo run instead of continuing it")
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="torch threads (default: OMP_NUM_THREADS if set, else as `latentae train`)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="more config overrides")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    problem = config_problem(args.config)  # before the heavy imports: a typo fails at once
    if problem:
        return fail(problem)
    runtime.prefer_passive_waiting()  # before torch loads (the imports below)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from latentae.recipe import load_config
    from latentae.training.errors import USER_ERRORS
    from latentae.training.loop import train

    out = Path(args.output_dir)
    data, run = out / "data", out / "run"
    try:
        cfg = load_config(args.config, [*demo_overrides(data, args.steps), *args.overrides])
        if args.fresh:
            shutil.rmtree(run, ignore_errors=True)
        files = write_sample_photos(data)
    except (*USER_ERRORS, OSError) as e:  # OSError: the output folder cannot be written
        return fail(e)
    print(f"demo data: {len(files)} scikit-image sample photos in {data}")
    print(
        "NOTICE: offline demo: the perceptual (LPIPS) term uses a RANDOM AlexNet backbone "
        "(loss.lpips_pretrained=false), so it is not a perceptual metric here. For real training put "
        "torchvision's vgg16 weights in place (the error message of lpips_pretrained=true says where)."
    )
    try:
        runtime.configure_threads(cfg.data.num_workers, threads=args.threads)  # the trainer logs the outcome
        result = train(cfg, run, resume="latest")
    except USER_ERRORS as e:
        return fail(e)
    m = result.metrics
    print("\ndemo finished")
    print(f"  steps:           {result.step}")
    if m:
        print("  validation:      " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(m.items())))
    print(f"  checkpoints:     {run / 'checkpoints'}   (latentae.load_vae('{run}') reads the newest)")
    print(f"  samples (PNG):   {run / 'samples'}   (rows: input | reconstruction | error)")
    print(f"  TensorBoard:     tensorboard --logdir {run / 'logs'}")
    print(f"  diffusers VAE:   {result.export_dir}   (diffusers.AutoencoderKL.from_pretrained)")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m latentae.cli.demo"))
