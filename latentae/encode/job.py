"""Job identity (job.json) and the manifest.

``job.json`` is created once, atomically and only if absent (two jobs started together
cannot both write theirs), and pins what is encoded: VAE weights hash and architecture,
the precision it runs in, preprocessing, storage, the part size and the input's
fingerprint. A run that differs in any of these is refused (:class:`JobMismatch`);
``--overwrite`` discards the old output. ``manifest.json`` is merged from the parts'
json files once every part is done; every count in it comes from the encoding itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from latentae.config import to_dict
from latentae.encode.claims import CLAIMS
from latentae.encode.config import EncodeConfig, JobMismatch
from latentae.encode.plan import InputPlan, Part
from latentae.encode.reading import RESAMPLE
from latentae.encode.writer import TMP, part_json, write_json_atomic
from latentae.latents.format import FORMAT, JOB, MANIFEST

_NORM_FIELDS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "sample_size")


def job_record(cfg: EncodeConfig, vae, plan: InputPlan, weights_hash: str, precision: dict[str, Any]) -> dict[str, Any]:
    """What ``job.json`` holds; :func:`compare_jobs` decides whether two runs are one job.
    ``precision``: :func:`latentae.encode.encoder.precision_ran` of the loaded model."""
    return {
        "format": FORMAT,
        "vae": {"path": cfg.vae, "weights_hash": weights_hash, "config": to_dict(vae.config)},
        "preprocess": {
            "mode": cfg.preprocess,
            "size": cfg.size if cfg.preprocess != "keep" else None,
            "resample": RESAMPLE if cfg.preprocess == "resize" else None,
            "tile": cfg.tile,
            "tile_overlap": cfg.tile_overlap if cfg.tile is not None else None,
        },
        "storage": {
            "store": cfg.store,
            "dtype": cfg.dtype,
            "flip": cfg.flip,
            "seed": cfg.seed if cfg.store == "sample" else None,
        },
        # parameters: the dtype the weights were loaded in; compute: the dtype the encoder runs in
        "precision": {"parameters": cfg.precision, "compute": precision["compute_dtype"]},
        "shard_size": cfg.shard_size,
        "input": plan.describe(),
    }


def _identity(job: dict[str, Any]) -> dict[str, Any]:
    # Normalisation factors do not change raw latents (a VAE re-exported with new
    # factors is the same encoder), and paths may be spelled differently.
    arch = {k: v for k, v in job["vae"]["config"].items() if k not in _NORM_FIELDS}
    return {
        "VAE weights (sha256)": job["vae"]["weights_hash"],
        "VAE architecture": arch,
        "preprocessing": job["preprocess"],
        "storage": job["storage"],
        "precision": job["precision"],
        "shard_size": job["shard_size"],
        "input (kind, files or shards, fingerprint)": [job["input"]["kind"], job["input"]["count"],
                                                        job["input"]["fingerprint"]],
    }


def compare_jobs(old: dict[str, Any], new: dict[str, Any], out: Path) -> None:
    a, b = _identity(old), _identity(new)
    diffs = [f"  {k}: existing {json.dumps(a[k])} vs now {json.dumps(b[k])}" for k in a if a[k] != b[k]]
    if diffs:
        raise JobMismatch(
            f"{out} holds latents of a different encoding job ({out / JOB}):\n"
            + "\n".join(diffs)
            + "\nUse another --out folder, or --overwrite to delete the existing latents and start over."
        )


def job_id(job: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(_identity(job), sort_keys=True).encode()).hexdigest()[:16]


def read_job(out: Path) -> dict[str, Any] | None:
    path = out / JOB
    if not path.is_file():
        if any(out.glob("part-*.tar")):
            raise JobMismatch(
                f"{out} has latent shards but no {JOB}, so which job wrote them is unknown: "
                "use another --out folder, or --overwrite to delete them"
            )
        return None
    try:
        job = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise JobMismatch(f"{path} is not valid JSON ({e}): use --overwrite to start over") from e
    if job.get("format") != FORMAT:
        raise JobMismatch(
            f"{path} was written by another version of latentae (format {job.get('format')!r}, this one "
            f"writes {FORMAT!r}): finish the job with that version, or use --overwrite to start over"
        )
    return job


def create_or_check_job(out: Path, job: dict[str, Any], token: str) -> dict[str, Any]:
    """Write ``job.json`` if there is none (atomically: a link fails if another process
    wrote one first), else check that it is this job. Returns the job on disk."""
    old = read_job(out)
    if old is None:
        tmp = out / f"{JOB}.{token}.tmp"
        write_json_atomic(tmp, job, tmp_suffix=".w")
        try:
            os.link(tmp, out / JOB)
            return job
        except FileExistsError:  # another job started at the same moment: compare with its record
            old = read_job(out)
        finally:
            tmp.unlink(missing_ok=True)
    compare_jobs(old, job, out)
    return old


def build_manifest(out: Path, job: dict[str, Any], parts: list[Part]) -> dict[str, Any]:
    jid = job_id(job)
    summaries, shards, skipped, input_errors = [], [], [], []
    for part in parts:
        p = part_json(out, part)
        s = json.loads(p.read_text())
        if s.get("job_id") != jid:
            raise JobMismatch(f"{p} belongs to another job (job_id {s.get('job_id')} vs {jid}); delete it to redo the part")
        skipped.extend(s.pop("skipped"))
        input_errors.extend({"part": part.name, "error": e} for e in s["input_errors"])
        shards.extend({**f, "part": part.index} for f in s["shards"])
        s.pop("job_id")
        summaries.append(s)
    return {
        "format": FORMAT,
        "job": job,
        "job_id": jid,
        "latent_channels": job["vae"]["config"]["latent_channels"],
        "downsample_factor": 2 ** (len(job["vae"]["config"]["block_out_channels"]) - 1),
        "precision": {**job["precision"], "fp32_fallbacks": sum(s["fp32_fallbacks"] for s in summaries)},
        "num_inputs": sum(s["num_inputs"] for s in summaries),
        "num_encoded": sum(s["num_encoded"] for s in summaries),
        "num_skipped": len(skipped),
        "shards": shards,
        "parts": summaries,
        "skipped": skipped,
        "input_errors": input_errors,
    }


_OUR_FILES = ("part-*.tar", "part-*.json", "part-*.tmp", "*.json*.tmp", "*.json.tmp*", MANIFEST, JOB)


def clear_output(out: Path) -> int:
    """--overwrite: remove what an encoding job writes (and nothing else)."""
    n = 0
    for pattern in _OUR_FILES:
        for p in out.glob(pattern):
            p.unlink(missing_ok=True)
            n += 1
    for sub in (CLAIMS, TMP):
        if (out / sub).is_dir():
            shutil.rmtree(out / sub)
    return n
