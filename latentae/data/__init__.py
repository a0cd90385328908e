"""Training data: deterministic crops, and a loader whose position resumes.

Modules, by responsibility:

* ``config``     ``DataConfig``
* ``transforms`` crops (resize / native scale / LDM fraction), per-sample seeding, collate
* ``filelist``   ``FileList``: a folder's image paths, compact and memory-mapped
* ``folder``     folder dataset and its epoch sampler
* ``shards``     WebDataset shard streams: interleaving, shuffle buffer, positions
* ``loader``     ``TrainLoader`` / ``build_train_loader``: state, exact and elastic resume
* ``val``        ``build_val_images``

Sources and decoding live in ``latentae.sources`` / ``latentae.imageio``; their common
names are re-exported here, so ``from latentae.data import ...`` keeps working.
"""

from latentae.data.config import DataConfig
from latentae.data.filelist import FileList, prepare_file_list
from latentae.data.folder import EpochBatchSampler, FolderDataset
from latentae.data.loader import TrainLoader, build_train_loader, shard_digest
from latentae.data.shards import ShardStream, SlotStream
from latentae.data.transforms import (
    Crop,
    collate,
    hash_seed,
    min_shorter_side,
    plan_crop,
    sample_rng,
    to_tensor,
    train_transform,
    val_transform,
)
from latentae.data.val import build_val_images
from latentae.imageio import BadImage, decode_image
from latentae.sources import (
    IMAGE_EXTENSIONS,
    RawSample,
    check_source,
    expand_shards,
    iter_source,
    list_images,
    split_for_worker,
    walk_images,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadImage",
    "Crop",
    "DataConfig",
    "EpochBatchSampler",
    "FileList",
    "FolderDataset",
    "RawSample",
    "ShardStream",
    "SlotStream",
    "TrainLoader",
    "build_train_loader",
    "build_val_images",
    "check_source",
    "collate",
    "decode_image",
    "expand_shards",
    "hash_seed",
    "iter_source",
    "list_images",
    "min_shorter_side",
    "plan_crop",
    "prepare_file_list",
    "sample_rng",
    "shard_digest",
    "split_for_worker",
    "to_tensor",
    "train_transform",
    "val_transform",
    "walk_images",
]
