"""The file list of an image folder, compact enough for tens of millions of images.

Paths are stored relative to the folder, UTF-8 encoded and concatenated in one byte
blob, with a ``uint64`` array of offsets: about ``8 + len(path)`` bytes per file
(~50-70 bytes for typical dataset paths), where a Python list of ``Path`` objects
costs ~300 and a fixed-width numpy unicode array ``4 x the longest path``. Stored in
a file, both arrays are memory-mapped: forked DataLoader workers share the pages.

The order is :func:`latentae.sources.walk_images`'s (sorted relative paths), so every
machine that lists the same tree gets the same list, and the same :attr:`digest`.

File format (one file, written atomically): ``MAGIC``, a little-endian uint64 header
length, the JSON header (root, count, digest) padded to 8 bytes, the offsets
(count + 1 uint64), then the path bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from array import array
from pathlib import Path
from typing import Iterable

import numpy as np

from latentae.sources import walk_images

log = logging.getLogger(__name__)

MAGIC = b"LATFLST1"


def _digest(offsets: np.ndarray, blob: np.ndarray) -> str:
    h = hashlib.sha256(b"latentae-file-list/1")
    h.update(struct.pack("<Q", len(offsets) - 1))
    h.update(memoryview(np.ascontiguousarray(offsets, dtype="<u8")).cast("B"))
    h.update(memoryview(np.ascontiguousarray(blob)).cast("B"))
    return h.hexdigest()


class FileList:
    """Relative paths of a folder's images: ``len(fl)``, ``fl[i]`` -> ``"sub/img.jpg"``.

    :meth:`scan` lists a folder into memory; :meth:`build` lists it into a file (what
    rank 0 does once per run); :meth:`open` maps a stored one. :attr:`digest` (SHA-256
    of the list) is what ranks compare to prove they read the same files.
    """

    def __init__(self, offsets: np.ndarray, blob: np.ndarray, *, root: str, digest: str | None = None,
                 path: Path | None = None):  # fmt: skip
        self.offsets, self.blob, self.root, self.path = offsets, blob, root, path
        self.digest = digest if digest is not None else _digest(offsets, blob)
        # Plain views for lookups: indexing an np.memmap is ~4x slower than an ndarray.
        self._off, self._bytes = np.asarray(offsets), memoryview(np.asarray(blob))

    def __getstate__(self) -> dict:
        # A worker started by "spawn" gets the list pickled: a stored list travels as its
        # path and is mapped again (not copied into every worker).
        if self.path is not None:
            return {"path": str(self.path), "root": self.root, "digest": self.digest}
        return {"offsets": self._off.tobytes(), "blob": self._bytes.tobytes(), "root": self.root, "digest": self.digest}

    def __setstate__(self, state: dict) -> None:
        if "path" in state:
            other = FileList.open(state["path"], verify=False)
            if other.digest != state["digest"]:
                raise ValueError(f"file list {state['path']} changed while in use")
        else:
            off, blob = np.frombuffer(state["offsets"], "<u8"), np.frombuffer(state["blob"], np.uint8)
            other = FileList(off, blob, root=state["root"], digest=state["digest"])
        self.__dict__.update(other.__dict__)

    # -- making one ----------------------------------------------------------------------

    @classmethod
    def scan(cls, root: str | Path) -> "FileList":
        """List ``root`` (see :func:`walk_images`) into memory."""
        return cls.from_paths(walk_images(root), root)

    @classmethod
    def from_paths(cls, paths: Iterable[str], root: str | Path) -> "FileList":
        """A list of the given relative paths (in the given order), built without holding
        them as Python objects."""
        blob = bytearray()
        offsets = array("Q", [0])  # 8 bytes per entry, no Python object per file
        for rel in paths:
            blob += os.fsencode(rel)  # UTF-8; undecodable names keep their bytes
            offsets.append(len(blob))
        # frombuffer: views of the two buffers, no copy
        return cls(np.frombuffer(offsets, np.uint64), np.frombuffer(blob, np.uint8), root=os.path.abspath(root))

    @classmethod
    def build(cls, root: str | Path, out: str | Path) -> "FileList":
        """List ``root`` and store it at ``out`` (atomically); returns the stored list, mapped."""
        cls.scan(root).save(out)
        return cls.open(out)

    def save(self, out: str | Path) -> None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        header = json.dumps({"root": self.root, "count": len(self), "digest": self.digest}).encode()
        header += b" " * (-len(header) % 8)  # keeps the offsets 8-byte aligned for the memory map
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(header)) + header)
            f.write(memoryview(np.ascontiguousarray(self.offsets, dtype="<u8")).cast("B"))
            f.write(memoryview(np.ascontiguousarray(self.blob)).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True) -> "FileList":
        """Map a stored list. ``verify`` re-hashes it (one sequential read, ~1 s per 10M
        files) so a truncated or damaged file is an error, not a wrong dataset."""
        path = Path(path)
        try:
            with open(path, "rb") as f:
                head = f.read(16)
                if len(head) < 16 or head[:8] != MAGIC:
                    raise ValueError(f"{path} is not a latentae file list (bad magic)")
                (hlen,) = struct.unpack("<Q", head[8:])
                meta = json.loads(f.read(hlen))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read file list {path}: {e}") from e
        n, start = int(meta["count"]), 16 + hlen
        size = path.stat().st_size
        offsets = np.memmap(path, dtype="<u8", mode="r", offset=start, shape=(n + 1,))
        blob_bytes = int(offsets[-1])
        if size != start + 8 * (n + 1) + blob_bytes:
            raise ValueError(
                f"file list {path} is damaged: {size} bytes, expected {start + 8 * (n + 1) + blob_bytes} for {n} files"
            )
        blob = np.memmap(path, dtype=np.uint8, mode="r", offset=start + 8 * (n + 1), shape=(blob_bytes,))
        fl = cls(offsets, blob, root=meta["root"], digest=meta["digest"], path=path)
        if verify and _digest(offsets, blob) != meta["digest"]:
            raise ValueError(f"file list {path} is damaged: its content does not match its digest")
        return fl

    # -- reading ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        if not -len(self) <= i < len(self):
            raise IndexError(f"file list index {i} out of range for {len(self)} files")
        i %= len(self)
        a, b = self._off[i : i + 2].tolist()
        return os.fsdecode(self._bytes[a:b].tobytes())

    def nbytes(self) -> int:
        """Bytes the list occupies (mapped or in memory)."""
        return self.offsets.nbytes + self.blob.nbytes


def prepare_file_list(path: str, out: str | Path) -> FileList:
    """The file list of image folder ``path`` stored at ``out``: reused when ``out``
    already lists the same folder (a resumed run keeps its list, so files added since
    do not shift the data order), else listed anew. Call on one rank, then
    :meth:`FileList.open` on every rank after a barrier."""
    out = Path(out)
    if out.is_file():
        try:
            fl = FileList.open(out)
        except ValueError as e:
            log.warning("%s; listing %s again", e, path)
        else:
            if fl.root == os.path.abspath(path):
                return fl
            log.info("%s lists %s, not %s: listing again", out, fl.root, os.path.abspath(path))
    return FileList.build(path, out)
