"""The job: plan on rank 0, load the VAE, then claim, encode and publish parts until all are done."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from latentae.encode.claims import Claims, Owner
from latentae.encode.config import EncodeConfig, EncodeFault, EncodeResult, InputShardError
from latentae.encode.device import (
    default_num_workers,
    pin_memory,
    set_priority,
    use_writer_thread,
    worker_priority,
)
from latentae.encode.encoder import Encoder, load_tiling, precision_ran
from latentae.encode.job import build_manifest, clear_output, create_or_check_job, job_id, job_record
from latentae.encode.plan import InputPlan, Part, from_rank0, make_parts, plan_input
from latentae.encode.reading import PartBatches
from latentae.encode.writer import TMP, ShardWriter, part_done, write_json_atomic
from latentae.imageio import check_source
from latentae.latents.format import MANIFEST
from latentae.runtime import local_processes, usable_cpus

log = logging.getLogger(__name__)
_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def encode_dataset(cfg: EncodeConfig, *, state=None, progress: bool = True) -> EncodeResult:
    """Run (or finish) the encoding job described by ``cfg``; see :mod:`latentae.encode`.

    ``state``: an ``accelerate.PartialState`` (created if None): its process index,
    count and device decide where this process encodes. Launch several with
    ``accelerate launch --multi_gpu`` or ``torchrun`` (also on CPUs: gloo); separate
    launches on the same folder also work together (claims).
    """
    from accelerate import PartialState

    from latentae.io import load_vae, weights_hash

    t0 = time.perf_counter()
    if not cfg.vae or not cfg.data or not cfg.out:
        raise ValueError("vae, data and out are all required")
    if state is None:
        # cpu=True lets torchrun-launched CPU processes form a gloo group (accelerate only
        # considers MULTI_CPU when asked for the CPU); it is the only choice without CUDA anyway.
        use_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
        state = PartialState(cpu=use_cpu)
    rank, world, device = state.process_index, state.num_processes, state.device
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a folder")
    owner = Owner.current()
    claims = Claims(out, owner, cfg.claim_timeout)

    # Before loading the VAE: a missing input fails fast, with the data layer's message.
    plan: InputPlan = from_rank0(lambda: plan_input(cfg.data, check_source(cfg.data)), rank, world)
    if cfg.tile is not None:
        load_tiling()
    vae = load_vae(cfg.vae, device=device, dtype=_PRECISIONS[cfg.precision])
    f = vae.config.downsample_factor
    multiple_of = f if vae.config.odd_size == "error" else 1
    if cfg.preprocess != "keep" and cfg.size % multiple_of:
        raise ValueError(f"--size {cfg.size} is not a multiple of the VAE's downsampling factor {f}, "
                         "and this VAE does not pad (odd_size='error')")

    def prepare() -> dict:
        job = job_record(cfg, vae, plan, weights_hash(vae), precision_ran(vae))
        out.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite:
            busy = {name: who for name, who in claims.others().items() if not claims.claimable(name)}
            if busy:
                name, who = next(iter(busy.items()))
                raise RuntimeError(f"--overwrite: another process is encoding into {out} ({who} holds {name}); "
                                   "stop it first")
            n = clear_output(out)
            if n:
                log.info("--overwrite: removed %d files of the previous job in %s", n, out)
        create_or_check_job(out, job, owner.token)
        return job

    job = from_rank0(prepare, rank, world)
    jid = job_id(job)
    parts = make_parts(plan, cfg.shard_size)
    done_before = sum(part_done(out, p) for p in parts)
    result = EncodeResult(out=out, num_parts=len(parts), parts_done_before=done_before, parts_written=0,
                          num_encoded=0, num_skipped=0, manifest=None)
    if done_before == len(parts) and (out / MANIFEST).is_file():
        result.nothing_to_do = True
        result.seconds = time.perf_counter() - t0
        return result

    failed: dict[str, list[str]] = {}
    claims.start_heartbeat()
    try:
        t1 = time.perf_counter()
        _encode_parts(cfg, vae, plan, parts, out, jid, claims, device, rank, world, multiple_of, result, failed,
                      progress and state.is_main_process)
        result.pipeline_seconds = time.perf_counter() - t1 - result.waited_seconds
    finally:
        claims.close()

    if all(part_done(out, p) for p in parts):
        # Whoever sees every part done writes the manifest; the content is the same for all (atomic writes).
        manifest = build_manifest(out, job, parts)
        write_json_atomic(out / MANIFEST, manifest, tmp_suffix=f".{owner.token}.tmp")
        shutil.rmtree(out / TMP, ignore_errors=True)  # the parts' (empty) temporary folders
        result.manifest = manifest
    result.seconds = time.perf_counter() - t0
    if failed:
        lines = "\n".join(f"  {name}: {'; '.join(errs)}" for name, errs in sorted(failed.items()))
        raise InputShardError(
            f"{len(failed)} input shards could not be read to their end; their parts were not written and "
            f"manifest.json was not written:\n{lines}\nRe-run the same command to retry them (every other part "
            "is done); for a shard that is broken for good, re-run with --partial-shards keep."
        )
    return result


def _encode_parts(cfg, vae, plan, parts, out, jid, claims, device, rank, world, multiple_of, result: EncodeResult,
                  failed: dict[str, list[str]], show: bool) -> None:
    """Rounds of claiming and encoding until every part is done here or elsewhere; waits
    (polling) while the only parts left are held by live processes."""
    poll = min(2.0, cfg.claim_timeout / 10)
    first_round, announced = True, None
    while True:
        todo = [p for p in parts if p.name not in failed and not part_done(out, p)]
        if not todo:
            return
        claimable = [p for p in todo if claims.claimable(p.name)]
        if claimable or first_round:
            _round(cfg, vae, plan, todo, out, jid, claims, device, rank, world, multiple_of, result, failed, show)
            first_round = False
            continue
        held = claims.others()
        owners = ", ".join(sorted(set(held.values()))[:3])
        msg = f"waiting for {len(todo)} parts that other processes are encoding ({owners})"
        if msg != announced:
            log.info(msg)
            announced = msg
        t = time.perf_counter()
        time.sleep(poll)
        result.waited_seconds += time.perf_counter() - t


def _round(cfg, vae, plan, todo: list[Part], out, jid, claims: Claims, device, rank, world, multiple_of,
           result: EncodeResult, failed: dict[str, list[str]], show: bool) -> None:
    from tqdm import tqdm

    nw = cfg.num_workers if cfg.num_workers is not None else default_num_workers(
        device.type, usable_cpus(), local_processes())
    nw = min(nw, len(todo))
    pin = pin_memory(device.type)
    loader = DataLoader(
        PartBatches(plan, todo, cfg, claims, out, rank, world, multiple_of),
        batch_size=None,
        num_workers=nw,
        pin_memory=pin,
        prefetch_factor=4 if nw else None,
        worker_init_fn=functools.partial(set_priority, worker_priority(cfg.worker_priority, device.type)) if nw else None,
    )
    encoder = Encoder(vae, cfg, device, pin)
    writer = ShardWriter(out, cfg, jid, claims, vae.config.downsample_factor, use_writer_thread(cfg.writer, device.type))
    by_index = {p.index: p for p in todo}
    consumed: dict[int, int] = {}
    fallbacks: dict[int, int] = {}
    total = sum(p.end - p.start for p in todo) if plan.kind == "folder" else None
    bar = tqdm(total=total, unit="img", disable=not show, dynamic_ncols=True, desc="encode")
    t0 = time.perf_counter()
    batches = iter(loader)
    try:
        for batch in batches:
            if not result.first_batch_seconds:  # worker start-up + the first batch's decoding
                result.first_batch_seconds = time.perf_counter() - t0
            p = batch.part
            name = by_index[p].name
            if batch.first:  # a worker claimed this part for us
                claims.adopt(name)
                writer.open(by_index[p])
                consumed[p] = fallbacks[p] = 0
            consumed[p] += batch.consumed
            if batch.skipped:
                writer.skip(p, batch.skipped)
            if batch.images is not None:
                before = precision_ran(vae)["fp32_fallbacks"]
                encoded, too_big = encoder.encode(batch.images, batch.meta, p, name)
                fallbacks[p] += precision_ran(vae)["fp32_fallbacks"] - before
                if too_big:
                    writer.skip(p, [{"index": m["index"], "key": m["key"], "source": m["source"], "reason": r}
                                    for m, r in too_big])
                for enc in encoded:
                    writer.put(enc)
            if batch.last:
                writer.finish(p, consumed.pop(p), batch.input_errors, fallbacks.pop(p))
            bar.update(batch.consumed)
        writer.close()
    except BaseException as e:
        shutdown = getattr(batches, "_shutdown_workers", None)  # the workers stop claiming before we release
        if shutdown is not None:
            shutdown()
        del batches
        open_parts = sorted(set(writer.abort()) | {by_index[p].name for p in consumed})
        claims.release_all()
        if isinstance(e, EncodeFault):
            done = sum(part_done(out, p) for p in make_parts(plan, cfg.shard_size))
            raise EncodeFault(
                f"{e}. Stopped: the parts still open ({', '.join(open_parts) or 'none'}) were discarded, "
                f"manifest.json was not written; {done} of {result.num_parts} parts are done. "
                "Re-run the same command to encode what is missing."
            ) from e.__cause__
        raise
    finally:
        bar.close()
    failed.update(writer.failed)
    result.parts_written += writer.parts_written
    result.num_encoded += writer.num_encoded
    result.num_skipped += writer.num_skipped
