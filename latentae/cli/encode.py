"""Encode an image dataset to VAE latents (WebDataset shards + manifest.json).

  latentae encode --vae VAE --data INPUT --out DIR [options]
  accelerate launch --multi_gpu --num_processes N -m latentae encode --vae VAE --data INPUT --out DIR
  torchrun --nproc_per_node N -m latentae encode ...   (also on CPUs, gloo; multi-node: DIR on a shared filesystem)
  python tools/encode.py ...                            (the same, from a checkout)

VAE: anything latentae reads (training run/checkpoint, diffusers folder, LDM .safetensors, weights-only .ckpt,
a Hugging Face hub id such as stabilityai/sd-vae-ft-mse).
INPUT: an image folder (recursive) or WebDataset shards ('data/shard-{000000..000099}.tar', 'pipe:...').

Output DIR: part-NNNNNN-KKKK.tar (part N = --shard-size files of a folder, or input shard N; at
most --shard-size latents per tar; each sample: <key>.json metadata, <key>.mean.npy +
<key>.logvar.npy, or <key>.latent.npy with --store mode/sample, plus flip_* with --flip),
part-NNNNNN.json, job.json, claims/ and, when everything is done, manifest.json (VAE identity,
precision, preprocessing, counts, every skipped input with its reason).

Resumable: re-run the same command after a crash or kill and it finishes the missing parts only
(any number of processes; several launches on the same DIR share the work). A finished DIR is
left alone; a different VAE or preprocessing into the same DIR is refused; --overwrite starts over.
Exit status: 0 done (or this process's share done while others finish), 1 the job stopped on a
fault (device error, unreadable input shard: re-run to finish), 2 a usage or setup error.

Preprocessing: 'resize' = shorter side to --size (bicubic) then centre crop (default);
'crop' = centre crop --size at full resolution (smaller images skipped); 'keep' = native size,
equal sizes batched together, odd sizes padded by the model (--tile N for large images).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from latentae import runtime
from latentae.cli.common import Parser, fail, vae_source_problem


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    from latentae.encode import EncodeConfig

    d = EncodeConfig()
    p = Parser(prog=prog, description=__doc__)
    p.add_argument("--vae", required=True, help="VAE to encode with (any format latentae reads)")
    p.add_argument("--data", required=True, help="image folder or WebDataset shard pattern / pipe: URL")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--preprocess", choices=["resize", "crop", "keep"], default=d.preprocess)
    p.add_argument("--size", type=int, default=d.size, help=f"output side for resize/crop (default {d.size})")
    p.add_argument("--store", choices=["dist", "mode", "sample"], default=d.store,
                   help="dist = mean and logvar (default); mode = the mean only; sample = one seeded draw")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=d.dtype, help="on-disk dtype (default fp16)")
    p.add_argument("--flip", action="store_true", help="also store latents of the horizontally flipped image")
    p.add_argument("--shard-size", type=int, default=d.shard_size, help="inputs per output shard")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--num-workers", type=int, default=None,
                   help="image decoding workers per process (default: 2 when the model runs on the CPU; on a GPU "
                        "this process's share of the CPU cores minus 2, between 2 and 16)")
    p.add_argument("--worker-priority", choices=["auto", "normal", "low", "idle"], default=d.worker_priority,
                   help="scheduling of the decoding workers: idle = only on cores the model leaves idle "
                        "(Linux SCHED_IDLE), low = nice +10; auto (default) = idle when the model runs on "
                        "the CPU, normal on a GPU")
    p.add_argument("--writer", choices=["auto", "thread", "inline"], default=d.writer,
                   help="write shards on a thread (default on a GPU) or inline (default on the CPU)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=d.precision,
                   help="dtype the VAE's weights are loaded in (job.json records the dtype it computes in)")
    p.add_argument("--tile", type=int, default=None, help="tile-encode images larger than this many pixels")
    p.add_argument("--tile-overlap", type=int, default=d.tile_overlap)
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the draws for --store sample")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the model (default: torch's)")
    p.add_argument("--overwrite", action="store_true", help="delete the latents already in --out and start over")
    p.add_argument("--claim-timeout", type=float, default=d.claim_timeout,
                   help="seconds after which a claim of a process on another machine that stopped refreshing it "
                        f"is taken over (default {d.claim_timeout:g}; same machine: at once when the process is gone)")
    p.add_argument("--partial-shards", choices=["fail", "keep"], default=d.partial_shards,
                   help="an input shard that cannot be read to its end: fail = leave its part to a re-run and "
                        "exit 1 (default); keep = keep what was read and list the error in the manifest")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    # Before torch is imported (latentae.encode imports it): OpenMP threads that spin while
    # waiting (the default) take the CPU that the image-decoding workers need, and lose it to
    # any other load; on 2 busy cores this made the model up to 3x slower. Sleeping waits
    # cost little on the VAE's large convolutions.
    runtime.prefer_passive_waiting()
    # (The parser's defaults come from EncodeConfig, whose package loads torch: so the
    # wait policy is set first, and argument errors here cost that import.)
    from latentae.encode import EncodeConfig, EncodeFault, InputShardError, JobMismatch, encode_dataset
    from latentae.io import WeightsError

    a = build_parser(prog).parse_args(argv)
    problem = vae_source_problem(a.vae)
    if problem:
        return fail(problem)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = EncodeConfig(
            vae=a.vae, data=a.data, out=a.out, preprocess=a.preprocess, size=a.size, store=a.store, dtype=a.dtype,
            flip=a.flip, shard_size=a.shard_size, batch_size=a.batch_size, num_workers=a.num_workers,
            worker_priority=a.worker_priority, writer=a.writer,
            precision=a.precision, tile=a.tile, tile_overlap=a.tile_overlap, seed=a.seed, threads=a.threads,
            overwrite=a.overwrite, claim_timeout=a.claim_timeout, partial_shards=a.partial_shards,
        )
    except ValueError as e:
        return fail(e)
    # A scheduler's SIGTERM (preemption, torchrun stopping the other ranks after a failure) unwinds
    # like an exception, so the parts still open are discarded and their claims released at once.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM)) if main_thread else None
    try:
        r = encode_dataset(cfg, progress=not a.no_progress)
    except (EncodeFault, InputShardError) as e:
        return fail(e, 1)
    except (JobMismatch, WeightsError, FileNotFoundError, NotADirectoryError, ValueError, RuntimeError) as e:
        return fail(e)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    if r.nothing_to_do:
        print(f"nothing to do: {r.out} already holds all {r.num_parts} parts and manifest.json "
              "(use --overwrite to encode again)")
        return 0
    rate = r.num_encoded / r.seconds if r.seconds else 0.0
    print(f"encoded {r.num_encoded} images ({r.num_skipped} skipped) into {r.parts_written} new parts "
          f"in {r.seconds:.1f}s ({rate:.1f} img/s); {r.parts_done_before} of {r.num_parts} parts were already done")
    if r.manifest is not None:
        m = r.manifest
        print(f"complete: {r.out / 'manifest.json'}: {m['num_encoded']} latents from {m['num_inputs']} inputs, "
              f"{m['num_skipped']} skipped")
        p = m["precision"]
        print(f"  the VAE computed in {p['compute']}" + (f" ({p['fp32_fallbacks']} batches repeated in fp32 after "
              "half-precision overflow)" if p["fp32_fallbacks"] else ""))
        for e in m["input_errors"]:
            print(f"  input error (kept what was read) {e['part']}: {e['error']}")
        for s in m["skipped"][:10]:
            print(f"  skipped {s['source']}: {s['reason']}")
        if m["num_skipped"] > 10:
            print(f"  ... and {m['num_skipped'] - 10} more (see manifest.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m latentae.cli.encode"))
