"""The stored format of encoded latents: arrays, samples, shards, folders.

One sample of a shard (member names ``<key>.<field>``; the key has '.' and '%' escaped as
``%2E`` / ``%25`` because WebDataset splits a member name at its first dot)::

    <key>.json          {"key", "index", "source", "original_size", "resized_size", "crop_box",
                         "size", "padded_size", "latent_size", "dtype", "store", ...}
    <key>.mean.npy      [C, h, w]  posterior mean        } store="dist" (the default)
    <key>.logvar.npy    [C, h, w]  posterior log-variance }
    <key>.latent.npy    [C, h, w]  store="mode" (the mean) or "sample" (one seeded draw)
    <key>.flip_*.npy    the same for the horizontally flipped image (``--flip``)

Sizes are ``[width, height]`` (PIL order), ``crop_box`` is ``[left, top, right, bottom]`` in
the resized image. Arrays are fp16, fp32, or bf16; NumPy has no bf16, so bf16 is stored as
the raw 16-bit pattern in a ``uint16`` array and ``"dtype": "bf16"`` in the json says so
(:func:`from_stored` turns it back into a tensor).
"""

from __future__ import annotations

import glob
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Sequence

import numpy as np
import torch

FORMAT = "latentae.latents/2"
# Version 1 (before the per-input-shard parts) has the same shards and the same manifest
# fields that reading needs ("shards": [{"file", "num_encoded"}], "job"), so it is still read.
READABLE_FORMATS = ("latentae.latents/1", FORMAT)
MANIFEST = "manifest.json"
JOB = "job.json"
STORED_DTYPES = ("fp16", "bf16", "fp32")
STORE_MODES = ("dist", "mode", "sample")


class LatentFormatError(ValueError):
    """A latents folder or shard that does not follow the format above; names the file."""


# ----------------------------------------------------------------------------- arrays


def stored_tensor(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """Float tensor -> the tensor whose bytes are stored (bf16 as its int16 bit pattern).
    Works on any device, so a GPU can round before the copy to the host."""
    if dtype == "fp32":
        return t.float()
    if dtype == "fp16":
        return t.half()
    if dtype == "bf16":  # torch rounds to nearest-even; the int16 view keeps the bits
        return t.bfloat16().view(torch.int16)
    raise ValueError(f"unknown latent dtype {dtype!r}, expected one of {STORED_DTYPES}")


def stored_array(t: torch.Tensor, dtype: str) -> np.ndarray:
    """CPU tensor from :func:`stored_tensor` -> the NumPy array written to ``.npy``."""
    a = t.numpy()
    return a.view(np.uint16) if dtype == "bf16" else a


def to_stored(t: torch.Tensor, dtype: str) -> np.ndarray:
    """Float tensor -> the array written to ``.npy`` (bf16 as its uint16 bit pattern)."""
    return stored_array(stored_tensor(t.detach().cpu(), dtype), dtype)


def from_stored(a: np.ndarray, dtype: str, where: str = "array") -> torch.Tensor:
    """Array read from ``.npy`` -> float32 tensor."""
    if dtype == "bf16":
        if a.dtype != np.uint16:
            raise LatentFormatError(f"{where}: dtype says bf16, so a uint16 array was expected, got {a.dtype}")
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16).float()
    want = {"fp16": np.float16, "fp32": np.float32}.get(dtype)
    if want is None:
        raise LatentFormatError(f"{where}: unknown dtype {dtype!r}, expected one of {STORED_DTYPES}")
    if a.dtype != want:
        raise LatentFormatError(f"{where}: dtype says {dtype}, but the array is {a.dtype}")
    return torch.from_numpy(np.ascontiguousarray(a)).float()


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}


def load_npy(data: bytes, where: str = "array") -> np.ndarray:
    """``.npy`` bytes -> array, like ``np.load`` without pickles. The header of every array
    of a shard is the same few bytes: parsed once and cached (np.load parses each with
    ``ast``, which was a third of the loader's time per latent)."""
    if data[:6] != b"\x93NUMPY" or len(data) < 10:
        raise LatentFormatError(f"{where}: not a .npy array (no NumPy magic)")
    end = 10 if data[6] == 1 else 12
    header = data[: end + int.from_bytes(data[8:end], "little")]
    info = _NPY_HEADERS.get(header)
    if info is None:
        fmt = np.lib.format
        try:
            f = io.BytesIO(data)
            version = fmt.read_magic(f)
            if version not in ((1, 0), (2, 0)):  # 3.0 (utf-8 field names): np.load's slow path
                return np.load(io.BytesIO(data), allow_pickle=False)
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read(f)
        except Exception as e:  # noqa: BLE001 - numpy raises ValueError, SyntaxError, TokenError ...
            raise LatentFormatError(f"{where}: not a readable .npy array: {type(e).__name__}: {e}") from e
        if dtype.hasobject:
            raise LatentFormatError(f"{where}: .npy of Python objects; latents are numbers")
        if len(_NPY_HEADERS) > 4096:
            _NPY_HEADERS.clear()
        info = _NPY_HEADERS[header] = (dtype, shape, fortran)
    dtype, shape, fortran = info
    count = int(np.prod(shape))
    if len(data) < len(header) + count * dtype.itemsize:
        raise LatentFormatError(f"{where}: .npy array cut short ({len(data)} bytes for {shape} {dtype})")
    a = np.frombuffer(data, dtype=dtype, count=count, offset=len(header))
    return a.reshape(shape, order="F" if fortran else "C").copy()  # writable, owns its memory


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def escape_key(key: str) -> str:
    """A sample key safe as a WebDataset member prefix: no '.' in it (reversible)."""
    return key.replace("%", "%25").replace(".", "%2E")


