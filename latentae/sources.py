"""Image sources: folders (walked recursively) and WebDataset tar shards.

A *source* is either an image folder (searched recursively) or a set of WebDataset
tar shards (a local path, a brace pattern ``data/shard-{000000..000009}.tar`` or a
``pipe:`` command such as ``pipe:aws s3 cp s3://bucket/shard-000.tar -``). This
module finds and reads the undecoded samples (:class:`RawSample`); decoding lives in
``latentae.imageio`` (which re-exports these names). A bad *source* (missing path,
no images at all) raises ``FileNotFoundError`` / ``ValueError`` at start-up; an
unreadable file or shard goes to an ``on_error(name, reason)`` callback.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import braceexpand  # a dependency of webdataset

log = logging.getLogger(__name__)

T = TypeVar("T")

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")


def has_image_extension(name: str) -> bool:
    """``photo.JPG`` / ``seg.png`` / ``png`` (a webdataset extension) -> True."""
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def walk_images(root: str | Path) -> Iterator[str]:
    """The image files under ``root`` as POSIX paths relative to it, in sorted order
    (by code point of the whole relative path, the same on every machine), streamed:
    memory stays proportional to the largest folder, not to the tree.

    Symlinked folders are followed (each real folder visited once: a link loop or a
    folder linked twice is not listed twice). Hidden files and folders (name starting
    with '.') are skipped: macOS leaves ``._photo.jpg`` AppleDouble files next to every
    photo on non-Apple disks, which have an image extension but are not images.
    Unreadable folders are skipped, as ``os.walk`` does.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    seen: set[tuple[int, int]] = set()

    def visit(path: str, rel: str) -> Iterator[str]:
        try:
            st = os.stat(path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) in seen:
            return
        seen.add((st.st_dev, st.st_ino))
        try:
            with os.scandir(path) as it:
                entries = list(it)
        except OSError:
            return
        # Sorting a folder's entries by name, with "/" appended to sub-folders, and
        # recursing in that order yields exactly the sort order of the full relative
        # paths ("a-b.jpg" < "a/x.jpg" because "-" < "/"), without holding them all.
        items: list[tuple[str, bool]] = []
        for e in entries:
            name = e.name
            if name.startswith("."):
                continue
            try:
                is_dir = e.is_dir()  # follows symlinks; uses d_type, no stat for plain entries
            except OSError:
                is_dir = False
            if is_dir:
                items.append((name + "/", True))
            elif "." in name and has_image_extension(name):
                items.append((name, False))
        items.sort()
        for name, is_dir in items:
            if is_dir:
                yield from visit(os.path.join(path, name), rel + name)
            else:
                yield rel + name

    yield from visit(root, "")


