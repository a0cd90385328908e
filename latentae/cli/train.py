"""Train a KL autoencoder (the Stable Diffusion VAE family) from a YAML config.

    latentae train --config tiny-f8c4 --output-dir runs/tiny data.path=photos/
    latentae train --config sd-f8c4 --output-dir runs/sd --resume latest     # continue after a crash
    accelerate launch -m latentae.train --config sd-f8c4 --output-dir runs/sd data.path=/data/images
    torchrun --nproc_per_node 2 -m latentae.train --config tiny-f8c4 ...     # several CPU processes (gloo)
    python -m latentae.train ...  /  python train/train.py ...                # the same, other spellings

--config is a YAML file or the name of a config shipped with the package (tiny-f8c4,
tiny-f8c16, sd-f8c4, sd-f8c16, finetune-se-f8c4, finetune-eqvae-f8c4; a local file wins).
Overrides are ``section.key=value`` (values parsed as YAML), checked against the
config schema like the file itself. Commonly used: ``data.path`` (image folder,
WebDataset shard pattern ``shards/{000000..000099}.tar`` or ``pipe:`` URL),
``train.max_steps``, ``train.checkpoint_every``, ``train.init_from`` (a VAE to start
from: a path or a Hugging Face hub id), ``loss.lpips_pretrained=false`` (random LPIPS
backbone: offline tests/demos only).

--resume latest   newest complete checkpoint in OUTPUT/checkpoints (starts fresh if there is none)
--resume PATH     a checkpoint directory (or a run directory: its newest checkpoint)
--dry-run         check the config, print it resolved with the effective learning rates and
                  global batch for --num-processes N (default: $WORLD_SIZE, else 1), exit;
                  reads no data, builds no model (--output-dir is not needed)

The output folder gets config.yaml, checkpoints/step-*/ (vae.safetensors is loadable
with latentae.load_vae), data/files.bin (an image folder's file list), logs/ (TensorBoard),
samples/ (validation grids: input | reconstruction | error, 256 px per image) and export/
(a diffusers folder). The global batch is train.batch_size x train.grad_accum_steps x N.
Resuming with the same N is exact; with another N it continues (elastic: the data order
differs from an uninterrupted run, the weights do not). With train.scale_lr=true (the SD
configs) train.lr is a base rate per image (LDM's convention): the optimizer gets
train.lr x N x batch_size x grad_accum_steps.

On a shared machine: OpenMP threads sleep while they wait (OMP_WAIT_POLICY=PASSIVE,
unless set), and each process uses max(1, CPUs // local processes - data.num_workers)
torch threads, leaving a core to each data worker (--threads or OMP_NUM_THREADS wins).

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

from latentae import runtime
from latentae.cli.common import Parser, config_problem, fail, positive_int


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=__doc__)
    p.add_argument("--config", required=True, help="YAML config: a path or a packaged name (e.g. tiny-f8c4)")
    p.add_argument("--output-dir", help="run folder: checkpoints, logs, samples, export (required unless --dry-run)")
    p.add_argument("--resume", metavar="latest|PATH", help="continue from a checkpoint (see above)")
    p.add_argument("--dry-run", action="store_true", help="check and print the resolved config, then exit")
    p.add_argument("--num-processes", type=int, metavar="N", help="for --dry-run: processes of the real run "
                   "(default: $WORLD_SIZE, else 1)")  # fmt: skip
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="torch threads per process (default: OMP_NUM_THREADS if set, else the rule above)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return p


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = build_parser(prog)
    args = p.parse_intermixed_args(argv)  # overrides may come before and after the options
    if not args.dry_run and not args.output_dir:
        p.error("--output-dir is required (unless --dry-run)")
    if args.num_processes is None:
        try:
            args.num_processes = int(os.environ.get("WORLD_SIZE", "1"))
        except ValueError:
            p.error(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}")
    if args.num_processes < 1:
        p.error(f"--num-processes must be >= 1, got {args.num_processes}")
    return args


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    problem = config_problem(args.config)  # before the heavy imports: a typo fails at once
    if problem:
        return fail(problem)
    runtime.prefer_passive_waiting()  # before torch loads (the imports below)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from latentae.recipe import load_config
    from latentae.training.errors import USER_ERRORS, PeerFailedError, StopNow

    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            from latentae.training.plan import check_config, describe

            check_config(cfg)
            print(describe(cfg, args.num_processes), end="")
            return 0
        runtime.configure_threads(cfg.data.num_workers, threads=args.threads)  # the trainer logs the outcome
        from latentae.training.loop import train

        result = train(cfg, args.output_dir, resume=args.resume)
    except USER_ERRORS as e:
        return fail(e)
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
    sys.exit(main(prog="python -m latentae.cli.train"))
