"""What an encoding job is asked to do (:class:`EncodeConfig`), what it reports, and its errors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from latentae.config import check_types


@dataclass(frozen=True)
class EncodeConfig:
    vae: str = ""  # anything latentae.io.load_vae reads
    data: str = ""  # image folder, shard pattern or pipe: URL
    out: str = ""  # output folder
    preprocess: Literal["resize", "crop", "keep"] = "resize"
    size: int = 256  # resize / crop: output side in pixels
    store: Literal["dist", "mode", "sample"] = "dist"  # mean+logvar, the mean, or one seeded draw
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"  # on disk
    flip: bool = False  # also store the latents of the horizontally flipped image
    # Folder input: inputs per part. Shard input: a part is one input shard; its latents
    # go to shards of at most this many latents.
    shard_size: int = 1000
    batch_size: int = 16
    # DataLoader workers decoding images, per process; None = latentae.encode.device.default_num_workers
    # (2 when the model runs on the CPU; on a GPU the CPU cores of this process minus 2, in [2, 16]).
    num_workers: int | None = None
    # Scheduling of the decoding workers. On a CPU the model's intra-op threads use every
    # core and all wait at each op's barrier when one of them is preempted, so a worker
    # that takes a core stalls the whole model for as long as it runs. 'idle' (Linux
    # SCHED_IDLE) lets workers run only on cores the model leaves idle (between ops, while
    # it waits for a batch: never a deadlock, at worst decoding and encoding alternate);
    # 'low' is nice +10; 'auto' = 'idle' when the model runs on the CPU, 'normal' on a GPU
    # (where the CPU is the workers' alone). Measured with tools/bench_encode.py --worker-priority
    # auto normal (2 idle cores, tiny VAE, two runs of 5): end-to-end / model-only 0.965 and 0.950
    # with 'idle', 0.944 and 0.931 with 'normal'.
    worker_priority: Literal["auto", "normal", "low", "idle"] = "auto"
    # Where shards are written: 'thread' = a writer thread behind a bounded queue (the device
    # goes on with the next batch while the last one is written), 'inline' = in the loop;
    # 'auto' = thread on a GPU, inline on the CPU (where the model's threads already use
    # every core: a writer thread would only take cores from it).
    writer: Literal["auto", "thread", "inline"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # the VAE's parameter dtype
    tile: int | None = None  # encode images larger than this (px) in tiles
    tile_overlap: int = 128
    seed: int = 0  # for store="sample"
    threads: int | None = None  # torch intra-op threads in the encoding process (None = torch's default)
    overwrite: bool = False
    # A claim (see latentae.encode.claims) of a process on another machine that has not been
    # refreshed for this many seconds is taken over; its owner refreshes it every tenth of this.
    claim_timeout: float = 600.0
    # An input shard that cannot be read to its end (missing, cut short, its pipe: command
    # failed): 'fail' = its part is not marked done (a re-run retries it) and the job ends
    # with an error naming it, after every other part; 'keep' = keep what could be read and
    # list the error in the manifest (for a shard known to be broken for good).
    partial_shards: Literal["fail", "keep"] = "fail"

    def __post_init__(self):
        check_types(self)  # e.g. worker_priority="idel" names the choices and the closest one
        for name in ("size", "shard_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.tile is not None and self.tile < 8:
            raise ValueError(f"tile must be >= 8 px, got {self.tile}")
        if self.tile is not None and not 0 <= self.tile_overlap < self.tile:
            raise ValueError(f"tile_overlap must be in [0, tile={self.tile}), got {self.tile_overlap}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if not self.claim_timeout > 0:
            raise ValueError(f"claim_timeout must be > 0 seconds, got {self.claim_timeout}")


class JobMismatch(ValueError):
    """The output folder belongs to a different encoding job."""


class EncodeFault(RuntimeError):
    """The model (or the device, or writing) failed for a reason that is not one input's:
    the job stopped, the parts it had open were discarded; a re-run encodes what is missing."""


class InputShardError(RuntimeError):
    """Input shards could not be read to their end; their parts were left to a re-run."""


@dataclass(frozen=True)
class Skipped:
    index: int
    key: str
    source: str
    reason: str


@dataclass
class EncodeResult:
    out: Path
    num_parts: int
    parts_done_before: int  # parts already done when this process started
    parts_written: int  # by this process
    num_encoded: int  # by this process
    num_skipped: int  # by this process
    manifest: dict[str, Any] | None  # set by a process that wrote manifest.json
    nothing_to_do: bool = False
    seconds: float = 0.0  # the whole call
    pipeline_seconds: float = 0.0  # reading, decoding, encoding and writing (without VAE load / listing)
    first_batch_seconds: float = 0.0  # of pipeline_seconds: until the workers delivered the first batch
    waited_seconds: float = 0.0  # waiting for parts that other processes were encoding
