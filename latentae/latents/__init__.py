"""Encoded latents on disk, and a loader that feeds them to a diffusion model.

Layout of an output folder written by ``tools/encode.py`` (:mod:`latentae.encode`)::

    DIR/job.json                  what is being encoded (VAE identity, precision, preprocessing, input)
    DIR/part-NNNNNN-KKKK.tar      WebDataset shards: part N (input files N*shard_size.., or input
                                  shard N) in shards of at most shard_size latents (K = 0, 1, ...)
    DIR/part-NNNNNN.json          that part's counts, its shard files and its skipped inputs;
                                  written last: the part is done when it and its shards exist
    DIR/claims/                   which process is encoding which part (see latentae.encode.claims)
    DIR/tmp/part-NNNNNN/          shards being written, under names unique to their writer
    DIR/manifest.json             everything above merged, written once every part is done

Modules: :mod:`~latentae.latents.format` (the shard format: one sample's members, reading
and writing shards, the manifest), :mod:`~latentae.latents.norm` (the VAE's scaling and
shift), :mod:`~latentae.latents.order` (which latents a rank and worker reads in an epoch,
in which order), :mod:`~latentae.latents.loader` (:class:`LatentDataset`,
:func:`latent_loader`).
"""

from latentae.latents.format import (
    FORMAT,
    JOB,
    MANIFEST,
    READABLE_FORMATS,
    STORE_MODES,
    STORED_DTYPES,
    LatentFormatError,
    LatentTarWriter,
    StoredLatent,
    build_sample,
    count_shard_latents,
    escape_key,
    from_stored,
    iter_shard_latents,
    iter_shard_raw,
    npy_bytes,
    read_manifest,
    resolve_shards,
    stored_array,
    stored_tensor,
    to_stored,
    unescape_key,
)
from latentae.latents.loader import LatentDataset, LatentLoader, collate_latents, latent_loader, sample_seed
from latentae.latents.norm import LatentNorm, manifest_norm

__all__ = [
    "FORMAT",
    "JOB",
    "MANIFEST",
    "READABLE_FORMATS",
    "STORED_DTYPES",
    "STORE_MODES",
    "LatentDataset",
    "LatentFormatError",
    "LatentLoader",
    "LatentNorm",
    "LatentTarWriter",
    "StoredLatent",
    "build_sample",
    "collate_latents",
    "count_shard_latents",
    "escape_key",
    "from_stored",
    "iter_shard_latents",
    "iter_shard_raw",
    "latent_loader",
    "manifest_norm",
    "npy_bytes",
    "read_manifest",
    "resolve_shards",
    "sample_seed",
    "stored_array",
    "stored_tensor",
    "to_stored",
    "unescape_key",
]
