"""Reading images: decoding any common file to 8-bit RGB, and walking image sources.

A *source* is either an image folder (searched recursively) or a set of WebDataset
tar shards (a local path, a brace pattern ``data/shard-{000000..000009}.tar`` or a
``pipe:`` command such as ``pipe:aws s3 cp s3://bucket/shard-000.tar -``).

Everything here is generic: training (``latentae.data``) and dataset encoding both
build on it. Errors follow one rule: a bad *sample* raises :class:`BadImage` from the
decoder and is skipped (counted, named) by whoever reads; a bad *source* (missing
path, no images at all) raises ``FileNotFoundError`` / ``ValueError`` at start-up.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import tarfile
import tempfile
import warnings
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import braceexpand  # a dependency of webdataset
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

T = TypeVar("T")

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")

# Image.MAX_IMAGE_PIXELS is deliberately left at PIL's default (~89 Mpx warns, 2x that
# raises DecompressionBombError): a training set has no business holding gigapixel
# images, and a decompression bomb must not take a worker's memory down.
# ImageFile.LOAD_TRUNCATED_IMAGES also stays False, so ``load()`` raises on a cut file.


class BadImage(Exception):
    """One sample that cannot be used: ``name`` (file path or shard key) and ``reason``."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


# ----------------------------------------------------------------------------- decoding


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    """Any PIL mode -> 8-bit RGB."""
    mode = img.mode
    if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        # 16-bit grayscale (PNG / TIFF). PIL's convert("L") clips values > 255 instead
        # of rescaling, which turns almost every 16-bit image white. Rescale the full
        # 16-bit range to 8 bits (v * 255 / 65535, rounded). 32-bit "I" files are
        # treated the same way (clipped to the 16-bit range): no common photo format
        # stores wider integers.
        a = np.asarray(img, dtype=np.float64)
        a = np.clip(np.rint(a * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    if mode == "F":
        raise BadImage(name, "32-bit float images are not supported (unknown value range)")
    if mode in ("P", "PA") or (mode in ("L", "RGB") and "transparency" in img.info):
        # Palette / tRNS images may mark a colour as transparent: go through RGBA
        # only then, so opaque ones convert directly.
        img = img.convert("RGBA" if mode == "PA" or "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        # Composite transparency on WHITE: the colour under a fully transparent pixel
        # is undefined (often black, often garbage), so dropping alpha would teach the
        # autoencoder junk borders and dark halos. White is how such images (logos,
        # cut-outs, stickers) are shown on the web and what the usual SD training sets
        # did, so reconstructions match what people see.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode == "RGB":
        return img
    # L, 1, CMYK (PIL undoes Adobe's inverted CMYK JPEGs itself), YCbCr, LAB, HSV, ...
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise BadImage(name, f"cannot convert mode {img.mode} to RGB: {e}") from e


def decode_image(data: bytes | str | Path, name: str, *, min_side: int | None = None) -> Image.Image:
    """Decode a file's bytes (or a path) into a fully loaded 8-bit RGB image.

    EXIF orientation is applied, so the result is what a viewer shows. ``min_side``
    lets JPEG decode at a reduced DCT scale (1/2, 1/4, 1/8) as long as the shorter
    side stays >= ``min_side``: a 4000 px photo resized to 256 decodes 8x faster.

    Raises :class:`BadImage` for empty, truncated, corrupt or non-image data.
    """
    return decode_image_and_size(data, name, min_side=min_side)[0]


def decode_image_and_size(
    data: bytes | str | Path, name: str, *, min_side: int | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """:func:`decode_image`, plus the image's full (width, height) after EXIF rotation,
    which differs from the returned image's size when a reduced JPEG draft was decoded.
    One parse of the header serves both (reading the size apart costs a second one)."""
    if isinstance(data, (str, Path)):
        try:
            data = Path(data).read_bytes()
        except OSError as e:
            raise BadImage(name, f"cannot read file: {e.strerror or e}") from e
    if len(data) == 0:
        raise BadImage(name, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # A DecompressionBombWarning (89-178 Mpx) is not an error; keep it quiet in
            # workers, the image is used. Above that PIL raises and we skip the sample.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            full = img.size
            if min_side is not None and img.format == "JPEG":
                # draft() keeps both sides >= the request, so the shorter side >= min_side.
                img.draft(None, (min_side, min_side))
            img.load()  # forces the full decode: truncated data raises here
            if img.width < 1 or img.height < 1:
                raise BadImage(name, f"image has no pixels ({img.width}x{img.height})")
            if img.getexif().get(_ORIENTATION, 1) in _TRANSPOSING:
                full = (full[1], full[0])
            img = ImageOps.exif_transpose(img)  # no-op without an orientation tag
            return _to_rgb(img, name), full
    except BadImage:
        raise
    except UnidentifiedImageError as e:
        raise BadImage(name, "not an image file (PIL cannot identify it)") from e
    except Image.DecompressionBombError as e:
        raise BadImage(name, f"too many pixels: {e}") from e
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError, KeyError, ZeroDivisionError) as e:
        # PIL reports truncation/corruption through a zoo of exception types, and
        # broken EXIF through more. All mean "this sample is unusable".
        reason = str(e) or type(e).__name__
        raise BadImage(name, f"corrupt or truncated image: {reason}") from e


def to_uint8_chw(img: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> our own uint8 tensor [3, H, W] (a channels-last view of one copy)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def shorter_side_to(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) scaled so that the shorter side is ``size``, aspect ratio kept."""
    if width <= height:
        return size, max(size, round(height * size / width))
    return max(size, round(width * size / height)), size


def resize_uint8(chw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [3, H, W] -> [3, h, w] = ``size``: antialiased bicubic (a = -0.5, PIL's kernel
    and pixel centres). torch vectorises it on uint8: 0.44 ms for a 512x320 -> 410x256
    photo on one core vs PIL's 1.4 ms, and the resize was ~40% of a loader's CPU per image.
    Within +-2 of PIL's 8-bit result, the same error against a float resize (tested).
    DataLoader workers run torch on one thread."""
    if tuple(chw.shape[1:]) == tuple(size):
        return chw
    return torch.nn.functional.interpolate(chw[None], size=size, mode="bicubic", antialias=True)[0]


_ORIENTATION = 0x0112  # EXIF tag
_TRANSPOSING = (5, 6, 7, 8)  # orientations that swap width and height


def image_size(data: bytes | str | Path, name: str) -> tuple[int, int]:
    """(width, height) from the header only, after EXIF rotation; raises BadImage."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            w, h = img.size
            orientation = img.getexif().get(_ORIENTATION, 1)
    except Exception as e:  # noqa: BLE001 - any header failure means "not usable"
        raise BadImage(name, f"cannot read image header: {e}") from e
    return (h, w) if orientation in _TRANSPOSING else (w, h)


# ----------------------------------------------------------------------------- sources


def has_image_extension(name: str) -> bool:
    """``photo.JPG`` / ``seg.png`` / ``png`` (a webdataset extension) -> True."""
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def list_images(root: str | Path) -> list[Path]:
    """All image files under ``root`` (recursive, symlinked folders followed), sorted
    by their path relative to ``root`` so the order is the same on every machine.

    Hidden files and folders (name starting with '.') are skipped: macOS leaves
    ``._photo.jpg`` AppleDouble files next to every photo on non-Apple disks, which
    have an image extension but are not images.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    found: list[tuple[str, Path]] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop, or the same folder linked twice
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if not f.startswith(".") and "." in f and has_image_extension(f):
                p = Path(dirpath) / f
                found.append((p.relative_to(root).as_posix(), p))
    found.sort(key=lambda t: t[0])
    return [p for _, p in found]


def is_shard_source(path: str) -> bool:
    """True for ``pipe:`` URLs, brace patterns and tar files; False for folders."""
    if path.startswith("pipe:"):
        return True
    if os.path.isdir(path):
        return False
    return "{" in path or path.endswith((".tar", ".tar.gz", ".tgz"))


def expand_shards(pattern: str) -> list[str]:
    """Brace-expand a shard pattern and check that local shards exist.

    ``data/shard-{000..009}.tar`` -> 10 paths; ``pipe:cat a-{0..1}.tar`` -> 2 commands.
    Several patterns may be joined with '::' (as in webdataset).
    """
    urls: list[str] = []
    for part in pattern.split("::"):
        urls.extend(braceexpand.braceexpand(part.strip()))
    urls = [u for u in urls if u]
    if not urls:
        raise ValueError(f"shard pattern '{pattern}' expands to no shards")
    for u in urls:
        if "://" in u.split(" ", 1)[0] and not u.startswith("pipe:"):
            raise ValueError(f"unsupported shard URL '{u}': use a local path or a pipe: command (e.g. 'pipe:curl -s {u}')")
    missing = [u for u in urls if not u.startswith("pipe:") and not os.path.isfile(u)]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise FileNotFoundError(
            f"{len(missing)} of {len(urls)} shards of '{pattern}' not found: {', '.join(missing[:3])}{more}"
        )
    return urls


@dataclass(frozen=True)
class RawSample:
    """One undecoded image: ``key`` (folder: path relative to the root without the
    extension; shards: webdataset ``__key__``), ``source`` (file path, or
    ``shard_url:member_name``) and the file's ``data`` bytes."""

    key: str
    source: str
    data: bytes


def _split_key(member: str) -> tuple[str, str] | None:
    """webdataset's convention: ``dir/abc.seg.png`` -> key ``dir/abc``, ext ``seg.png``."""
    slash = member.rfind("/")
    base = member[slash + 1 :]
    dot = base.find(".")
    if dot <= 0:
        return None
    return member[: slash + 1 + dot], base[dot + 1 :]


class _ShardStream:
    """Open a local tar file or a ``pipe:`` command as a byte stream.

    Stopping early kills the command (it could block forever on a full pipe), and a
    command that fails is reported with the tail of its stderr.
    """

    def __init__(self, url: str):
        self.proc: subprocess.Popen | None = None
        if url.startswith("pipe:"):
            # stderr goes to a file, not a pipe: a chatty command must not block on it.
            self.err = tempfile.TemporaryFile()
            self.proc = subprocess.Popen(url[len("pipe:") :], shell=True, stdout=subprocess.PIPE, stderr=self.err)
            self.stream = self.proc.stdout
        else:
            self.stream = open(url, "rb")  # noqa: SIM115 - closed in close()

    def close(self, finished: bool, grace: float = 0.0) -> str | None:
        """Close; return why the command failed, if it did (not when we stopped it).

        ``finished``: the tar was read to its end. Otherwise the command gets
        ``grace`` seconds to exit on its own (after a read error it usually has
        just failed, and its message is the useful one) before it is killed.
        """
        self.stream.close()
        if self.proc is None:
            return None
        if not finished:
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # we stopped early: its exit status means nothing
                self.proc.wait()
                self.err.close()
                return None
        rc = self.proc.wait()
        self.err.seek(0)
        tail = self.err.read()[-500:].decode(errors="replace").strip()
        self.err.close()
        if rc != 0:
            return f"command exited with status {rc}" + (f": {tail}" if tail else "")
        return None


def _log_error(name: str, reason: str) -> None:
    log.warning("skipping %s: %s", name, reason)


def iter_shard(url: str, on_error: Callable[[str, str], None] = _log_error) -> Iterator[RawSample]:
    """Image samples of one tar shard, in tar order, one per webdataset key.

    A sample is a run of consecutive members sharing a key; its image is its first
    member with an image extension (other members, e.g. captions, are ignored, and
    a sample with no image is not an image sample). A shard that cannot be read, or
    breaks off, is reported through ``on_error`` and ends; samples before are kept.
    """
    try:
        stream = _ShardStream(url)
    except OSError as e:
        on_error(url, f"cannot open shard: {e}")
        return
    finished, error = False, None
    try:
        tf = tarfile.open(fileobj=stream.stream, mode="r|*")
        current: str | None = None  # key of the sample being read
        have_image = False
        for member in tf:
            if not member.isfile():
                continue
            split = _split_key(member.name)
            if split is None:
                continue
            key, ext = split
            if key != current:
                current, have_image = key, False
            if have_image or not has_image_extension(ext):
                continue
            f = tf.extractfile(member)
            data = f.read() if f is not None else b""
            have_image = True
            yield RawSample(key=key, source=f"{url}:{member.name}", data=data)
        finished = True
    except (tarfile.TarError, OSError, EOFError) as e:
        error = f"shard unreadable or cut short: {e}"
    finally:
        # GeneratorExit (the consumer stopped early) lands here too, with error None.
        command_error = stream.close(finished, grace=2.0 if error else 0.0)
        if error or command_error:
            on_error(url, "; ".join(m for m in (error, command_error) if m))


def split_for_worker(items: Iterable[T]) -> Iterator[T]:
    """The part of ``items`` for the current DataLoader worker (all of it outside workers):
    worker w of W takes items w, w+W, w+2W, ..."""
    from torch.utils.data import get_worker_info  # local: keep this module torch-free to import

    info = get_worker_info()
    if info is None:
        return iter(items)
    return islice(items, info.id, None, info.num_workers)


def check_source(path: str) -> list[Path] | list[str]:
    """Validate a source at start-up: the sorted image files of a folder, or the
    expanded shard URLs. Raises FileNotFoundError / ValueError with a clear message."""
    if not path:
        raise ValueError("no data path given (an image folder, a shard pattern or a pipe: URL)")
    if is_shard_source(path):
        return expand_shards(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data path not found: {path}")
    if not os.path.isdir(path):
        raise ValueError(
            f"data path {path} is a file, not an image folder or a .tar shard (shards must end in .tar/.tar.gz/.tgz)"
        )
    files = list_images(path)
    if not files:
        raise ValueError(
            f"no images found in {os.path.abspath(path)} (searched recursively for "
            f"{', '.join('.' + e for e in IMAGE_EXTENSIONS)}, any case; hidden files skipped)"
        )
    return files


def folder_key(root: str | Path, file: Path) -> str:
    """Key of a folder image: its path relative to ``root`` without the extension."""
    rel = file.relative_to(root).as_posix()
    return rel.rsplit(".", 1)[0]


def iter_source(
    path: str,
    *,
    rank: int = 0,
    world_size: int = 1,
    on_error: Callable[[str, str], None] = _log_error,
) -> Iterator[RawSample]:
    """Every image sample of ``path`` exactly once, in a stable order: the part for
    ``rank`` of ``world_size`` (disjoint across ranks; together, everything).

    Folders split by file (file i goes to rank i % world_size). Shards split by shard
    when there are at least ``world_size`` of them, else by sample (every rank reads
    every shard and keeps sample i where i % world_size == rank). To split further
    across DataLoader workers, pass ``rank = rank * num_workers + worker_id`` and
    ``world_size = world_size * num_workers``.

    Unreadable files/shards go to ``on_error(name, reason)`` (default: a logged
    warning) and are skipped; decoding is left to the caller (``decode_image``).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    found = check_source(path)
    if not is_shard_source(path):
        files = [Path(p) for p in found]
        keys = [folder_key(path, f) for f in files]
        dup = _first_duplicate(keys, files)
        if dup:
            raise ValueError(f"two images in {path} share the key '{dup[0]}': {dup[1]} and {dup[2]}; rename one")
        for f, key in islice(zip(files, keys), rank, None, world_size):
            try:
                data = f.read_bytes()
            except OSError as e:
                on_error(str(f), f"cannot read file: {e.strerror or e}")
                continue
            yield RawSample(key=key, source=str(f), data=data)
        return
    urls = [str(u) for u in found]
    if len(urls) >= world_size:
        for url in urls[rank::world_size]:
            yield from iter_shard(url, on_error)
    else:
        samples = (s for url in urls for s in iter_shard(url, on_error))
        yield from islice(samples, rank, None, world_size)


def _first_duplicate(keys: list[str], files: list[Path]) -> tuple[str, Path, Path] | None:
    seen: dict[str, Path] = {}
    for k, f in zip(keys, files):
        if k in seen:
            return k, seen[k], f
        seen[k] = f
    return None