def unescape_key(key: str) -> str:
    return key.replace("%2E", ".").replace("%25", "%")


# ----------------------------------------------------------------------------- one sample


@dataclass
class StoredLatent:
    """One stored sample. ``mean``/``logvar`` are float32 [C, h, w]; when only a point
    was stored (``store`` "mode" or "sample"), ``mean`` is that point and ``logvar`` None."""

    key: str
    meta: dict[str, Any]
    mean: torch.Tensor
    logvar: torch.Tensor | None = None
    flip_mean: torch.Tensor | None = None
    flip_logvar: torch.Tensor | None = None

    @property
    def index(self) -> int:
        return int(self.meta["index"])

    def draw(self, generator: torch.Generator | None, flipped: bool = False) -> torch.Tensor:
        """A sample from the stored distribution (the point itself when no logvar is stored)."""
        mean, logvar = (self.flip_mean, self.flip_logvar) if flipped else (self.mean, self.logvar)
        if mean is None:
            raise LatentFormatError(f"sample '{self.key}' has no flipped latents (encode with --flip)")
        if logvar is None or generator is None:
            return mean
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * eps


_ARRAY_FIELDS = {
    "mean.npy": "mean",
    "logvar.npy": "logvar",
    "latent.npy": "mean",
    "flip_mean.npy": "flip_mean",
    "flip_logvar.npy": "flip_logvar",
    "flip_latent.npy": "flip_mean",
}


def build_sample(shard: str, key: str, members: dict[str, bytes]) -> StoredLatent:
    """The member bytes of one sample (``{"json": ..., "mean.npy": ...}``) -> StoredLatent."""
    where = f"{shard}:{key}"
    if "json" not in members:
        raise LatentFormatError(f"{where}: sample has no .json metadata (members: {sorted(members)})")
    try:
        meta = json.loads(members["json"])
    except json.JSONDecodeError as e:
        raise LatentFormatError(f"{where}.json: invalid JSON: {e}") from e
    dtype = meta.get("dtype")
    arrays: dict[str, torch.Tensor] = {}
    for ext, name in _ARRAY_FIELDS.items():
        if ext in members:
            arrays[name] = from_stored(load_npy(members[ext], f"{where}.{ext}"), dtype, f"{where}.{ext}")
    if "mean" not in arrays:
        raise LatentFormatError(f"{where}: no latent array (expected mean.npy or latent.npy)")
    return StoredLatent(key=meta.get("key", unescape_key(key)), meta=meta, **arrays)


# ----------------------------------------------------------------------------- shards


def _split(name: str) -> tuple[str, str] | None:
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    return (name[:dot], name[dot + 1 :]) if dot >= 0 else None


