"""The data layer's numbers, each measured side by side in one run.

  latentae bench data                                  # everything, full size
  latentae bench data --only resume shuffle            # a part
  latentae bench data --files 20000 --tree-files 5000 --shards 40 --steps 60   # a quick check

* resume:   shards read through a logging ``pipe:`` opener (``sh -c 'echo SHARD >> LOG; cat SHARD'``):
            shard opens and bytes read (``/proc/self/io`` rchar, one process) by an uninterrupted run of
            --steps + --more steps, by its first --steps steps (what a resume that re-reads the epoch
            reads again), and by a resume for --more steps from the saved position; also from local
            tars (seek instead of re-read).
* shuffle:  distinct shards per batch of --batch-size, for one shard per worker through a 256-sample
            buffer (the previous scheme) and for interleaved shards with larger buffers. Shards of
            --per-shard-shuffle samples, read without decoding (a batch is consecutive samples of one
            worker, exactly what is measured).
* filelist: --files synthetic ImageNet-like paths: bytes per file of the list (vs the fixed-width numpy
            unicode array it replaces, with and without one 250-character path), build / store / open
            times, and measured memory in a fresh process: the loader's RSS after an epoch of lookups and
            a forked worker's private (copied) pages after going over every path.
* listing:  a real tree of --tree-files empty image files (1000 per folder): listing time of
            ``FileList.scan`` (os.scandir, streamed in sorted order) vs ``os.walk`` + ``Path`` objects +
            sort (the previous ``list_images``), cold runs alternated.
"""

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from pathlib import Path


import numpy as np

from latentae.bench import child_env
from latentae.cli.common import Parser
from latentae.data import DataConfig, FileList, SlotStream, build_train_loader
from latentae.data.shards import fresh_slot_state
from latentae.sources import has_image_extension


def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar"):
            return int(line.split()[1])
    return 0


def write_shards(root: Path, n: int, per: int, *, png: bool, size: int = 1500, px: int = 24) -> str:
    """``n`` tars of ``per`` samples: ``px`` x ``px`` noise PNGs (png=True) or ``size`` random bytes."""
    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for s in range(n):
        with tarfile.open(root / f"shard-{s:06d}.tar", "w") as tf:
            for i in range(per):
                if png:
                    buf = io.BytesIO()
                    Image.fromarray(rng.integers(0, 256, (px, px, 3), dtype=np.uint8)).save(buf, "PNG")
                    data = buf.getvalue()
                else:
                    data = rng.bytes(size)
                for name, payload in ((f"s{s}_{i:05d}.png", data), (f"s{s}_{i:05d}.txt", b"a caption")):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
    return str(root / f"shard-{{000000..{n - 1:06d}}}.tar")


# ----------------------------------------------------------------------------- resume


def bench_resume(args, tmp: Path) -> None:
    pattern = write_shards(tmp / "shards", args.shards, args.per_shard, png=True, px=args.image_px)
    log = tmp / "opens.log"

    def run(path: str, steps: int, state=None):
        """(batches, opens, bytes read, state) of ``steps`` steps (start-up not counted)."""
        cfg = DataConfig(path=path, resolution=8, num_val=0, num_workers=0, shards_per_worker=args.shards_per_worker,
                         shuffle_buffer=args.buffer)  # fmt: skip
        loader = build_train_loader(cfg, args.batch_size, seed=0, state=state)
        log.unlink(missing_ok=True)
        r0 = rchar()
        it = iter(loader)
        batches = [next(it) for _ in range(steps)]
        read = rchar() - r0
        del it
        opens = len(log.read_text().splitlines()) if log.exists() else 0
        return batches, opens, read, loader.state_dict()

    size = os.path.getsize(tmp / "shards" / "shard-000000.tar") / 1e6
    print(f"\n== resume: {args.shards} shards x {args.per_shard} samples ({size:.1f} MB each), batch {args.batch_size}, "
          f"{args.shards_per_worker} shards per worker, buffer {args.buffer}")  # fmt: skip
    for kind, path in (("pipe:", f"pipe:sh -c 'echo $0 >> {log}; cat $0' {pattern}"), ("local tar", pattern)):
        full, opens_full, read_full, _ = run(path, args.steps + args.more)
        head, opens_head, read_head, state = run(path, args.steps)
        tail, opens_tail, read_tail, _ = run(path, args.more, state)
        exact = all(a["key"] == b["key"] and (a["image"] == b["image"]).all() for a, b in zip(head + tail, full))
        n_held = len({u[0] for w in state["workers"] for u in w["open"]} | {b[0] for w in state["workers"] for b in w["buffer"]})
        opens = f"{opens_full:5d} / {opens_head:5d} / {opens_tail:4d}  " if kind == "pipe:" else " " * 24
        print(f"{kind:9s} opens (uninterrupted {args.steps}+{args.more} / first {args.steps} / resume {args.more}): "
              f"{opens}MB read: {read_full / 1e6:7.2f} / {read_head / 1e6:7.2f} / {read_tail / 1e6:6.2f}   "
              f"resume vs re-reading: {read_tail / max(read_head, 1):.3f}x bytes   (state names {n_held} shards; "
              f"bit-exact: {exact})")  # fmt: skip


