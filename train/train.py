"""Train a KL autoencoder (the Stable Diffusion VAE family) from a YAML config.

    accelerate launch train/train.py --config configs/sd-f8c4.yaml --output-dir runs/sd \\
        data.path=/data/images train.max_steps=200000
    python train/train.py --config configs/tiny-f8c4.yaml --output-dir runs/tiny data.path=photos/
    python train/train.py --config ... --output-dir runs/sd --resume latest     # continue after a crash

Overrides are ``section.key=value`` (values parsed as YAML), checked against the
config schema like the file itself. Commonly used: ``data.path`` (image folder,
WebDataset shard pattern ``shards/{000000..000099}.tar`` or ``pipe:`` URL),
``train.max_steps``, ``train.checkpoint_every``, ``loss.lpips_pretrained=false``
(random LPIPS backbone: offline tests/demos only).

--resume latest   newest complete checkpoint in OUTPUT/checkpoints (starts fresh if there is none)
--resume PATH     a checkpoint directory (or a run directory: its newest checkpoint)

The output folder gets config.yaml, checkpoints/step-*/ (vae.safetensors is loadable
with latentae.load_vae), logs/ (TensorBoard), samples/ (validation grids) and export/
(a diffusers folder). Multi-GPU: ``accelerate launch --num_processes N``; several CPU
processes (gloo): ``torchrun --nproc_per_node N train/train.py ...``. The global batch
is train.batch_size x train.grad_accum_steps x N; resuming needs the same N.

Exit status 2 with a one-line "error: ..." for anything the user has to fix (config
keys and values, data path, missing LPIPS weights, init weights, checkpoints, NaN loss).
"""

from __future__ import annotations

import argparse
import logging
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--output-dir", required=True, help="run folder: checkpoints, logs, samples, export")
    p.add_argument("--resume", metavar="latest|PATH", help="continue from a checkpoint (see above)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Imported after argument parsing so --help is instant.
    from latentae.recipe import load_config
    from latentae.trainer import USER_ERRORS, train

    try:
        cfg = load_config(args.config, args.overrides)
        result = train(cfg, args.output_dir, resume=args.resume)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: step {result.step}; checkpoint {result.checkpoint}; export {result.export_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
