"""The input in a stable order, cut into parts; rank 0 makes the plan, the other ranks receive it.

* A folder is listed once (sorted by relative path); part p is files
  ``[p * shard_size, (p + 1) * shard_size)``. A sample's ``index`` is its file's position.
* Shards (a pattern or ``pipe:`` URLs) are not read to plan: part p is input shard p,
  whatever its size. A sample's ``index`` is ``p * SHARD_STRIDE + position in the shard``
  (unique and stable without knowing how many samples earlier shards hold), and the counts
  in the manifest come from the encoding itself. Each input shard is read once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

from latentae.imageio import check_source, folder_key, is_shard_source

T = TypeVar("T")

SHARD_STRIDE = 10**9  # index = input shard * SHARD_STRIDE + position (no tar holds 10^9 images)


@dataclass
class InputPlan:
    kind: Literal["folder", "shards"]
    path: str
    files: list[str] = field(default_factory=list)  # folder: paths relative to ``path``
    keys: list[str] = field(default_factory=list)  # folder
    duplicates: dict[int, str] = field(default_factory=dict)  # folder: index -> reason
    urls: list[str] = field(default_factory=list)  # shards

    @property
    def count(self) -> int:
        """Files of a folder, or input shards."""
        return len(self.files) if self.kind == "folder" else len(self.urls)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        if self.kind == "folder":
            for k, f in zip(self.keys, self.files):
                h.update(f"{k}\0{Path(f).suffix}\n".encode())
        else:
            for u in self.urls:
                h.update(f"{u}\n".encode())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "kind": self.kind, "count": self.count, "fingerprint": self.fingerprint()}
        if self.kind == "shards":
            d["shards"] = list(self.urls)
        return d


def _canonical_url(url: str) -> str:
    return url if url.startswith("pipe:") else str(Path(url).resolve())


def plan_input(path: str, found: list | None = None) -> InputPlan:
    """Order the input (without reading any image or shard). ``found``: the result of
    ``check_source(path)`` if already computed."""
    found = found if found is not None else check_source(path)
    if is_shard_source(path):
        return InputPlan(kind="shards", path=path, urls=[_canonical_url(str(u)) for u in found])
    files = [Path(p) for p in found]
    keys = [folder_key(path, f) for f in files]
    first: dict[str, Path] = {}
    dups: dict[int, str] = {}
    for i, (k, f) in enumerate(zip(keys, files)):
        if k in first:  # photo.jpg next to photo.png: one key, keep the first
            dups[i] = f"duplicate key '{k}' (also {first[k]}); rename one to encode both"
        else:
            first[k] = f
    rel = [f.relative_to(path).as_posix() for f in files]
    return InputPlan(kind="folder", path=path, files=rel, keys=keys, duplicates=dups)


@dataclass(frozen=True)
class Part:
    """Folder: files [start, end) of the plan. Shards: input shard ``url`` (start = end = 0)."""

    index: int
    start: int = 0
    end: int = 0
    url: str | None = None

    @property
    def name(self) -> str:
        return f"part-{self.index:06d}"

    def shard_name(self, k: int) -> str:
        """File name of this part's k-th latent shard."""
        return f"{self.name}-{k:04d}.tar"


def make_parts(plan: InputPlan, shard_size: int) -> list[Part]:
    if plan.kind == "shards":
        return [Part(p, url=u) for p, u in enumerate(plan.urls)]
    n = len(plan.files)
    return [Part(p, s, min(s + shard_size, n)) for p, s in enumerate(range(0, n, shard_size))]


def from_rank0(make: Callable[[], T], rank: int, world_size: int) -> T:
    """``make()`` on rank 0, its result (or its exception) on every rank.

    The other ranks do not list the input or read job.json themselves: every rank then
    works from one plan, even if the folder changes while they start, and a refusal
    (e.g. a different job in the output folder) stops every rank with rank 0's message.
    """
    if world_size == 1:
        return make()
    import torch.distributed as dist

    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = ("ok", make())
        except Exception as e:  # noqa: BLE001 - sent to the other ranks, then raised here too
            box[0] = ("error", e)
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value