# ----------------------------------------------------------------------------- shuffle


def bench_shuffle(args, tmp: Path) -> None:
    pattern = write_shards(tmp / "shuffle", 32, args.per_shard_shuffle, png=False, size=100)
    from latentae.sources import expand_shards

    urls = expand_shards(pattern)
    b = args.batch_size
    print(f"\n== shuffle: 32 shards x {args.per_shard_shuffle} samples, batches of {b} (one worker), "
          f"{args.batches} batches")  # fmt: skip
    for k, buf in ((1, 256), (1, 1000), (4, 256), (4, 1000), (8, 1000)):
        cfg = DataConfig(shards_per_worker=k, shuffle_buffer=buf)
        stream = SlotStream(urls, cfg, seed=0, slot=0, slots=1, state=fresh_slot_state())
        counts = []
        for _ in range(args.batches):
            counts.append(len({stream.next()[1].key.split("_")[0] for _ in range(b)}))
        stream.close()
        label = "(previous scheme)" if (k, buf) == (1, 256) else ("(new default)" if (k, buf) == (4, 1000) else "")
        print(f"shards_per_worker {k}, shuffle_buffer {buf:5d}: {np.mean(counts):5.2f} distinct shards per batch "
              f"(min {min(counts)}) {label}")  # fmt: skip


# ----------------------------------------------------------------------------- file list

MEMORY = textwrap.dedent(
    """
    import gc, json, os, sys
    from latentae.data import DataConfig, FileList, build_train_loader

    def mem():
        f = dict(l.split(":", 1) for l in open("/proc/self/smaps_rollup").read().splitlines()[1:])
        return {k: int(f[k].split()[0]) * 1024 for k in ("Rss", "Pss", "Private_Dirty")}

    n, folder, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    # Warm-up on a small list: code pages and allocator arenas are not the list's cost.
    FileList.from_paths((f"w/{i}.jpg" for i in range(1000)), folder).save(path + ".w")
    warm = build_train_loader(DataConfig(path=folder, num_val=8, num_workers=2), 12, seed=0, file_list=path + ".w")
    sum(len(warm.dataset.relpath(int(i))) for i in warm._make_loader().batch_sampler.epoch_indices(0))
    gc.collect()
    base = mem()
    loader = build_train_loader(DataConfig(path=folder, num_val=8, num_workers=2), 12, seed=0, file_list=path)
    ds, sampler = loader.dataset, loader._make_loader().batch_sampler
    order = sampler.epoch_indices(0)  # held while measuring: 8 bytes per file and rank
    total = sum(len(ds.relpath(int(i))) for i in order)
    main = mem()
    r, w = os.pipe()
    if os.fork() == 0:
        before = mem()
        sum(len(ds.relpath(i)) for i in range(len(ds)))
        after = mem()
        os.write(w, json.dumps({k: after[k] - before[k] for k in after}).encode())
        os._exit(0)
    os.wait()
    child = json.loads(os.read(r, 1 << 16))
    print(json.dumps({"main": {k: (main[k] - base[k]) / n for k in main}, "child": {k: v / n for k, v in child.items()}}))
    """
)


def synthetic(n: int):
    for i in range(n):
        c = i % 1000
        yield f"train/n{c:08d}/n{c:08d}_{i}.JPEG"


