"""The model side: uint8 batches in, stored latents out, without waiting for the device.

Faults, decided here:

* **Out of memory** (:func:`~latentae.encode.device.is_out_of_memory`): the batch is
  retried in halves, down to one image, and later batches of that image size start at
  the size that fitted. An image that does not fit alone is skipped with that reason.
* **Any other error from the model** (a CUDA error, a wrong dtype, anything unexpected)
  is not a sample's problem: :class:`~latentae.encode.config.EncodeFault` names the part
  and the error, and the job stops (the caller discards what is not finished).
* **Non-finite latents**: a half-precision call whose output is not finite is already
  repeated in fp32 by the model's inference engine. A sample whose latents are still not
  finite (or overflow the storage dtype) is skipped with that reason. A VAE that gives
  non-finite latents for :data:`NONFINITE_RUN` inputs in a row is broken (bad weights, a
  failing device) rather than fed bad inputs -- no image makes a healthy VAE's encoder
  overflow in fp32 -- and the job stops.

On a GPU nothing here waits for the device: images go up with ``non_blocking`` from
pinned memory, the latents are rounded to the storage dtype on the device and come back
with ``non_blocking`` copies into pinned memory, and a CUDA event tells the shard writer
when they have arrived.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from latentae.precision import precision_record

from latentae.encode.config import EncodeConfig, EncodeFault
from latentae.encode.device import is_out_of_memory
from latentae.latents.format import stored_tensor

log = logging.getLogger(__name__)

NONFINITE_RUN = 16
_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_ran(vae) -> dict[str, Any]:
    """What the model computes in, as recorded in job.json and the manifest.

    :func:`latentae.precision.precision_record` (the dtype a call computes in, the parts
    moved to fp32 after an fp16 overflow) plus ``fp32_fallbacks``: how many calls so far
    had to be recomputed because half precision overflowed (counted per part by the job).
    """
    record = precision_record(vae)
    return {**record, "fp32_fallbacks": int(record["nonfinite_recomputes"])}


def load_tiling():
    try:
        from latentae.tiling import tiled_encode
    except ImportError as e:
        raise RuntimeError(
            f"--tile needs tiled encoding (latentae.tiling.tiled_encode), which is not available here: {e}. "
            "Encode without --tile, or use --preprocess resize/crop for large images."
        ) from e
    return tiled_encode


@dataclass
class Encoded:
    """Latents of some images of one part, on their way to the host.

    ``arrays``: field -> CPU tensor [V*B, C, h, w] with V = 2 views (plain, flipped) with
    --flip, else 1: row ``v * B + j`` is view v of image j. Stored dtype for "dist"/"mode";
    float32 mean and logvar for "sample" (the seeded draw happens on the host, so it is the
    same on any device). ``finite``: bool [V*B], the model's output was finite.
    ``ready``: a CUDA event recorded after the copies (None on the CPU)."""

    part: int
    metas: list[dict[str, Any]]
    arrays: dict[str, torch.Tensor]
    finite: torch.Tensor
    ready: Any = None

    def wait(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()


class Encoder:
    def __init__(self, vae, cfg: EncodeConfig, device: torch.device, pin: bool):
        self.vae, self.cfg, self.device, self.pin = vae, cfg, device, pin
        self.dtype = _PRECISIONS[cfg.precision]
        self.tiled_encode = load_tiling() if cfg.tile is not None else None
        self.max_batch: dict[tuple[int, int], int] = {}  # image size -> largest batch that fitted after an OOM

    def encode(self, images: torch.Tensor, metas: list[dict], part: int, part_name: str):
        """uint8 [B, 3, H, W] -> (list of :class:`Encoded`, [(meta, reason)] of images skipped)."""
        size = tuple(images.shape[-2:])
        cap = self.max_batch.get(size, len(metas))
        done: list[Encoded] = []
        skipped: list[tuple[dict, str]] = []
        for s in range(0, len(metas), cap):
            self._fit(images[s : s + cap], metas[s : s + cap], part, part_name, done, skipped)
        return done, skipped

    def _fit(self, images, metas, part, part_name, done, skipped) -> None:
        try:
            done.append(self._encode(images, metas, part))
            return
        except Exception as e:  # noqa: BLE001 - sorted into out-of-memory and faults right here
            if not is_out_of_memory(e):
                h, w = images.shape[-2:]
                raise EncodeFault(
                    f"{part_name}: the VAE failed on a batch of {len(metas)} images of {w}x{h} "
                    f"({type(e).__name__}: {str(e)[:500]})"
                ) from e
            oom = e
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        n = len(metas)
        if n == 1:
            skipped.append((metas[0], f"does not fit in memory even alone ({type(oom).__name__}: {str(oom)[:200]})"))
            return
        size = tuple(images.shape[-2:])
        self.max_batch[size] = min(self.max_batch.get(size, n), n // 2)
        log.warning("%s: out of memory on a batch of %d images of %s; retrying in batches of %d",
                    part_name, n, "x".join(map(str, size[::-1])), self.max_batch[size])
        half = (n + 1) // 2
        self._fit(images[:half], metas[:half], part, part_name, done, skipped)
        self._fit(images[half:], metas[half:], part, part_name, done, skipped)

    @torch.inference_mode()
    def _encode(self, images: torch.Tensor, metas: list[dict], part: int) -> Encoded:
        x = images.to(self.device, non_blocking=True).to(self.dtype).div_(127.5).sub_(1.0)  # [B, 3, H, W] in [-1, 1]
        if self.cfg.flip:
            x = torch.cat([x, x.flip(-1)])  # one call for both: better device use
        if self.tiled_encode is not None and max(x.shape[-2:]) > self.cfg.tile:
            post = self.tiled_encode(self.vae, x, tile=self.cfg.tile, overlap=self.cfg.tile_overlap)
        else:
            post = self.vae.encode(x)
        mean, logvar = post.mean.float(), post.logvar.float()  # [V*B, C, h, w]
        finite = (torch.isfinite(mean).flatten(1).all(1) & torch.isfinite(logvar).flatten(1).all(1))
        if self.cfg.store == "dist":
            arrays = {"mean.npy": stored_tensor(mean, self.cfg.dtype), "logvar.npy": stored_tensor(logvar, self.cfg.dtype)}
        elif self.cfg.store == "mode":
            arrays = {"latent.npy": stored_tensor(mean, self.cfg.dtype)}
        else:  # "sample": drawn on the host (seeded per input; the same on any device)
            arrays = {"mean.npy": mean, "logvar.npy": logvar}
        return self._to_host(Encoded(part, metas, {**arrays, "finite": finite}, finite))

    def _to_host(self, enc: Encoded) -> Encoded:
        if self.device.type == "cpu":
            enc.finite = enc.arrays.pop("finite")
            return enc
        host = {}
        for k, t in enc.arrays.items():
            h = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin)
            h.copy_(t, non_blocking=self.pin)
            host[k] = h
        enc.finite = host.pop("finite")
        enc.arrays = host
        if self.device.type == "cuda":
            enc.ready = torch.cuda.Event()
            enc.ready.record()
        return enc
