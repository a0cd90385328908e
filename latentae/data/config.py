"""``DataConfig``: where training images come from and how they become crops."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from latentae.config import check_types


@dataclass(frozen=True)
class DataConfig:
    path: str = ""  # image folder, shard pattern or pipe: URL; required at train time
    val_path: str | None = None  # held-out images; None = hold out `num_val` images of `path`
    num_val: int = 8
    resolution: int = 256  # training crop size (pixels)
    # How a training crop is cut (see latentae/data/transforms.py):
    #   resize:   the shorter side is resized to `resolution` (unless resize_shorter is
    #             false: native pixels), then a `resolution` square is cropped.
    #   scale:    a square of resolution / s source pixels is cropped and resized to
    #             `resolution`, s drawn uniformly from `crop_range` (output pixels per
    #             source pixel): s = 1 copies native pixels, no resampling at all.
    #   fraction: LDM's ImageNetSR crop (min_crop_f/max_crop_f): a square whose side is
    #             f x the shorter side, f drawn uniformly from `crop_range`, resized.
    crop: Literal["resize", "scale", "fraction"] = "resize"
    resize_shorter: bool = True  # crop=resize only
    crop_range: tuple[float, ...] = (0.5, 1.0)  # crop=scale / fraction: [low, high]
    # An image too small for the crop without upsampling (shorter side < resolution for
    # crop=resize; no region in crop_range without upsampling for scale/fraction):
    #   upscale: resize it up anyway (blurry crops); skip: drop it, counted and named
    #   like a bad sample; pad: native pixels on a mid-grey canvas, never resampled.
    small_images: Literal["upscale", "skip", "pad"] = "upscale"
    random_crop: bool = True  # False = centred crop (the scale is still drawn)
    flip: bool = True  # random horizontal flip
    num_workers: int = 2  # DataLoader worker processes per rank (0 = in the main process)
    # Shards only. Each worker reads this many shards at once, drawing every sample from
    # a randomly chosen one (more shards per batch; each open shard is one open file or
    # pipe: command).
    shards_per_worker: int = 4
    # Shards only: samples then pass a seeded shuffle buffer of this many *undecoded*
    # files per worker (1 = no buffer). Memory ~ buffer x file size x workers.
    shuffle_buffer: int = 1000
    # crop=resize with resize_shorter: decode big JPEGs at a reduced DCT scale (1/2..1/8,
    # never below `resolution`) before the bicubic resize. 2-8x less decoding for camera
    # photos; the crops differ from a full decode by noise (PSNR > 36 dB measured).
    # Other crops keep native pixels and always decode in full.
    fast_jpeg: bool = True

    def __post_init__(self):
        if isinstance(self.crop_range, list):  # built in code from a list: keep the config hashable
            object.__setattr__(self, "crop_range", tuple(self.crop_range))
        check_types(self)
        if self.resolution < 8:
            raise ValueError(f"data.resolution must be >= 8 pixels, got {self.resolution}")
        if self.num_val < 0:
            raise ValueError(f"data.num_val must be >= 0, got {self.num_val}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer must be >= 1 (1 = no shuffling), got {self.shuffle_buffer}")
        if self.shards_per_worker < 1:
            raise ValueError(f"data.shards_per_worker must be >= 1, got {self.shards_per_worker}")
        if len(self.crop_range) != 2:
            raise ValueError(f"data.crop_range must be [low, high], got {list(self.crop_range)}")
        lo, hi = self.crop_range
        if not 0 < lo <= hi:
            raise ValueError(f"data.crop_range must satisfy 0 < low <= high, got {list(self.crop_range)}")
        if self.crop == "fraction" and hi > 1:
            raise ValueError(f"data.crop_range is a fraction of the shorter side with crop=fraction: high <= 1, got {hi}")
        if self.crop == "scale" and hi > 8:
            raise ValueError(f"data.crop_range with crop=scale is output/source pixels: high <= 8, got {hi}")
        if self.crop == "scale" and self.small_images != "upscale" and lo > 1:
            raise ValueError(
                f"data.crop_range low {lo} > 1 upsamples every crop, which data.small_images={self.small_images} "
                "forbids: use a range within (0, 1] or small_images=upscale"
            )
        if self.crop != "resize" and not self.resize_shorter:
            raise ValueError(f"data.resize_shorter applies to data.crop=resize only (crop is {self.crop!r})")
