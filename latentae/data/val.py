"""Fixed validation images: centred crops, never used for training."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from latentae.data.config import DataConfig
from latentae.data.filelist import FileList
from latentae.data.folder import held_out, spread
from latentae.data.loader import open_file_list, shard_holdout
from latentae.data.transforms import decode_min_side, val_transform
from latentae.imageio import BadImage, decode_image
from latentae.sources import check_path, expand_shards, is_shard_source, iter_source

log = logging.getLogger(__name__)


def build_val_images(cfg: DataConfig, n: int, *, file_list: FileList | str | Path | None = None,
                     shard_urls: list[str] | None = None) -> torch.Tensor:
    """``n`` fixed validation images, centre-cropped: [n, 3, R, R] in [-1, 1].

    From ``cfg.val_path`` (n evenly spread images of a folder, or the first n of a
    shard set) or, without it, from the images held out of ``cfg.path`` (which the
    training loader never uses; ``file_list`` is ``cfg.path``'s stored list, if any, and
    ``shard_urls`` its expanded shard list).
    Bad images are skipped with a warning, so fewer than ``n`` may come back
    (warned); none at all is an error.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    r = cfg.resolution
    if n == 0:
        return torch.empty(0, 3, r, r)
    src = check_path(cfg.val_path if cfg.val_path is not None else cfg.path)
    if cfg.val_path is None and cfg.num_val == 0:
        raise ValueError("no validation images: data.num_val is 0 and data.val_path is unset")
    candidates: list[tuple[bytes | Path, str]] = []
    if is_shard_source(src):
        if cfg.val_path is None:
            urls = expand_shards(src) if shard_urls is None else shard_urls
            candidates = [(s.data, s.source) for s in shard_holdout(urls, cfg)]
        else:
            for s in iter_source(src):
                candidates.append((s.data, s.source))
                if len(candidates) >= 4 * n:  # room for bad ones
                    break
    else:
        files = open_file_list(src, file_list if cfg.val_path is None else None)
        pool = held_out(len(files), cfg) if cfg.val_path is None else range(len(files))
        order = [pool[i] for i in spread(len(pool), n)]
        picked = set(order)
        rest = [i for i in pool[: 4 * n + len(order)] if i not in picked][: 3 * n]  # room for bad ones
        for i in order + rest:
            path = os.path.join(src, files[i])
            candidates.append((Path(path), path))
    images, skipped = [], []
    for data, name in candidates:
        try:
            img = decode_image(data, name, min_side=decode_min_side(cfg))
            images.append(val_transform(img, cfg, name))
        except BadImage as e:
            skipped.append(e)
            log.warning("validation image skipped: %s", e)
        if len(images) == n:
            break
    if not images:
        why = "; ".join(str(e) for e in skipped[:3]) or "no images"
        raise ValueError(f"no usable validation image in {src}: {why}")
    if len(images) < n:
        log.warning("asked for %d validation images, found %d usable in %s", n, len(images), src)
    return torch.stack(images)
