"""Writing parts: latent shards under names unique to the writer, published by rename, json last.

Files of part N (see :mod:`latentae.latents`): ``part-N-KKKK.tar`` (at most
``shard_size`` latents each) and ``part-N.json``. A writer writes
``tmp/part-N/part-N-KKKK.tar.<token>`` (the token is unique to the process and run, so two
writers never share a file; ``tmp/`` goes once every part is done), then publishes: fsync, rename each tar into place, write
``part-N.json`` (atomically), fsync the folder, release the claim. The part is done iff its
json exists and names shards that exist (:func:`part_done`): a process killed at any moment
leaves either a done part or one that a re-run redoes (:func:`clear_part` removes its
remains first, without listing the output folder: that stays cheap with 100k files in it).

:class:`ShardWriter` runs this inline or on a thread behind a bounded queue (see
:mod:`latentae.encode.device`); an error on the thread stops the job at the loop's next step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import random
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentae.encode.claims import Claims
from latentae.encode.config import EncodeConfig, EncodeFault
from latentae.encode.encoder import NONFINITE_RUN, Encoded
from latentae.encode.plan import Part
from latentae.latents.format import LatentTarWriter, stored_array, stored_tensor

log = logging.getLogger(__name__)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any, tmp_suffix: str = ".tmp", tmp: Path | None = None) -> None:
    tmp = tmp if tmp is not None else path.with_name(path.name + tmp_suffix)
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def part_json(out: Path, part: Part) -> Path:
    return out / f"{part.name}.json"


def part_done(out: Path, part: Part) -> bool:
    try:
        summary = json.loads(part_json(out, part).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return all((out / s["file"]).is_file() for s in summary.get("shards", []))


TMP = "tmp"


def tmp_dir(out: Path, part: Part) -> Path:
    return out / TMP / part.name


def clear_part(out: Path, part: Part) -> None:
    """Remove what an unfinished attempt at ``part`` left (call while holding its claim)."""
    listed: list[str] = []
    try:
        listed = [s["file"] for s in json.loads(part_json(out, part).read_text()).get("shards", [])]
    except (OSError, json.JSONDecodeError):
        pass
    part_json(out, part).unlink(missing_ok=True)  # first: a json naming missing shards is not done anyway
    for name in listed:
        (out / name).unlink(missing_ok=True)
    k = 0  # shards published before a crash, without their json: renamed in order, so 0, 1, ...
    while (out / part.shard_name(k)).exists():
        (out / part.shard_name(k)).unlink(missing_ok=True)
        k += 1
    d = tmp_dir(out, part)
    if d.is_dir():
        for p in d.iterdir():
            p.unlink(missing_ok=True)


def _draw_seed(seed: int, index: int, flipped: bool) -> int:
    return random.Random(f"encode/{seed}/{index}/{int(flipped)}").getrandbits(63)


class PartWriter:
    """One part being written (see the module docstring)."""

    def __init__(self, out: Path, part: Part, cfg: EncodeConfig, token: str):
        self.out, self.part, self.cfg, self.token = out, part, cfg, token
        self.shards: list[tuple[Path, Path, int]] = []  # (temporary, final, latents)
        self.file = self.tar = None
        self.skipped: list[dict[str, Any]] = []
        self.num_encoded = 0

    def _roll(self) -> None:
        self._close_tar()
        final = self.out / self.part.shard_name(len(self.shards))
        tmp = tmp_dir(self.out, self.part) / f"{final.name}.{self.token}"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(tmp, "wb")  # noqa: SIM115 - closed in _close_tar
        self.tar = LatentTarWriter(self.file)
        self.shards.append((tmp, final, 0))

    def _close_tar(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            tmp, final, _ = self.shards[-1]
            self.shards[-1] = (tmp, final, self.tar.count)
            self.file = self.tar = None

    def add(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        if self.tar is None or self.tar.count >= self.cfg.shard_size:
            self._roll()
        self.tar.add(meta, arrays)
        self.num_encoded += 1

    def skip(self, record: dict[str, Any]) -> None:
        self.skipped.append(record)

    def publish(self, claims: Claims, job_id: str, num_inputs: int, input_errors: list[str],
                fp32_fallbacks: int) -> dict[str, Any] | None:
        """Publish the part; None (and nothing published) if our claim was taken over."""
        self._close_tar()
        self.skipped.sort(key=lambda r: r["index"])
        summary = {
            "part": self.part.index,
            "input": self.part.url if self.part.url is not None else [self.part.start, self.part.end],
            "num_inputs": num_inputs,
            "num_encoded": self.num_encoded,
            "num_skipped": len(self.skipped),
            "shards": [{"file": final.name, "num_encoded": n} for _, final, n in self.shards],
            "skipped": self.skipped,
            "input_errors": input_errors,
            "fp32_fallbacks": fp32_fallbacks,
            "job_id": job_id,
        }
        if self.num_encoded + len(self.skipped) != num_inputs:
            raise RuntimeError(
                f"{self.part.name}: {self.num_encoded} encoded + {len(self.skipped)} skipped != {num_inputs} "
                "inputs (an encoder bug; the part is not marked done)"
            )
        if not claims.is_mine(self.part.name):
            log.warning("%s: our claim was taken over (were we frozen for > %gs?); discarding our copy",
                        self.part.name, claims.timeout)
            self.discard()
            return None
        for tmp, final, _ in self.shards:
            os.replace(tmp, final)
        # No fsync of the folder between the renames and the json: if a crash kept the json's
        # name but lost a shard's, part_done sees the missing shard and the part is redone.
        d = tmp_dir(self.out, self.part)
        d.mkdir(parents=True, exist_ok=True)
        write_json_atomic(part_json(self.out, self.part), summary, tmp=d / f"{self.part.name}.json.{self.token}")
        _fsync_dir(self.out)
        claims.release(self.part.name)
        return summary

    def discard(self) -> None:
        try:
            if self.tar is not None:
                self.tar.close()
                self.file.close()
        finally:
            for tmp, _, _ in self.shards:
                tmp.unlink(missing_ok=True)


class ShardWriter:
    """Encoded batches -> parts on disk, inline or on a writer thread (``threaded``).

    The loop calls :meth:`open`, :meth:`skip`, :meth:`put`, :meth:`finish` in order, then
    :meth:`close` (waits until everything is written; raises what the thread raised) or
    :meth:`abort` (discards every part not yet published)."""

    def __init__(self, out: Path, cfg: EncodeConfig, job_id: str, claims: Claims, downsample: int, threaded: bool,
                 queue_size: int = 8):
        self.out, self.cfg, self.job_id, self.claims, self.f = out, cfg, job_id, claims, downsample
        self.open_parts: dict[int, PartWriter] = {}
        self.parts_written = self.num_encoded = self.num_skipped = 0
        self.failed: dict[str, list[str]] = {}  # part -> input errors (left to a re-run)
        self.nonfinite_run = 0
        self.nonfinite_parts: dict[str, Part] = {}  # parts with a skip of the current non-finite run
        self.error: BaseException | None = None
        self._queue: queue.Queue | None = None
        self._abort = threading.Event()
        if threaded:
            self._queue = queue.Queue(maxsize=queue_size)  # bounded: the loop waits instead of piling up latents
            self._thread = threading.Thread(target=self._run, name="latentae-shard-writer", daemon=True)
            self._thread.start()

    # -- called by the loop

    def open(self, part: Part) -> None:
        self._submit("_open", part)

    def skip(self, part: int, records: list[dict[str, Any]]) -> None:
        self._submit("_skip", part, records)

    def put(self, enc: Encoded) -> None:
        self._submit("_put", enc)

    def finish(self, part: int, num_inputs: int, input_errors: list[str], fp32_fallbacks: int) -> None:
        self._submit("_finish", part, num_inputs, input_errors, fp32_fallbacks)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        if self._queue is not None:
            self._submit(None)
            self._thread.join()
        self.check()

    def abort(self) -> list[str]:
        """Stop; discard every part not yet published (their temporaries are removed).
        Returns their names."""
        if self._queue is not None:
            self._abort.set()
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                pass
            self._thread.join()
        names = sorted(w.part.name for w in self.open_parts.values())
        for w in self.open_parts.values():
            w.discard()
        self.open_parts.clear()
        return names

    # -- inline or on the thread

    def _submit(self, method: str | None, *args) -> None:
        self.check()
        if self._queue is None:
            self._call(method, args)
            return
        while True:  # a put that notices when the thread has died
            try:
                self._queue.put((method, args), timeout=0.5)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    self.check()
                    raise RuntimeError("the shard writer thread stopped")

    def _call(self, method: str | None, args) -> None:
        try:
            getattr(self, method)(*args)
        except EncodeFault:
            raise
        except Exception as e:  # noqa: BLE001 - a fault of the job, never of one sample
            raise EncodeFault(f"writing latents failed ({type(e).__name__}: {e})") from e

    def _run(self) -> None:
        while True:
            method, args = self._queue.get() or (None, None)
            if method is None or self._abort.is_set():
                return
            try:
                self._call(method, args)
            except BaseException as e:  # noqa: BLE001 - handed to the loop
                self.error = e
                return

    def _open(self, part: Part) -> None:
        self.open_parts[part.index] = PartWriter(self.out, part, self.cfg, self.claims.owner.token)

    def _skip(self, part: int, records: list[dict[str, Any]]) -> None:
        for r in records:
            self.open_parts[part].skip(r)

    def _put(self, enc: Encoded) -> None:
        enc.wait()  # the device-to-host copies have landed
        w, cfg = self.open_parts[enc.part], self.cfg
        b, views = len(enc.metas), (False, True) if cfg.flip else (False,)
        for j, meta in enumerate(enc.metas):
            rows = [v * b + j for v in range(len(views))]
            arrays, reason = {}, None
            if not all(bool(enc.finite[r]) for r in rows):
                reason = "non-finite latents (NaN/inf) from the VAE"
            else:
                for r, flipped in zip(rows, views):
                    arrays.update(self._arrays(enc.arrays, r, meta["index"], flipped))
                if not all(_finite(a, cfg.dtype) for a in arrays.values()):
                    reason = f"latents beyond the range of {cfg.dtype} storage"
            if reason is None:
                self.nonfinite_run = 0
                self.nonfinite_parts.clear()
                h, wd = next(iter(arrays.values())).shape[-2:]
                w.add(self._meta(meta, (h, wd)), arrays)
                continue
            w.skip({"index": meta["index"], "key": meta["key"], "source": meta["source"], "reason": reason})
            if reason.startswith("non-finite"):
                self.nonfinite_run += 1
                self.nonfinite_parts[w.part.name] = w.part
                if self.nonfinite_run >= NONFINITE_RUN:
                    self._unpublish_nonfinite_run()
                    raise EncodeFault(
                        f"{w.part.name}: the VAE gave non-finite latents for {self.nonfinite_run} inputs in a row "
                        f"(last: {meta['source']}); its weights or the device are broken, not the images"
                    )

    def _unpublish_nonfinite_run(self) -> None:
        """The inputs of the run were not bad: parts already published with them skipped are
        removed again, so that a re-run encodes them."""
        for name, part in self.nonfinite_parts.items():
            if part.index not in self.open_parts:
                log.warning("%s: removing it again (its non-finite skips were the VAE's fault)", name)
                clear_part(self.out, part)

    def _arrays(self, t: dict[str, torch.Tensor], row: int, index: int, flipped: bool) -> dict[str, np.ndarray]:
        pre, dt = ("flip_" if flipped else ""), self.cfg.dtype
        if self.cfg.store == "sample":
            mean, logvar = t["mean.npy"][row], t["logvar.npy"][row]
            g = torch.Generator().manual_seed(_draw_seed(self.cfg.seed, index, flipped))
            draw = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)
            return {f"{pre}latent.npy": stored_array(stored_tensor(draw, dt), dt)}
        return {f"{pre}{name}": stored_array(a[row], dt) for name, a in t.items()}

    def _meta(self, meta: dict[str, Any], latent_hw: tuple[int, int]) -> dict[str, Any]:
        w, h = meta["size"]
        f, cfg = self.f, self.cfg
        return {
            **meta,
            "padded_size": [math.ceil(w / f) * f, math.ceil(h / f) * f],
            "latent_size": [latent_hw[1], latent_hw[0]],
            "dtype": cfg.dtype,
            "store": cfg.store,
            "flip": cfg.flip,
        }

    def _finish(self, part: int, num_inputs: int, input_errors: list[str], fp32_fallbacks: int) -> None:
        w = self.open_parts.pop(part)
        if input_errors and self.cfg.partial_shards == "fail":
            w.discard()
            self.claims.release(w.part.name)
            self.failed[w.part.name] = input_errors
            log.error("%s: input shard %s could not be read to its end: %s; the part is left for a re-run",
                      w.part.name, w.part.url, "; ".join(input_errors))
            return
        summary = w.publish(self.claims, self.job_id, num_inputs, input_errors, fp32_fallbacks)
        if summary is not None:
            self.parts_written += 1
            self.num_encoded += summary["num_encoded"]
            self.num_skipped += summary["num_skipped"]


def _finite(a: np.ndarray, dtype: str) -> bool:
    if dtype == "bf16":
        return bool(torch.isfinite(torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)).all())
    return bool(np.isfinite(a).all())
