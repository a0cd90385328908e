"""Evidence for the diffusability regularisers: fine-tune one VAE with and without them, compare.

    python tools/diffusability_finetune.py --out runs/difftrain                      # trains its own start
    python tools/diffusability_finetune.py --out runs/difftrain --start runs/demo/run/export \
        --steps 600 --arms base,se,eqvae,noise --se-weight 0.5

From one starting VAE (``--start``: anything ``latentae.load_vae`` reads; without it the
demo's recipe trains one from scratch for ``--start-steps``), every arm fine-tunes encoder
and decoder for the same ``--steps`` on the same photos with the same seed: ``base`` with
the plain loss, ``se`` adding the scale-equivariance term (``--se-weight``), optionally
``eqvae`` and ``noise``. Then ``latentae.compare`` measures all of them and the start on
held-out photos (``--holdout``, never trained on) at ``--eval-size`` px and this prints,
side by side, reconstruction PSNR, the latent high-frequency share (and the images'), and
the equivariance PSNR for 1/2, 1/4 scale and a 90-degree rotation, with the paired
per-image differences to ``base``. The full report is in OUT/compare/report.html.

Offline and CPU-sized (tiny f8c16 config, random LPIPS backbone, no GAN); every run
continues where it stopped when the command is repeated. Logic: ``latentae/ablation.py``.
Data: ``--data``, default ``../shared/data/photos`` beside the repository.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "photos"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/difftrain"), help="output folder (runs, comparison)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="image folder (default: %(default)s)")
    p.add_argument("--start", help="starting VAE (run dir, export, diffusers folder, LDM file); default: train one")
    p.add_argument("--start-steps", type=int, default=600, help="steps of the self-trained start (demo recipe)")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps per arm")
    p.add_argument("--arms", default="base,se", help="comma-separated, from base, se, eqvae, noise; the first is the "
                   "baseline of the paired differences (default: %(default)s)")
    p.add_argument("--se-weight", type=float, default=0.5, help="loss.scale_equivariance_weight of the se arm")
    p.add_argument("--seed", type=int, default=1, help="fine-tuning seed (data order, crops, noise), the same for every arm")
    p.add_argument("--holdout", type=int, default=8, help="held-out images for the comparison")
    p.add_argument("--eval-size", type=int, default=256, help="comparison images: shorter side -> N, centre crop N x N")
    p.add_argument("--config", type=Path, default=None, help="training config (default: configs/tiny-f8c16.yaml)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's). On a busy machine 1 can be several times faster than 2")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="more overrides for every training run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    from latentae import ablation
    from latentae.training.errors import USER_ERRORS

    if not args.data.is_dir():
        print(f"error: no image folder at {args.data}; pass --data DIR", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    config = args.config or ablation.DEFAULT_CONFIG
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ablation.ARMS]
    if not arms or unknown:
        print(f"error: --arms {args.arms!r}: unknown {unknown}; choose from {', '.join(ablation.ARMS)}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        split = ablation.split_images(args.data, args.out, holdout=args.holdout)
        print(f"{len(split.eval_files)} held-out images: {', '.join(f.name for f in split.eval_files)}")
        start = args.start
        if start is None:
            print(f"training the start VAE ({args.start_steps} steps) into {args.out / 'start'} ...", flush=True)
            start = ablation.train_start(split.train_dir, args.out / "start", steps=args.start_steps, config=config,
                                         extra=args.overrides)  # fmt: skip
        vaes = {}
        for arm in arms:
            print(f"[{time.perf_counter() - t0:5.0f} s] fine-tuning arm {arm!r} ({args.steps} steps) ...", flush=True)
            vaes[arm] = ablation.finetune(start, arm, split.train_dir, args.out / arm, steps=args.steps, config=config,
                                          seed=args.seed, se_weight=args.se_weight, extra=args.overrides)  # fmt: skip
        vaes["start"] = start
        print(f"[{time.perf_counter() - t0:5.0f} s] comparing on the held-out images ...", flush=True)
        summary = ablation.compare_vaes(vaes, split.eval_files, args.out / "compare", size=args.eval_size)
    except (*USER_ERRORS, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(ablation.format_summary(summary))
    print(f"\n{time.perf_counter() - t0:.0f} s; report: {args.out / 'compare' / 'report.html'}; "
          f"arms: {', '.join(arms)}; {args.steps} steps each from {start}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