def bench_filelist(args, tmp: Path) -> None:
    n = args.files
    print(f"\n== file list: {n} synthetic paths (train/nXXXXXXXX/nXXXXXXXX_I.JPEG, "
          f"{np.mean([len(p) for p in synthetic(1000)]):.0f} bytes each)")  # fmt: skip
    t0 = time.perf_counter()
    fl = FileList.from_paths(synthetic(n), tmp / "folder")
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    fl.save(tmp / "files.bin")
    t_save = time.perf_counter() - t0
    t0 = time.perf_counter()
    FileList.open(tmp / "files.bin")
    t_open = time.perf_counter() - t0
    sample = list(synthetic(min(n, 100_000)))
    old = np.array(sample).nbytes / len(sample)
    old_long = np.array(sample + ["x" * 250]).nbytes / (len(sample) + 1)
    print(f"structure: {fl.nbytes() / n:.1f} bytes per file; numpy unicode array: {old:.0f} ({old / (fl.nbytes() / n):.1f}x), "
          f"{old_long:.0f} with one 250-character path ({old_long / (fl.nbytes() / n):.1f}x)")  # fmt: skip
    print(f"build from paths {t_build:.2f} s, store {t_save:.2f} s, open + verify digest {t_open:.2f} s")
    (tmp / "folder").mkdir()
    env = child_env()  # the child imports this copy of latentae
    out = subprocess.run([sys.executable, "-c", MEMORY, str(n), str(tmp / "folder"), str(tmp / "files.bin")],
                         capture_output=True, text=True, env=env)  # fmt: skip
    if out.returncode != 0:
        print("memory measurement failed:", out.stderr[-2000:])
        return
    m = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"measured, bytes per file: loader process after an epoch of lookups RSS {m['main']['Rss']:.1f} "
          f"(PSS {m['main']['Pss']:.1f}, private dirty {m['main']['Private_Dirty']:.1f}); forked worker after going "
          f"over every path: RSS +{m['child']['Rss']:.1f}, private dirty +{m['child']['Private_Dirty']:.1f} "
          "(target <= 100 per file)")  # fmt: skip


# ----------------------------------------------------------------------------- listing


def old_list_images(root: Path) -> list[Path]:
    """The previous list_images: os.walk, a Path per file, then a sort."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if not f.startswith(".") and "." in f and has_image_extension(f):
                p = Path(dirpath) / f
                found.append((p.relative_to(root).as_posix(), p))
    found.sort(key=lambda t: t[0])
    return [p for _, p in found]


def bench_listing(args, tmp: Path) -> None:
    n = args.tree_files
    root = tmp / "tree"
    t0 = time.perf_counter()
    for d in range(0, n, 1000):
        sub = root / f"n{d // 1000:08d}"
        sub.mkdir(parents=True)
        for i in range(d, min(d + 1000, n)):
            (sub / f"n{d // 1000:08d}_{i}.JPEG").touch()
    print(f"\n== listing: a tree of {n} empty files in {(n + 999) // 1000} folders (made in {time.perf_counter() - t0:.1f} s)")
    times: dict[str, list[float]] = {"FileList.scan": [], "os.walk + Path + sort": []}
    for _ in range(args.repeats):
        for name in times:
            t0 = time.perf_counter()
            count = len(FileList.scan(root)) if name == "FileList.scan" else len(old_list_images(root))
            times[name].append(time.perf_counter() - t0)
            assert count == n
    new, old = min(times["FileList.scan"]), min(times["os.walk + Path + sort"])
    print(f"FileList.scan {new:.2f} s ({n / new / 1e6:.2f} M files/s), os.walk + Path + sort {old:.2f} s: "
          f"{old / new:.2f}x faster (best of {args.repeats}, alternated)")  # fmt: skip


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = Parser(prog=prog, description=__doc__)
    p.add_argument("--only", nargs="+", choices=["resume", "shuffle", "filelist", "listing"],
                   default=["resume", "shuffle", "filelist", "listing"])  # fmt: skip
    p.add_argument("--shards", type=int, default=100)
    p.add_argument("--per-shard", type=int, default=32)
    p.add_argument("--image-px", type=int, default=96, help="noise PNGs of this size (96: ~28 KB, like a JPEG photo)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--more", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--shards-per-worker", type=int, default=4)
    p.add_argument("--buffer", type=int, default=64)
    p.add_argument("--per-shard-shuffle", type=int, default=1000)
    p.add_argument("--batches", type=int, default=500)
    p.add_argument("--files", type=int, default=1_000_000)
    p.add_argument("--tree-files", type=int, default=1_000_000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tmp", default=None, help="scratch folder (default: a temporary one)")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench_data-", dir=args.tmp))
    try:
        for part in args.only:
            {"resume": bench_resume, "shuffle": bench_shuffle, "filelist": bench_filelist, "listing": bench_listing}[part](
                args, tmp / part
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m latentae.bench.data"))
