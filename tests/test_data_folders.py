"""Image folders: the compact file list (listing, storing, memory) and elastic resume."""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_data import make_folder, noise, same_batches, take

from latentae.data import DataConfig, FileList, build_train_loader, build_val_images, list_images, prepare_file_list, walk_images

RES = 16


def touch(root: Path, rel: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"")


def test_walk_images_streams_the_sorted_relative_paths(tmp_path):
    root = tmp_path / "t"
    images = ["a-b.jpg", "a/x.jpg", "a.jpg", "a/y/z.png", "B.PNG", "b.jpeg", "c/d.JPG", "é/ü.webp", "c0.tif"]
    for rel in images + [".hidden.jpg", ".git/x.jpg", "notes.txt", "noext", "c/.DS_Store.png"]:
        touch(root, rel)
    (root / "a" / "loop").symlink_to("..")  # a link loop: the real folders are listed once
    expected = sorted(images)  # code-point order of the whole relative path: "a-b.jpg" < "a.jpg" < "a/x.jpg"
    assert list(walk_images(root)) == expected
    assert [p.relative_to(root).as_posix() for p in list_images(root)] == expected
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        list(walk_images(root / "missing"))


def test_file_list_stored_mapped_and_checked(tmp_path):
    root = make_folder(tmp_path / "f", 7)
    scanned = FileList.scan(root)
    stored = FileList.build(root, tmp_path / "run" / "data" / "files.bin")
    assert isinstance(stored.blob, np.memmap) and isinstance(stored.offsets, np.memmap)
    assert [stored[i] for i in range(len(stored))] == [scanned[i] for i in range(len(scanned))] == list(walk_images(root))
    assert stored.digest == scanned.digest == FileList.open(tmp_path / "run" / "data" / "files.bin").digest
    assert stored[-1] == scanned[6] and len(stored) == 7
    for fl in (stored, scanned):  # what a worker started by "spawn" receives
        copy = pickle.loads(pickle.dumps(fl))
        assert copy.digest == fl.digest and copy[3] == fl[3] and (copy.path is None) == (fl.path is None)
    assert len(pickle.dumps(stored)) < 500  # the path, not the list
    with pytest.raises(IndexError):
        stored[7]
    noise(50).save(root / "zz.png")
    assert FileList.scan(root).digest != stored.digest  # another list, another digest

    # Reused while it lists the same folder (files added since are not picked up: the order holds) ...
    reused = prepare_file_list(str(root), tmp_path / "run" / "data" / "files.bin")
    assert reused.digest == stored.digest and len(reused) == 7
    # ... listed again for another folder.
    other = make_folder(tmp_path / "g", 3)
    assert len(prepare_file_list(str(other), tmp_path / "run" / "data" / "files.bin")) == 3

    path = tmp_path / "x.bin"
    scanned.save(path)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="damaged"):
        FileList.open(path)
    data = bytearray((scanned.save(path), path.read_bytes())[1])
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its digest"):
        FileList.open(path)
    path.write_bytes(b"hello world, not a list")
    with pytest.raises(ValueError, match="not a latentae file list"):
        FileList.open(path)


def synthetic_paths(n: int):
    """ImageNet-like relative paths, ~40 bytes each."""
    for i in range(n):
        c = i % 1000
        yield f"train/n{c:08d}/n{c:08d}_{i}.JPEG"


def test_file_list_structure_is_compact_at_100k(tmp_path):
    n = 100_000
    fl = FileList.from_paths(synthetic_paths(n), tmp_path)
    per_file = fl.nbytes() / n
    old = np.array(list(synthetic_paths(n))).nbytes / n  # the fixed-width unicode array it replaces
    print(f"\nfile list: {per_file:.1f} bytes per file (numpy unicode array: {old:.0f})")
    assert len(fl) == n and fl[12345] == f"train/n{345:08d}/n{345:08d}_12345.JPEG"
    assert per_file <= 100 and per_file < old / 2
    fl.save(tmp_path / "l.bin")
    assert FileList.open(tmp_path / "l.bin")[n - 1] == fl[n - 1]


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc smaps_rollup")
def test_loader_memory_per_file_with_a_stored_list(tmp_path):
    """Measured RSS: the loader's main process after touching every path of an epoch, and
    what a forked worker copies (its private dirty pages) when it goes over them all."""
    from latentae.bench.data import MEMORY, synthetic  # the benchmark's own measurement

    folder, n = tmp_path / "f", 100_000
    folder.mkdir()
    FileList.from_paths(synthetic(n), folder).save(tmp_path / "l.bin")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", MEMORY, str(n), str(folder), str(tmp_path / "l.bin")],
                         capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout.strip().splitlines()[-1])
    main, child = m["main"], m["child"]
    print(f"\nbytes per file: loader process RSS {main['Rss']:.1f}; forked worker RSS +{child['Rss']:.1f} "
          f"(of which private {child['Private_Dirty']:.1f})")  # fmt: skip
    assert main["Rss"] <= 100 and child["Rss"] <= 100 and child["Private_Dirty"] <= 10


def test_loader_with_a_stored_file_list(tmp_path):
    root = make_folder(tmp_path / "f", 9)
    fl = FileList.build(root, tmp_path / "files.bin")
    noise(77).save(root / "b" / "new.png")  # after the list was made: never used
    cfg = DataConfig(path=str(root), resolution=RES, num_workers=0, num_val=2)
    loader = build_train_loader(cfg, 7, seed=0, file_list=tmp_path / "files.bin")
    (batch,) = take(loader, 1)  # one epoch: the 9 listed minus 2 held out
    assert loader.digest == fl.digest and len(batch["key"]) == 7 and "b/new" not in batch["key"]
    assert build_val_images(cfg, 2, file_list=fl).shape == (2, 3, RES, RES)
    with pytest.raises(ValueError, match="files_digest"):
        build_train_loader(cfg, 7, seed=0, resume_states=[loader.state_dict()])  # now 10 files: other data


def test_folder_elastic_resume_continues_the_epoch(tmp_path, caplog):
    root = make_folder(tmp_path / "f", 14)
    cfg = DataConfig(path=str(root), resolution=RES, num_workers=0, num_val=0)
    old = [build_train_loader(cfg, 2, seed=4, rank=r, world_size=2) for r in range(2)]
    used = [k for lo in old for b in take(lo, 2) for k in b["key"]]  # 4 of each rank's 7
    states = [json.loads(json.dumps(lo.state_dict())) for lo in old]

    # Same number of ranks, every rank's state: exact.
    again = build_train_loader(cfg, 2, seed=4, rank=1, world_size=2, resume_states=states)
    assert same_batches(take(again, 3), take(old[1], 3))

    # Three ranks: the 6 unused images of epoch 0 are dealt 2 per rank, then epoch 1 as usual.
    with caplog.at_level(logging.WARNING):
        new = [build_train_loader(cfg, 2, seed=4, rank=r, world_size=3, resume_states=states) for r in range(3)]
    assert "elastic data resume" in caplog.text and "data order differs" in caplog.text
    assert "8 of 14 images used" in caplog.text
    rest = [k for lo in new for k in take(lo, 1)[0]["key"]]
    assert sorted(used + rest) == sorted({k for b in take(build_train_loader(cfg, 14, seed=4), 1) for k in b["key"]})
    assert [lo.state_dict()["epoch"] for lo in new] == [1, 1, 1]
