"""Encode an image dataset to VAE latents: resumable, exactly once, any number of processes.

The job (:func:`encode_dataset`, CLI ``tools/encode.py``), and where each step lives:

1. **Plan** (:mod:`~latentae.encode.plan`): rank 0 lists the input once -- a folder sorted
   by relative path, or the shard URLs (shards are not read to plan) -- and the other
   ranks receive that plan. Parts: ``shard_size`` files of a folder, or one input shard.
2. **Identity** (:mod:`~latentae.encode.job`): ``job.json``, created once, pins VAE,
   precision, preprocessing, storage and input; a run that differs is refused.
3. **Claims** (:mod:`~latentae.encode.claims`): a part is claimed (an ``O_EXCL`` claim
   file) before it is read; a crashed process's claim is taken over (same machine: at
   once when its pid is gone; another machine: when its heartbeat is older than
   ``claim_timeout``). Processes of one launch, and separate launches on the same
   folder, share the work this way and each part is written by one of them.
4. **Reading** (:mod:`~latentae.encode.reading`): DataLoader workers claim parts, read,
   decode and preprocess them, and hand over uint8 batches of one part and one size.
   Their number and priority follow the device (:mod:`~latentae.encode.device`).
5. **Encoding** (:mod:`~latentae.encode.encoder`): the model encodes a batch; out of
   memory -> smaller batches; any other model error stops the job
   (:class:`EncodeFault`); on a GPU the latents come back without blocking the device.
6. **Writing** (:mod:`~latentae.encode.writer`): shards are written under names unique to
   the writer (on a thread when on a GPU) and published by rename; the part's json is
   written last, and a part is done iff that json and its shards exist.
7. The loop (:mod:`~latentae.encode.run`) repeats until every part is done (waiting for
   parts that live processes hold); then ``manifest.json`` merges the parts' json files.

A killed job (SIGKILL at any moment, or a fault) leaves complete parts plus remains that a
plain re-run redoes: it encodes exactly what is missing.

Only a sample's own problems are skipped and listed with their reason (unreadable,
corrupt, not an image, too small for the crop, a size the VAE refuses, alone too large for
memory, non-finite latents); anything else stops the job with a message naming the part.
"""

from latentae.encode.claims import Claims, Owner
from latentae.encode.config import EncodeConfig, EncodeFault, EncodeResult, InputShardError, JobMismatch, Skipped
from latentae.encode.device import default_num_workers, is_out_of_memory, use_writer_thread, worker_priority
from latentae.encode.encoder import NONFINITE_RUN, precision_ran
from latentae.encode.job import build_manifest, compare_jobs, job_id, job_record
from latentae.encode.plan import SHARD_STRIDE, InputPlan, Part, make_parts, plan_input
from latentae.encode.reading import RESAMPLE, load_sample, preprocess
from latentae.encode.run import encode_dataset
from latentae.encode.writer import part_done

__all__ = [
    "NONFINITE_RUN",
    "RESAMPLE",
    "SHARD_STRIDE",
    "Claims",
    "EncodeConfig",
    "EncodeFault",
    "EncodeResult",
    "InputPlan",
    "InputShardError",
    "JobMismatch",
    "Owner",
    "Part",
    "Skipped",
    "build_manifest",
    "compare_jobs",
    "default_num_workers",
    "encode_dataset",
    "is_out_of_memory",
    "job_id",
    "job_record",
    "load_sample",
    "make_parts",
    "part_done",
    "plan_input",
    "precision_ran",
    "preprocess",
    "use_writer_thread",
    "worker_priority",
]