def list_images(root: str | Path) -> list[Path]:
    """All image files under ``root`` as paths, in :func:`walk_images` order. For
    millions of files use ``latentae.data.FileList`` (compact, ~60 bytes per file)."""
    root = Path(root)
    return [root / rel for rel in walk_images(root)]


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
    ``shard_url:member_name``) and the file's ``data`` bytes.

    From shards also where it lies, so a reader can come back to it without reading
    the shard again: ``ordinal`` (its index among the shard's image samples),
    ``offset`` (byte offset of its image member's tar header) and ``end`` (byte
    offset just after that member's data: where reading goes on)."""

    key: str
    source: str
    data: bytes
    ordinal: int = -1
    offset: int = -1
    end: int = -1


@dataclass(frozen=True)
class ShardPos:
    """Where to start reading a shard: at image sample number ``ordinal``, whose tar
    member (or the member after the previous sample's image) starts at byte
    ``offset``; ``key`` is the key of the sample read just before (its other members,
    e.g. a caption, may follow and must not start a new sample), None at a sample's
    first member. Local uncompressed tars seek to ``offset``; pipes and compressed
    tars read from the start and skip ``ordinal`` samples."""

    ordinal: int = 0
    offset: int = 0
    key: str | None = None


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

    def __init__(self, url: str, offset: int = 0):
        self.proc: subprocess.Popen | None = None
        if url.startswith("pipe:"):
            if offset:
                raise ValueError(f"cannot seek in a pipe: shard ({url})")
            # stderr goes to a file, not a pipe: a chatty command must not block on it.
            self.err = tempfile.TemporaryFile()
            self.proc = subprocess.Popen(url[len("pipe:") :], shell=True, stdout=subprocess.PIPE, stderr=self.err)
            self.stream = self.proc.stdout
        else:
            self.stream = open(url, "rb")  # noqa: SIM115 - closed in close()
            if offset:
                self.stream.seek(offset)

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


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz: what tarfile's "r|*" reads


def can_seek(url: str) -> bool:
    """A local, uncompressed tar: a reader can jump to a member's byte offset."""
    if url.startswith("pipe:"):
        return False
    try:
        with open(url, "rb", buffering=0) as f:  # 6 bytes, not a buffer's worth
            head = f.read(6)
    except OSError:
        return False
    return not head.startswith(_COMPRESSED_MAGIC)


def _tar_blocks(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def iter_shard(
    url: str, on_error: Callable[[str, str], None] = _log_error, *, start: ShardPos | None = None
) -> Iterator[RawSample]:
    """Image samples of one tar shard, in tar order, one per webdataset key.

    A sample is a run of consecutive members sharing a key; its image is its first
    member with an image extension (other members, e.g. captions, are ignored, and
    a sample with no image is not an image sample). A shard that cannot be read, or
    breaks off, is reported through ``on_error`` and ends; samples before are kept.

    ``start`` begins at a saved position (see :class:`ShardPos`): a local
    uncompressed tar seeks there, anything else is read from the start with the
    first ``start.ordinal`` samples passed over (never handed out).
    """
    start = start or ShardPos()
    seek = start.offset > 0 and can_seek(url)
    try:
        stream = _ShardStream(url, start.offset if seek else 0)
    except OSError as e:
        on_error(url, f"cannot open shard: {e}")
        return
    finished, error = False, None
    base = start.offset if seek else 0  # tarfile counts offsets from where it began
    ordinal = start.ordinal if seek else 0
    try:
        tf = tarfile.open(fileobj=stream.stream, mode="r|*")
        # key of the sample being read, and whether its image was seen
        current, have_image = (start.key, start.key is not None) if seek else (None, False)
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
            have_image = True
            if ordinal < start.ordinal:
                ordinal += 1  # before the start position: tarfile skips its data unread
                continue
            f = tf.extractfile(member)
            data = f.read() if f is not None else b""
            yield RawSample(
                key=key, source=f"{url}:{member.name}", data=data, ordinal=ordinal,
                offset=base + member.offset, end=base + member.offset_data + _tar_blocks(member.size),
            )  # fmt: skip
            ordinal += 1
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
    if is_shard_source(check_path(path)):
        return expand_shards(path)
    files = list_images(path)
    if not files:
        raise no_images_error(path)
    return files


def check_path(path: str) -> str:
    """The checks of :func:`check_source` that need no listing: a path is given, and a
    folder exists and is a folder. Returns ``path``."""
    if not path:
        raise ValueError("no data path given (an image folder, a shard pattern or a pipe: URL)")
    if is_shard_source(path):
        return path
    if not os.path.exists(path):
        raise FileNotFoundError(f"data path not found: {path}")
    if not os.path.isdir(path):
        raise ValueError(
            f"data path {path} is a file, not an image folder or a .tar shard (shards must end in .tar/.tar.gz/.tgz)"
        )
    return path


def no_images_error(path: str) -> ValueError:
    return ValueError(
        f"no images found in {os.path.abspath(path)} (searched recursively for "
        f"{', '.join('.' + e for e in IMAGE_EXTENSIONS)}, any case; hidden files skipped)"
    )


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