_BLOCK = 512
_FILE_TYPES = (b"0", b"\0", b"7")


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # base-256 (GNU, for sizes >= 8 GiB)
        return int.from_bytes(field[1:], "big")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _pax_path(records: bytes) -> str | None:
    i = 0
    while i < len(records):
        space = records.index(b" ", i)
        n = int(records[i:space])
        key, _, value = records[space + 1 : i + n - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8")
        i += n
    return None


def _tar_entries(f: IO[bytes], path: str) -> Iterator[tuple[str, int, int]]:
    """``(name, data offset, size)`` of a tar's regular files, reading headers only.

    Our own reader (ustar, pax and GNU long names), not ``tarfile``: decoding a header is
    the inner loop of the latent loader, and tarfile spent ~70 us on each."""
    pos, long_name = 0, None
    while True:
        f.seek(pos)
        h = f.read(_BLOCK)
        if not h or h == bytes(_BLOCK):  # end of the archive (the end blocks may be missing)
            return
        try:
            if len(h) < _BLOCK:
                raise ValueError("the file ends inside a header")
            if _octal(h[148:156]) != sum(h[:148]) + 256 + sum(h[156:]):
                raise ValueError("bad header checksum")
            size = _octal(h[124:136])
        except ValueError as e:
            raise LatentFormatError(f"{path}: not a readable tar at byte {pos}: {e}") from e
        kind, data = h[156:157], pos + _BLOCK
        pos = data + -(-size // _BLOCK) * _BLOCK
        if kind in (b"x", b"L"):  # the next member's name: pax record or GNU long name
            f.seek(data)
            raw = f.read(size)
            long_name = _pax_path(raw) if kind == b"x" else raw.rstrip(b"\0").decode("utf-8")
            continue
        if kind in _FILE_TYPES:
            name = long_name
            if name is None:
                name = h[:100].split(b"\0", 1)[0].decode("utf-8")
                prefix = h[345:500].split(b"\0", 1)[0] if h[257:262] == b"ustar" else b""
                if prefix:
                    name = prefix.decode("utf-8") + "/" + name
            yield name, data, size
        long_name = None


def _members(f: IO[bytes], path: str) -> Iterator[tuple[int, str, str, int, int]]:
    """``(sample position, key, field, data offset, size)`` in file order; a sample is a run
    of members with one key."""
    position, current = -1, None
    for name, offset, size in _tar_entries(f, path):
        split = _split(name)
        if split is None:
            continue
        key, ext = split
        if key != current:
            position, current = position + 1, key
        yield position, key, ext, offset, size


def _open_shard(path: str) -> IO[bytes]:
    try:
        return open(path, "rb")  # noqa: SIM115 - closed by the callers' with
    except OSError as e:
        raise LatentFormatError(f"{path}: cannot open latent shard: {e}") from e


def iter_shard_raw(
    path: str | Path, wanted: Callable[[int], bool] | None = None, stop_after: int | None = None
) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """``(position, key, member bytes)`` of a shard's samples in file order.

    ``wanted(position)``: read only those samples' bytes; the others are passed over by
    their headers (the file is seekable), so picking a few samples of a shard costs
    little more than reading them. ``stop_after``: stop after this position.
    """
    path = str(path)
    with _open_shard(path) as f:
        current: tuple[int, str] | None = None
        members: dict[str, bytes] = {}
        for position, key, ext, offset, size in _members(f, path):
            if current is None or position != current[0]:
                if current is not None and members:
                    yield current[0], current[1], members
                if stop_after is not None and position > stop_after:
                    return
                current, members = (position, key), {}
            if wanted is None or wanted(position):
                f.seek(offset)
                data = f.read(size)
                if len(data) < size:
                    raise LatentFormatError(f"{path}: cut short inside {key}.{ext}")
                members[ext] = data
        if current is not None and members:
            yield current[0], current[1], members


def iter_shard_latents(path: str | Path) -> Iterator[StoredLatent]:
    """The samples of one latent shard, in file order."""
    for _, key, members in iter_shard_raw(path):
        yield build_sample(str(path), key, members)


def count_shard_latents(path: str | Path) -> int:
    """Samples in a shard, from its headers only."""
    path = str(path)
    with _open_shard(path) as f:
        return 1 + max((position for position, *_ in _members(f, path)), default=-1)


class LatentTarWriter:
    """Writes samples in the format above to an open binary file (a plain tar)."""

    def __init__(self, file: IO[bytes]):
        self.tar = tarfile.open(fileobj=file, mode="w", format=tarfile.PAX_FORMAT)
        self.used: set[str] = set()
        self.count = 0

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed mtime: same job, same bytes
        self.tar.addfile(info, io.BytesIO(data))

    def add(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """``arrays``: ``{"mean.npy": array, ...}``; ``meta`` must hold "key" and "index"."""
        key = escape_key(meta["key"])
        if key in self.used:  # equal keys from different input shards: keep samples apart
            key = f"{key}~{meta['index']}"
        self.used.add(key)
        self._add(f"{key}.json", json.dumps(meta).encode())
        for ext, a in arrays.items():
            self._add(f"{key}.{ext}", npy_bytes(a))
        self.count += 1

    def close(self) -> None:
        self.tar.close()


# ----------------------------------------------------------------------------- folders


def read_manifest(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    p = folder / MANIFEST
    if not p.is_file():
        hint = (
            " (job.json is there: the encoding job has not finished; re-run the same encode command)"
            if (folder / JOB).is_file()
            else ""
        )
        raise FileNotFoundError(f"no {MANIFEST} in {folder}{hint}")
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise LatentFormatError(f"{p}: invalid JSON: {e}") from e
    if m.get("format") not in READABLE_FORMATS:
        raise LatentFormatError(f"{p}: format is {m.get('format')!r}, expected one of {READABLE_FORMATS}")
    return m


def resolve_shards(
    source: str | Path | Sequence[str | Path],
) -> tuple[list[str], list[int] | None, dict[str, Any] | None]:
    """A latents folder (its manifest lists the shards and their sizes), a glob / brace
    pattern, a shard file, or a list of shard files -> (shard paths, samples per shard
    from the manifest or None, manifest or None)."""
    counts: list[int] | None = None
    if isinstance(source, (list, tuple)):
        paths = [str(p) for p in source]
        manifest = None
    elif Path(source).is_dir():
        manifest = read_manifest(source)
        shards = [s for s in manifest["shards"] if s["num_encoded"] > 0]
        paths = [str(Path(source) / s["file"]) for s in shards]
        counts = [int(s["num_encoded"]) for s in shards]
    else:
        import braceexpand  # a webdataset dependency

        manifest = None
        paths = sorted({p for pat in braceexpand.braceexpand(str(source)) for p in glob.glob(pat)})
        if not paths:
            raise FileNotFoundError(f"no latent shards match {source}")
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} latent shards not found, e.g. {missing[0]}")
    return paths, counts, manifest
