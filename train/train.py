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
--dry-run         check the config, print it resolved with the effective learning rates and
                  global batch for --num-processes N (default: $WORLD_SIZE, else 1), exit;
                  reads no data, builds no model (--output-dir is not needed)

The output folder gets config.yaml, checkpoints/step-*/ (vae.safetensors is loadable
with latentae.load_vae), data/files.bin (an image folder's file list), logs/ (TensorBoard),
samples/ (validation grids) and export/ (a diffusers folder). Multi-GPU: ``accelerate
launch --num_processes N``; several CPU processes (gloo): ``torchrun --nproc_per_node N
train/train.py ...``. The global batch is train.batch_size x train.grad_accum_steps x N.
Resuming with the same N is exact; with another N it continues (elastic: the data order
differs from an uninterrupted run, the weights do not). With train.scale_lr=true (the SD
configs) train.lr is a base rate per image (LDM's convention): the optimizer gets
train.lr x N x batch_size x grad_accum_steps.

Preemption: SIGTERM or SIGUSR1 (train.stop_signals) on any process makes every process
finish the current optimizer step, write one checkpoint of it and exit 0 ("stopped at
step N"); run the same command with --resume latest to continue.

Exit status: 0 done or stopped; 2 with a one-line "error: ..." for anything the user has
to fix (config keys and values, data path, missing LPIPS weights, init weights,
checkpoints, NaN loss); 1 when another process failed (its message is printed) or on an
unexpected error (traceback); 128 + signal number after a second stop signal (no checkpoint).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--output-dir", help="run folder: checkpoints, logs, samples, export (required unless --dry-run)")
    p.add_argument("--resume", metavar="latest|PATH", help="continue from a checkpoint (see above)")
    p.add_argument("--dry-run", action="store_true", help="check and print the resolved config, then exit")
    p.add_argument("--num-processes", type=int, metavar="N", help="for --dry-run: processes of the real run "
                   "(default: $WORLD_SIZE, else 1)")  # fmt: skip
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    args = p.parse_intermixed_args(argv)  # overrides may come before and after the options
    if not args.dry_run and not args.output_dir:
        p.error("--output-dir is required (unless --dry-run)")
    if args.num_processes is None:
        args.num_processes = int(os.environ.get("WORLD_SIZE", "1"))
    if args.num_processes < 1:
        p.error(f"--num-processes must be >= 1, got {args.num_processes}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Imported after argument parsing so --help is instant.
    from latentae.recipe import load_config
    from latentae.training.errors import USER_ERRORS, PeerFailedError, StopNow

    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            from latentae.training.plan import check_config, describe

            check_config(cfg)
            print(describe(cfg, args.num_processes), end="")
            return 0
        from latentae.training.loop import train

        result = train(cfg, args.output_dir, resume=args.resume)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PeerFailedError as e:  # the failed rank printed its own error (and traceback)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except StopNow as e:
        print(f"error: {e}", file=sys.stderr)
        return 128 + e.signum
    if result.stopped:
        print(f"stopped at step {result.step} ({result.stopped}); checkpoint {result.checkpoint}")
    else:
        print(f"done: step {result.step}; checkpoint {result.checkpoint}; export {result.export_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
