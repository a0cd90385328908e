"""Compare VAEs side by side on the same images: metrics, latent health, an HTML report.

Per image and VAE: PSNR, SSIM, MS-SSIM (images >= 176 px), LPIPS-VGG and -AlexNet,
the latent rate in bits per pixel, the encode / decode time, and the diffusability
figures of ``latentae.diffusability`` (the latent's high-frequency share next to the
image's, and the equivariance PSNRs); per VAE: the mean with a 95% Student-t interval
over images, the paired difference to the first VAE (the baseline; same images, so the
paired interval is the honest test of "B is better than A"), rFID, and the latent
health of ``latentae.health`` (including the mean latent spectrum).

Reconstructions decode the posterior *mean* and are clamped to [-1, 1] before measuring
(the image a user would save). Images stream one at a time: memory holds one image,
its reconstructions, and thumbnails for at most ``max_report_images`` images.

Outputs in ``out_dir``: ``metrics.csv`` (one row per image and VAE, written as it goes,
so an interrupted run keeps what it measured), ``metrics.json`` (everything),
``report.html`` (``latentae.report``). ``format_table`` (``latentae.compare_table``)
renders the terminal tables.
"""

from __future__ import annotations

import csv
import datetime as _dt
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from PIL import Image

from latentae import __version__
from latentae import diffusability as dif
from latentae.compare_metrics import (
    DIFFUSABILITY_NOTE,
    BackboneMode,
    MetricSpec,
    aggregate_rows,
    diffusability_metrics,
    latent_bpp,
    paired_vs_baseline,
    pixel_metrics,
    setup_fid,
    setup_lpips,
    t_interval,
)
from latentae.compare_table import format_table
from latentae.config import to_dict
from latentae.fid import FeatureStats, fid_from_stats, fid_note
from latentae.health import DEFAULT_ACTIVE_KL, LatentStats
from latentae.imageio import BadImage, RawSample, decode_image, iter_source
from latentae.metrics import ms_ssim, ms_ssim_min_size, psnr, ssim
from latentae.model import AutoencoderKL, DiagonalGaussian, count_params
from latentae.precision import precision_record
from latentae import report as rep

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class CompareConfig:
    # Geometry. Neither: native size (the VAE reflect-pads sides that are not a multiple of
    # its downsampling factor and crops the reconstruction back; the report says so).
    size: int | None = None  # resize the shorter side to N, then centre-crop N x N
    crop: int | None = None  # centre-crop N x N at native resolution (smaller images are skipped)
    tile: bool = False  # tiled encode/decode (latentae.tiling) for large images
    tile_size: int = 512  # image pixels
    tile_overlap: int = 128  # image pixels
    # Backbones that need downloaded weights: "auto" uses them when on disk and skips the
    # metric with a notice otherwise; "pretrained" requires them; "random" uses a seeded
    # random backbone (the metric is renamed *_random: not a perceptual measure).
    lpips: BackboneMode = "auto"
    fid: BackboneMode = "auto"
    max_images: int | None = None
    max_report_images: int = 24  # gallery entries (thumbnails, crops, heat maps) kept in memory
    thumb_size: int = 256  # longer side of gallery thumbnails, pixels
    # Gallery thumbnails: JPEG q90 without chroma subsampling keeps VAE artefacts visible and a
    # 24-image report at ~4 MB (16 MB as PNG); heat maps at q<=75; zoomed crops and latents PNG.
    thumb_format: Literal["jpeg", "webp", "png"] = "jpeg"
    thumb_quality: int = 90
    zoom_size: int = 64  # side of the zoomed crop where the error is largest, image pixels
    active_kl: float = DEFAULT_ACTIVE_KL  # nats per latent element (latentae.health)
    latent_bits: int = 16  # bits per stored latent element for the rate (fp16 / bf16 storage)
    device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # VAE compute; metrics are fp32
    seed: int = 0  # posterior samples for the latent statistics
    # Equivariance PSNR (latentae.diffusability): decode(T(z)) vs T(x) for T = area
    # downsampling by each factor and a 90-degree rotation. Costs ~1.3 extra decodes per
    # image and VAE for (2, 4) + rotation; () and False turn them off.
    equivariance_scales: tuple[int, ...] = (2, 4)
    equivariance_rotation: bool = True

    def __post_init__(self):
        if self.size is not None and self.crop is not None:
            raise ValueError("give at most one of size (resize + centre-crop) and crop (centre-crop only)")
        for name in ("size", "crop", "max_images"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if self.tile_overlap < 0 or self.tile_overlap >= self.tile_size:
            raise ValueError(f"tile_overlap must be in [0, tile_size={self.tile_size}), got {self.tile_overlap}")
        if self.max_report_images < 0 or self.thumb_size < 16 or self.zoom_size < 4:
            raise ValueError("max_report_images must be >= 0, thumb_size >= 16 and zoom_size >= 4")
        if self.latent_bits not in (8, 16, 32):
            raise ValueError(f"latent_bits must be 8, 16 or 32, got {self.latent_bits}")
        if self.active_kl < 0:
            raise ValueError(f"active_kl must be >= 0, got {self.active_kl}")
        for name in ("lpips", "fid"):
            if getattr(self, name) not in ("auto", "pretrained", "random", "off"):
                raise ValueError(f"{name} must be auto, pretrained, random or off, got {getattr(self, name)!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if any(not isinstance(s, int) or s < 2 for s in self.equivariance_scales):
            raise ValueError(f"equivariance_scales must be integers >= 2, got {list(self.equivariance_scales)}")
        if self.thumb_format not in ("jpeg", "webp", "png") or not 1 <= self.thumb_quality <= 100:
            raise ValueError(f"thumb_format must be jpeg, webp or png and thumb_quality in 1..100, got {self.thumb_format!r}, {self.thumb_quality}")


@dataclass
class VAEEntry:
    name: str
    source: str
    vae: AutoencoderKL
    stats: LatentStats = field(init=False)
    fid: FeatureStats | None = None
    padded: int = 0

    def __post_init__(self):
        self.stats = LatentStats(self.vae.config.latent_channels, self.vae.config.downsample_factor)


# ----------------------------------------------------------------------------- helpers


def parse_vae_arg(arg: str) -> tuple[str, str]:
    """``NAME=PATH`` (or a bare PATH, named after its file/folder) -> (name, path)."""
    name, sep, path = arg.partition("=")
    if not sep:
        path = arg
        name = Path(arg.rstrip("/")).stem or arg
    if not name or not path:
        raise ValueError(f"--vae expects NAME=PATH, got {arg!r}")
    return name, path


def load_image_tensor(img: Image.Image, cfg: CompareConfig, name: str) -> tuple[torch.Tensor, str | None]:
    """PIL RGB -> ``[1, 3, H, W]`` in [-1, 1] after the configured resize/crop; and what was done."""
    w, h = img.size
    done = None
    if cfg.size is not None:
        s = cfg.size / min(w, h)
        nw, nh = max(cfg.size, round(w * s)), max(cfg.size, round(h * s))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.LANCZOS)
        left, top = (nw - cfg.size) // 2, (nh - cfg.size) // 2
        img = img.crop((left, top, left + cfg.size, top + cfg.size))
        done = "resized" if (w, h) != (cfg.size, cfg.size) else None
    elif cfg.crop is not None:
        if min(w, h) < cfg.crop:
            raise BadImage(name, f"{w}x{h} is smaller than --crop {cfg.crop}")
        left, top = (w - cfg.crop) // 2, (h - cfg.crop) // 2
        img = img.crop((left, top, left + cfg.crop, top + cfg.crop))
        done = "cropped" if (w, h) != (cfg.crop, cfg.crop) else None
    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return (a / 127.5 - 1.0)[None], done


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- the run


class Comparison:
    """One comparison run. ``run(samples)`` streams images; ``finish()`` writes the outputs."""

    def __init__(self, vaes: Sequence[tuple[str, str | Path | AutoencoderKL]], out_dir: str | Path, cfg: CompareConfig, *, data: str = ""):
        if not vaes:
            raise ValueError("nothing to compare: give at least one --vae NAME=PATH")
        names = [n for n, _ in vaes]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"VAE names must be unique, got {sorted(dup)} more than once; name them NAME=PATH")
        self.cfg, self.data = cfg, data
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(cfg.device)
        self.dtype = DTYPES[cfg.dtype]
        self.notices: list[str] = []
        if cfg.tile:
            try:  # fail now, not on every image
                import latentae.tiling  # noqa: F401
            except ImportError as e:
                raise RuntimeError(f"tile=True (--tile) needs latentae.tiling (tiled_encode / tiled_decode): {e}") from e
        self.entries = [self._load(n, src) for n, src in vaes]
        self.metrics: list[MetricSpec] = pixel_metrics()
        self.lpips, lpips_specs = setup_lpips(cfg.lpips, self.device, self.notices)
        self.metrics += lpips_specs
        self.inception, self.fid_key, self.fid_label = setup_fid(cfg.fid, self.device, self.notices)
        self.fid_orig = FeatureStats() if self.inception is not None else None
        for e in self.entries:
            e.fid = FeatureStats() if self.inception is not None else None
        self.metrics.append(MetricSpec("bpp", "bpp", False, 3, f"latent bits per pixel at {cfg.latent_bits} bits/element", rank=False))
        self.metrics += diffusability_metrics(cfg.equivariance_scales, cfg.equivariance_rotation)
        self.eq_too_small: dict[int, set[int]] = {s: set() for s in cfg.equivariance_scales}  # image indices
        self.rows: list[dict[str, Any]] = []
        self.gallery: dict[int, dict[str, Any]] = {}
        self.skipped: list[dict[str, str]] = []
        self.failures: list[dict[str, str]] = []
        self.geometry = {"resized": 0, "cropped": 0}
        self.ms_ssim_too_small = 0
        self.interrupted = False
        self._image_rows: list[dict[str, Any]] = []
        self._csv_file = open(self.out / "metrics.csv", "w", newline="", encoding="utf-8")  # noqa: SIM115
        self._csv_cols = ["image", "vae", "width", "height"] + [m.key for m in self.metrics] + ["encode_s", "decode_s"]
        self._csv = csv.DictWriter(self._csv_file, fieldnames=self._csv_cols, extrasaction="ignore")
        self._csv.writeheader()

    # -- setup

    def _load(self, name: str, src: str | Path | AutoencoderKL) -> VAEEntry:
        if isinstance(src, AutoencoderKL):
            vae, source = src.to(self.device, self.dtype).eval(), f"<in-memory {type(src).__name__}>"
        else:
            from latentae.io import load_vae

            vae, source = load_vae(src, device=self.device, dtype=self.dtype), str(src)
        precision_record(vae)  # a dtype this device cannot compute in fails here, not on every image
        return VAEEntry(name, source, vae)

    # -- per image

    def _codec(self, vae: AutoencoderKL, x: torch.Tensor) -> tuple[DiagonalGaussian, Callable[[torch.Tensor], torch.Tensor]]:
        if not self.cfg.tile:
            return vae.encode(x), vae.decode
        from latentae.tiling import tiled_decode, tiled_encode

        # Tile sizes are given in image pixels; tiled_decode counts latent pixels.
        f = vae.config.downsample_factor
        post = tiled_encode(vae, x, tile=self.cfg.tile_size, overlap=self.cfg.tile_overlap)
        t, o = max(1, self.cfg.tile_size // f), self.cfg.tile_overlap // f
        return post, lambda z: tiled_decode(vae, z, tile=t, overlap=o)

    @torch.inference_mode()
    def add_image(self, index: int, key: str, x: torch.Tensor) -> None:
        """Measure every VAE on one image ``x`` ``[1, 3, H, W]`` in [-1, 1] (CPU float32)."""
        cfg = self.cfg
        x = x.to(self.device, torch.float32)
        _, _, h, w = x.shape
        in_gallery = len(self.gallery) < cfg.max_report_images
        if min(h, w) < ms_ssim_min_size():
            self.ms_ssim_too_small += 1
        done: dict[str, tuple[torch.Tensor, dict[str, Any], torch.Tensor]] = {}
        for e in self.entries:
            try:
                rec, m, z = self._reconstruct(e, index, x)
            except (RuntimeError, ValueError, FloatingPointError) as err:  # one image must not end the run
                self._fail(key, e.name, err)
                continue
            done[e.name] = (rec, m, z)
        if done:
            # The backbone metrics run once per image on all reconstructions together (a batch).
            names = list(done)
            recs = torch.cat([done[n][0] for n in names])  # [K, 3, H, W]
            try:
                for k, lp in self.lpips.items():
                    for n, v in zip(names, lp(x.expand_as(recs), recs).tolist()):
                        done[n][1][k] = v
                # rFID needs the same images on both sides: skip an image some VAE failed on.
                if self.inception is not None and len(done) == len(self.entries):
                    feats = self.inception(torch.cat([x, recs]))
                    self.fid_orig.update(feats[:1])
                    for e, f in zip(self.entries, feats[1:]):
                        e.fid.update(f[None])
            except RuntimeError as err:  # e.g. out of memory in LPIPS on a huge image
                self._fail(key, "LPIPS/Inception", err)
        per_vae = {}
        for n, (_, m, _) in done.items():
            per_vae[n] = m
            row = {"image": key, "vae": n, "width": w, "height": h, **m}
            self.rows.append(row)
            self._csv.writerow({k: ("" if v is None else v) for k, v in row.items()})
        self._csv_file.flush()
        if in_gallery and done:
            recons = {n: r[0].cpu() for n, (r, _, _) in done.items()}
            self.gallery[index] = self._gallery_entry(x[0].cpu(), recons, {n: z for n, (_, _, z) in done.items()})
        self._image_rows.append({"key": key, "width": w, "height": h, "metrics": per_vae, "index": index})

    def _fail(self, key: str, what: str, err: Exception) -> None:
        log.warning("%s on %s failed: %s", what, key, err)
        self.failures.append({"image": key, "vae": what, "error": f"{type(err).__name__}: {err}"})

    def _reconstruct(self, e: VAEEntry, index: int, x: torch.Tensor):
        """One VAE on one image: (reconstruction [1, 3, H, W] clamped, pixel metrics, latent mean [C, h, w] on CPU)."""
        cfg = self.cfg
        h, w = x.shape[-2:]
        f = e.vae.config.downsample_factor
        if h % f or w % f:
            e.padded += 1
        _sync(self.device)
        t0 = time.perf_counter()
        post, decode = self._codec(e.vae, x.to(self.dtype))
        _sync(self.device)
        t1 = time.perf_counter()
        rec = decode(post.mean)[..., :h, :w].float()
        _sync(self.device)
        t2 = time.perf_counter()
        if not torch.isfinite(rec).all():
            raise FloatingPointError(f"reconstruction has non-finite values (dtype {cfg.dtype})")
        rec = rec.clamp(-1, 1)
        # Seeded per image, not per VAE order: the same image always gets the same noise.
        gen = torch.Generator(device=post.mean.device).manual_seed(cfg.seed * 1_000_003 + index)
        spec = e.stats.update(post, post.sample(gen).float(), images=x)
        m: dict[str, Any] = {
            "psnr": psnr(x, rec).item(),
            "ssim": ssim(x, rec).item(),
            "ms_ssim": ms_ssim(x, rec).item() if min(h, w) >= ms_ssim_min_size() else None,
            "bpp": latent_bpp(post.mean.shape[1:], h, w, cfg.latent_bits),
            "encode_s": t1 - t0,
            "decode_s": t2 - t1,
            "hf_share": spec["hf_share"].item(),
            "hf_share_image": spec["hf_share_image"].item(),
            **self._equivariance(decode, post.mean, x, f, index),
        }
        return rec, m, post.mean[0].float().cpu()

    def _equivariance(self, decode, z: torch.Tensor, x: torch.Tensor, f: int, index: int) -> dict[str, float | None]:
        """PSNR of decode(T(z)) vs T(x) per configured transform (None: latent too small)."""
        out: dict[str, float | None] = {}
        hl, wl = x.shape[-2] // f, x.shape[-1] // f
        for s in self.cfg.equivariance_scales:
            ok = min(hl, wl) >= s
            out[f"eq_down{s}_psnr"] = dif.equivariance_psnr(decode, z, x, f"down{s}", f).item() if ok else None
            if not ok:
                self.eq_too_small[s].add(index)
        if self.cfg.equivariance_rotation:
            out["eq_rot90_psnr"] = dif.equivariance_psnr(decode, z, x, "rot90", f).item()
        return out

    def _gallery_entry(self, x: torch.Tensor, recons: dict[str, torch.Tensor], latents: dict[str, torch.Tensor]):
        cfg = self.cfg
        return rep.gallery_entry(x, recons, latents, thumb_size=cfg.thumb_size, zoom_size=cfg.zoom_size,
                                 fmt=cfg.thumb_format, quality=cfg.thumb_quality)

    # -- driving

    def run(self, samples, progress: Callable[[int, str], None] | None = None) -> None:
        """Measure every sample (``RawSample`` or ``(key, PIL image)``) until ``max_images``."""
        used = len(self._image_rows)
        try:
            for s in samples:
                if self.cfg.max_images is not None and used >= self.cfg.max_images:
                    break
                try:
                    if isinstance(s, RawSample):
                        key, img = s.key, decode_image(s.data, s.source)
                    else:
                        key, img = s
                    x, done = load_image_tensor(img, self.cfg, key)
                except BadImage as e:
                    self.skipped.append({"image": e.name, "reason": e.reason})
                    log.warning("skipping %s: %s", e.name, e.reason)
                    continue
                if done:
                    self.geometry[done] += 1
                self.add_image(used, key, x)
                used += 1
                if progress:
                    progress(used, key)
        except KeyboardInterrupt:
            self.interrupted = True
            self.notices.append(f"INTERRUPTED after {used} images: results cover those only.")

    def on_error(self, name: str, reason: str) -> None:
        """Unreadable files / shards from the image source: skipped and listed."""
        self.skipped.append({"image": name, "reason": reason})
        log.warning("skipping %s: %s", name, reason)

    def _geometry_notices(self) -> list[str]:
        n, out, cfg = len(self._image_rows), [], self.cfg
        if self.geometry["resized"]:
            out.append(f"{self.geometry['resized']} of {n} images were resized (shorter side -> {cfg.size}) and centre-cropped to {cfg.size}x{cfg.size}.")
        if self.geometry["cropped"]:
            out.append(f"{self.geometry['cropped']} of {n} images were centre-cropped to {cfg.crop}x{cfg.crop}.")
        for e in self.entries:
            if e.padded:
                f = e.vae.config.downsample_factor
                out.append(
                    f"{e.name}: {e.padded} of {n} images have a side that is not a multiple of {f}; the VAE "
                    f"reflect-padded them and the reconstruction was cropped back (edges may score slightly worse)."
                )
        if self.ms_ssim_too_small:
            out.append(
                f"MS-SSIM is n/a for {self.ms_ssim_too_small} of {n} images: 5-scale MS-SSIM needs at least "
                f"{ms_ssim_min_size()}x{ms_ssim_min_size()} pixels."
            )
        if self.skipped:
            shown = "; ".join(f"{s['image']}: {s['reason']}" for s in self.skipped[:5])
            more = f" (and {len(self.skipped) - 5} more, see metrics.json)" if len(self.skipped) > 5 else ""
            out.append(f"{len(self.skipped)} images skipped: {shown}{more}")
        if self.failures:
            shown = "; ".join(f"{f['vae']} on {f['image']}: {f['error']}" for f in self.failures[:3])
            out.append(f"{len(self.failures)} (image, VAE) measurements FAILED: {shown}")
        for s, idx in self.eq_too_small.items():
            if idx:
                out.append(f"Equivariance PSNR at 1/{s} scale is n/a for {len(idx)} of {n} images: their latents are smaller than {s} pixels.")
        if len(self._image_rows) > len(self.gallery):
            out.append(f"Gallery shows the first {len(self.gallery)} of {n} images (--max-report-images).")
        return out

    def summary(self) -> dict[str, Any]:
        """Everything measured, as plain JSON-ready Python (also the report's data)."""
        cfg = self.cfg
        n_img = len(self._image_rows)
        keys = [m.key for m in self.metrics] + ["encode_s", "decode_s"]
        names = [e.name for e in self.entries]
        base = names[0]
        aggregate = aggregate_rows(self.rows, names, keys)
        paired = paired_vs_baseline(self.rows, names, [m.key for m in self.metrics])
        rfid = {}
        if self.fid_orig is not None:
            for e in self.entries:
                ok = self.fid_orig.n >= 2 and e.fid.n == self.fid_orig.n
                rfid[e.name] = fid_from_stats(self.fid_orig, e.fid) if ok else None
        health = {}
        for e in self.entries:
            if e.stats.images:
                health[e.name] = e.stats.result(cfg.active_kl, e.vae.config.scaling_factor, e.vae.config.shift_factor)
        vaes = []
        for e in self.entries:
            c = e.vae.config
            vaes.append({
                "name": e.name,
                "source": e.source,
                "latent_channels": c.latent_channels,
                "downsample_factor": c.downsample_factor,
                "block_out_channels": list(c.block_out_channels),
                "params": count_params(e.vae),
                "scaling_factor": c.scaling_factor,
                "shift_factor": c.shift_factor,
                "bpp_nominal": c.latent_channels * cfg.latent_bits / c.downsample_factor**2,
                # the dtype that actually ran, and the parts moved to fp32 after an fp16 overflow
                "precision": precision_record(e.vae),
            })
        notices = list(self.notices) + self._geometry_notices()
        if self.fid_orig is not None:
            if self.fid_orig.n < n_img:
                notices.append(f"rFID covers {self.fid_orig.n} of {n_img} images (images some VAE failed on are left out).")
            notices.append(fid_note(self.fid_orig.n))
        interval = (
            "Intervals: 95% Student-t confidence interval of the mean over images, mean +- t(0.975, n-1) * s / sqrt(n). "
            f"paired_vs_baseline: the same for the per-image difference (VAE - {base}), the fair test of a difference."
        )
        return {
            "title": "VAE comparison",
            "subtitle": f"{n_img} images from {self.data or 'memory'}; {len(self.entries)} VAEs; latentae {__version__}; "
            f"{_dt.datetime.now().isoformat(timespec='seconds')}",
            "latentae_version": __version__,
            "data": self.data,
            "options": to_dict(cfg),
            "interrupted": self.interrupted,
            "interval": interval,
            "interval_short": "95% Student-t interval",
            "notices": notices,
            "metrics": [m.__dict__ for m in self.metrics],
            "vaes": vaes,
            "images_used": n_img,
            "skipped": self.skipped,
            "failures": self.failures,
            "aggregate": aggregate,
            "paired_vs_baseline": {"baseline": base, **paired},
            "rfid_key": self.fid_key if self.fid_orig is not None else None,
            "rfid_label": self.fid_label,
            "rfid": rfid,
            "rfid_images": self.fid_orig.n if self.fid_orig is not None else 0,
            "rfid_note": fid_note(self.fid_orig.n) if self.fid_orig is not None else "rFID not computed",
            "latent_health": health,
            "diffusability_note": DIFFUSABILITY_NOTE,
            "per_image": self.rows,
        }

    def finish(self) -> dict[str, Any]:
        """Write metrics.json and report.html; returns the summary."""
        import json

        self._csv_file.close()
        s = self.summary()
        (self.out / "metrics.json").write_text(json.dumps(rep._clean(s), indent=1, allow_nan=False) + "\n")
        page = dict(s)
        table_rows = self._image_rows[:5000]  # the CSV has all; a DOM table of 50k rows helps nobody
        page["images"] = [
            {**{k: r[k] for k in ("key", "width", "height", "metrics")}, "gallery": self.gallery.get(r["index"])}
            for r in table_rows
        ]
        if len(self._image_rows) > len(table_rows):
            page["notices"] = s["notices"] + [f"The per-image table shows {len(table_rows)} of {len(self._image_rows)} images; metrics.csv has all."]
        del page["per_image"]
        rep.write_report(page, self.out / "report.html")
        return s


def run_compare(
    vaes: Sequence[tuple[str, str | Path | AutoencoderKL]],
    data: str | Path | Sequence[tuple[str, Image.Image]],
    out_dir: str | Path,
    cfg: CompareConfig = CompareConfig(),
    progress: Callable[[int, str], None] | None = None,
) -> dict[str, Any]:
    """Compare ``vaes`` (``(name, path-or-model)``) on ``data`` (an image folder / shard
    pattern, or ``(key, PIL image)`` pairs); write ``out_dir``; return the summary."""
    label = str(data) if isinstance(data, (str, Path)) else f"{len(data)} in-memory images"
    comp = Comparison(vaes, out_dir, cfg, data=label)
    samples = iter_source(str(data), on_error=comp.on_error) if isinstance(data, (str, Path)) else data
    comp.run(samples, progress)
    if not comp.rows:
        comp._csv_file.close()
        why = "; ".join(f"{s['image']}: {s['reason']}" for s in comp.skipped[:3]) or "no images"
        fails = "; ".join(f"{f['vae']} on {f['image']}: {f['error']}" for f in comp.failures[:3])
        raise RuntimeError(f"no image could be measured ({why}{'; ' + fails if fails else ''})")
    return comp.finish()


__all__ = ["CompareConfig", "Comparison", "diffusability_metrics", "format_table", "latent_bpp", "parse_vae_arg", "run_compare", "t_interval"]
