"""Image data layer: decoding, sources, start-up checks, deterministic + resumable loaders."""

from __future__ import annotations

import io
import json
import logging
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from latentae.imageio import decode_image_and_size, image_size
from latentae.data import (
    IMAGE_EXTENSIONS,
    BadImage,
    DataConfig,
    EpochBatchSampler,
    TrainLoader,
    build_train_loader,
    build_val_images,
    decode_image,
    iter_source,
    list_images,
    sample_rng,
    split_for_worker,
    train_transform,
    val_transform,
)

RES = 16  # crop size used by the loader tests


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(seed: int, h: int = 24, w: int = 30) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def truncated_jpeg() -> bytes:
    data = encode(noise(99, 64, 64), "JPEG", quality=95)
    return data[: len(data) // 2]


def make_folder(root: Path, n: int, bad: bool = False) -> Path:
    """``n`` good PNG/JPEG images in two sub-folders; optionally three bad files."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        ext = "png" if i % 3 else "JPG"  # an upper-case extension too
        noise(i).save(sub / f"img{i:03d}.{ext}", "PNG" if ext == "png" else "JPEG", quality=95)
    if bad:
        (root / "b" / "cut.jpg").write_bytes(truncated_jpeg())
        (root / "b" / "empty.png").write_bytes(b"")
        (root / "a" / "text.png").write_text("not an image")
    return root


def make_shards(root: Path, n_shards: int, per_shard: int, bad: bool = False) -> str:
    """``n_shards`` WebDataset tars of ``per_shard`` samples; returns a brace pattern."""
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with wds.TarWriter(str(root / f"shard-{s:03d}.tar")) as w:
            for i in range(per_shard):
                sample = {"__key__": f"s{s}_{i:03d}", "png": encode(noise(100 * s + i), "PNG"), "txt": "a caption"}
                w.write(sample)
            if bad and s == 0:
                w.write({"__key__": "s0_cut", "jpg": truncated_jpeg()})
                w.write({"__key__": "s0_text", "png": b"not an image"})
                w.write({"__key__": "s0_captiononly", "txt": "no image here"})
    return str(root / f"shard-{{000..{n_shards - 1:03d}}}.tar")


def cut_shard(path: Path, member: int) -> None:
    """Truncate a tar in the middle of the data of its ``member``-th file."""
    with tarfile.open(path) as tf:
        m = tf.getmembers()[member]
    path.write_bytes(path.read_bytes()[: m.offset_data + m.size // 2])


def take(loader, k: int) -> list[dict]:
    it = iter(loader)
    out = [next(it) for _ in range(k)]
    del it  # shuts worker processes down
    return out


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return all(x["key"] == y["key"] and torch.equal(x["image"], y["image"]) for x, y in zip(a, b, strict=True))


# ----------------------------------------------------------------------------- decoding


def png48(rgb16: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one): hand-built chunks."""
    import struct
    import zlib

    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _palette(transparent: bool) -> bytes:
    p = Image.new("P", (10, 8), 0)
    p.putpalette([0, 0, 255] + [0] * 765)
    return encode(p, "PNG", transparency=0) if transparent else encode(p, "PNG")


# (file bytes, expected RGB of every pixel, tolerance)
DECODE_CASES = {
    "rgb_png": (lambda: encode(Image.new("RGB", (10, 8), (10, 200, 30)), "PNG"), (10, 200, 30), 0),
    "rgb_jpeg": (lambda: encode(Image.new("RGB", (10, 8), (10, 200, 30)), "JPEG", quality=100), (10, 200, 30), 3),
    "webp": (lambda: encode(Image.new("RGB", (10, 8), (10, 200, 30)), "WEBP", lossless=True), (10, 200, 30), 0),
    "bmp_gray": (lambda: encode(Image.new("L", (10, 8), 77), "BMP"), (77, 77, 77), 0),
    "tiff_rgb": (lambda: encode(Image.new("RGB", (10, 8), (1, 2, 3)), "TIFF"), (1, 2, 3), 0),
    "gray_png": (lambda: encode(Image.new("L", (10, 8), 77), "PNG"), (77, 77, 77), 0),
    "bilevel": (lambda: encode(Image.new("1", (10, 8), 1), "PNG"), (255, 255, 255), 0),
    # 16-bit gray: 0x8080 = 32896 -> 32896 * 255 / 65535 = 128 (PIL's own convert would clip to 255).
    "gray16_png": (lambda: encode(Image.fromarray(np.full((8, 10), 0x8080, np.uint16)), "PNG"), (128, 128, 128), 0),
    "gray16_tiff": (lambda: encode(Image.fromarray(np.full((8, 10), 0x4000, np.uint16)), "TIFF"), (64, 64, 64), 0),
    "gray32_tiff": (lambda: encode(Image.fromarray(np.full((8, 10), 65535, np.int32)), "TIFF"), (255, 255, 255), 0),
    "rgb48_png": (lambda: png48(np.full((8, 10, 3), [0x1000, 0x8000, 0xFF00], np.uint16)), (16, 128, 255), 1),
    # Fully transparent red on white is white; half-transparent black on white is mid gray.
    "rgba_png": (lambda: encode(Image.new("RGBA", (10, 8), (255, 0, 0, 0)), "PNG"), (255, 255, 255), 0),
    "la_png": (lambda: encode(Image.new("LA", (10, 8), (0, 128)), "PNG"), (127, 127, 127), 1),
    "palette": (lambda: _palette(False), (0, 0, 255), 0),
    "palette_transparent": (lambda: _palette(True), (255, 255, 255), 0),
    # CMYK (0, 255, 255, 0) is pure red.
    "cmyk_jpeg": (lambda: encode(Image.new("CMYK", (10, 8), (0, 255, 255, 0)), "JPEG", quality=100), (255, 0, 0), 3),
}


@pytest.mark.parametrize("case", sorted(DECODE_CASES))
def test_decode_every_mode_to_8bit_rgb(case):
    make, expected, tol = DECODE_CASES[case]
    img = decode_image(make(), case)
    assert img.mode == "RGB" and img.size == (10, 8)
    raw = np.asarray(img)
    assert raw.dtype == np.uint8 and raw.shape == (8, 10, 3)
    a = raw.astype(int)
    assert np.abs(a - np.array(expected)).max() <= tol, (case, a[0, 0])


def test_decode_16bit_rgb_tiff():
    tifffile = pytest.importorskip("tifffile")  # ships with scikit-image
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.full((8, 10, 3), [0x1000, 0x8000, 0xFF00], np.uint16), photometric="rgb")
    a = np.asarray(decode_image(buf.getvalue(), "rgb48.tif")).astype(int)
    assert np.abs(a - [16, 128, 255]).max() <= 1


def test_decode_from_path_and_exif_orientation(tmp_path):
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 10))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    path = tmp_path / "rotated.jpg"
    img.save(path, "JPEG", exif=exif, quality=100)
    out = decode_image(path, str(path))
    assert out.size == (10, 20)  # displayed upright: portrait
    a = np.asarray(out).astype(int)
    assert a[2, 5].min() > 200 and a[17, 5].max() < 50  # the white half is now on top


def test_decode_image_and_size_reports_full_rotated_size():
    """A reduced JPEG draft of an EXIF-rotated photo: the image is upright and reduced,
    the size is the full upright size (what preprocessing geometry and metadata use)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed portrait
    buf = io.BytesIO()
    noise(0, 200, 300).save(buf, "JPEG", exif=exif, quality=90)
    img, full = decode_image_and_size(buf.getvalue(), "x", min_side=40)
    assert img.size == (50, 75) and full == (200, 300)
    assert full == image_size(buf.getvalue(), "x")
    img, full = decode_image_and_size(encode(noise(0, 200, 300), "PNG"), "x", min_side=40)
    assert img.size == full == (300, 200)  # not a JPEG: no draft


def test_decode_min_side_keeps_shorter_side():
    data = encode(noise(0, 200, 300), "JPEG", quality=90)
    assert decode_image(data, "x", min_side=40).size == (75, 50)  # 1/4 scale: shorter side 50 >= 40
    assert decode_image(data, "x").size == (300, 200)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"this is text, not a PNG", "not an image"),
        (truncated_jpeg(), "truncated"),
        (encode(noise(1, 64, 64), "PNG")[:3000], "truncated"),
        (encode(Image.fromarray(np.ones((8, 10), np.float32)), "TIFF"), "float"),
    ],
    ids=["empty", "text", "truncated_jpeg", "truncated_png", "float_tiff"],
)
def test_decode_bad_data_raises_badimage(data, reason):
    with pytest.raises(BadImage) as e:
        decode_image(data, "dir/sample-7")
    assert e.value.name == "dir/sample-7"
    assert reason in e.value.reason
    assert "dir/sample-7" in str(e.value)


def test_decode_missing_file_is_badimage(tmp_path):
    with pytest.raises(BadImage, match="cannot read file"):
        decode_image(tmp_path / "gone.png", "gone.png")


# ----------------------------------------------------------------------------- sources


def test_list_images_recursive_sorted_case_insensitive(tmp_path):
    for rel in ["b/2.PNG", "a/1.jpeg", "a/sub/3.WebP", "0.tif", "z.TIFF", "q.bmp", "notes.txt", "png", "._4.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "5.jpg").write_bytes(b"x")
    rel = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert rel == ["0.tif", "a/1.jpeg", "a/sub/3.WebP", "b/2.PNG", "q.bmp", "z.TIFF"]
    assert set(IMAGE_EXTENSIONS) == {"jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff"}


def _keys(path: str, **kw) -> list[str]:
    return [s.key for s in iter_source(path, **kw)]


@pytest.mark.parametrize("world_size", [2, 3, 5])  # 5 > 4 shards: falls back to splitting by sample
def test_iter_source_rank_split_disjoint_and_complete(tmp_path, world_size):
    folder = str(make_folder(tmp_path / "f", 7))
    shards = make_shards(tmp_path / "s", 4, 3)
    for path, n in [(folder, 7), (shards, 12), ("pipe:cat " + shards, 12)]:
        every = _keys(path)
        assert len(every) == len(set(every)) == n
        assert every == _keys(path)  # stable order
        parts = [_keys(path, rank=r, world_size=world_size) for r in range(world_size)]
        assert sum(len(p) for p in parts) == n and set().union(*parts) == set(every)
    assert _keys(folder)[:2] == ["a/img001", "a/img003"]  # relative path without extension
    sample = next(iter_source(shards))
    assert sample.key == "s0_000" and sample.source.endswith("shard-000.tar:s0_000.png")
    assert decode_image(sample.data, sample.key).size == (30, 24)


def test_iter_source_reports_unreadable_shard_and_goes_on(tmp_path):
    pattern = make_shards(tmp_path / "s", 2, 3)
    cut_shard(tmp_path / "s" / "shard-000.tar", 4)  # members: s0_000.png, .txt, s0_001.png, .txt, s0_002.png
    errors = []
    keys = [s.key for s in iter_source(pattern, on_error=lambda n, r: errors.append((n, r)))]
    assert keys == ["s0_000", "s0_001", "s1_000", "s1_001", "s1_002"]  # before the cut, and the next shard
    assert len(errors) == 1 and errors[0][0].endswith("shard-000.tar") and "cut short" in errors[0][1]
    errors.clear()
    assert _keys(f"pipe:cat {tmp_path}/missing.tar", on_error=lambda n, r: errors.append((n, r))) == []
    assert "exited with status" in errors[0][1] and "missing.tar" in errors[0][1]


def test_iter_source_duplicate_keys_rejected(tmp_path):
    noise(0).save(tmp_path / "x.png")
    noise(1).save(tmp_path / "x.jpg")
    with pytest.raises(ValueError, match="share the key 'x'"):
        list(iter_source(str(tmp_path)))


def test_split_for_worker_covers_once():
    class Numbers(IterableDataset):
        def __iter__(self):
            return split_for_worker(range(10))

    assert sorted(DataLoader(Numbers(), batch_size=None, num_workers=2)) == list(range(10))
    assert list(split_for_worker(range(3))) == [0, 1, 2]  # outside workers: everything


# ----------------------------------------------------------------------------- start-up checks


def test_startup_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="data path not found: .*nowhere"):
        build_train_loader(DataConfig(path=str(tmp_path / "nowhere")), 2, seed=0)
    with pytest.raises(ValueError, match="no data path"):
        build_train_loader(DataConfig(), 2, seed=0)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"no images found in .*empty.*\.jpg, \.jpeg, \.png"):
        build_train_loader(DataConfig(path=str(empty)), 2, seed=0)
    make_shards(tmp_path / "s", 2, 2)
    with pytest.raises(FileNotFoundError, match=r"1 of 3 shards .* not found: .*shard-002\.tar"):
        build_train_loader(DataConfig(path=str(tmp_path / "s" / "shard-{000..002}.tar")), 2, seed=0)
    with pytest.raises(ValueError, match="exited with status"):
        build_train_loader(DataConfig(path=f"pipe:cat {tmp_path}/missing.tar", num_val=0), 2, seed=0)
    with pytest.raises(ValueError, match="unsupported shard URL"):
        build_train_loader(DataConfig(path="https://example.com/shard-{0..1}.tar"), 2, seed=0)
    with pytest.raises(ValueError, match="resolution must be >= 8"):
        DataConfig(resolution=4)


def test_crop_larger_than_every_image(tmp_path):
    folder = make_folder(tmp_path / "f", 6)  # 30x24 images
    shards = make_shards(tmp_path / "s", 2, 3)
    for path in [str(folder), shards]:
        cfg = DataConfig(path=path, resolution=32, resize_shorter=False, small_images="skip", num_workers=0, num_val=1)
        with pytest.raises(ValueError, match=r"resolution=32 .* larger than every image probed .*shorter side is 24 px"):
            build_train_loader(cfg, 2, seed=0)
        # Resizing the shorter side makes any image usable, upscaling if needed.
        batch = take(build_train_loader(DataConfig(path=path, resolution=32, num_workers=0, num_val=1), 2, seed=0), 1)
        assert batch[0]["image"].shape == (2, 3, 32, 32)


def test_small_images_among_big_ones_are_skipped(tmp_path):
    folder = make_folder(tmp_path / "f", 4)
    noise(7, 10, 10).save(folder / "tiny.png")
    cfg = DataConfig(path=str(folder), resolution=20, resize_shorter=False, small_images="skip", num_workers=0, num_val=0)
    batches = take(build_train_loader(cfg, 5, seed=0), 1)
    assert batches[0]["image"].shape == (4, 3, 20, 20)
    ((name, reason),) = batches[0]["skipped"]
    assert name.endswith("tiny.png") and "smaller than the 20px crop" in reason and "small_images=skip" in reason


# ----------------------------------------------------------------------------- training loader


def test_batches_have_the_documented_format(tmp_path):
    cfg = DataConfig(path=str(make_folder(tmp_path / "f", 6)), resolution=RES, num_workers=0, num_val=0)
    (b,) = take(build_train_loader(cfg, 4, seed=0), 1)
    assert b["image"].shape == (4, 3, RES, RES) and b["image"].dtype == torch.float32
    assert b["image"].min() >= -1 and b["image"].max() <= 1
    levels = (b["image"] + 1) * 127.5  # 8-bit levels 0..255 map linearly onto [-1, 1]
    assert torch.allclose(levels, levels.round(), atol=1e-3) and levels.round().unique().numel() > 100
    assert len(b["key"]) == 4 and all(isinstance(k, str) for k in b["key"]) and b["skipped"] == []


def test_transform_depends_only_on_the_sample_rng():
    img = noise(3, 40, 50)
    cfg = DataConfig(resolution=RES)
    a = train_transform(img, cfg, sample_rng(1, 2, 3))
    assert torch.equal(a, train_transform(img, cfg, sample_rng(1, 2, 3)))
    others = [train_transform(img, cfg, sample_rng(1, e, 3)) for e in range(3, 9)]
    assert not all(torch.equal(a, o) for o in others)
    # Without randomness the output is the centre crop of the resized image.
    fixed = DataConfig(resolution=RES, random_crop=False, flip=False, resize_shorter=False)
    expected = torch.from_numpy(np.asarray(img)[12:28, 17:33].copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(train_transform(img, fixed, sample_rng(0, 0, 0)), expected)


@pytest.mark.parametrize("wh", [(50, 30), (30, 50), (16, 40)])
def test_resize_shorter_has_pils_bicubic_geometry(wh):
    """The loader's resize (torch uint8, antialiased) against PIL's bicubic done in float:
    within 8-bit rounding everywhere and no shift; a flip mirrors exactly."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0 : wh[1], 0 : wh[0]]
    a = 127 + 90 * np.sin(xx[..., None] / 4.0 + yy[..., None] / 6.0 + np.arange(3)) + rng.normal(0, 8, (wh[1], wh[0], 3))
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    cfg = DataConfig(resolution=RES, random_crop=False, flip=False)
    out = (val_transform(img, cfg) + 1) * 127.5  # [3, R, R] in 8-bit levels
    w, h = wh
    nw, nh = (RES, round(h * RES / w)) if w <= h else (round(w * RES / h), RES)
    x, y = (nw - RES) // 2, (nh - RES) // 2
    planes = [Image.fromarray(np.asarray(img)[..., c].astype(np.float32), "F").resize((nw, nh), Image.Resampling.BICUBIC)
              for c in range(3)]
    ref = np.stack([np.asarray(p)[y : y + RES, x : x + RES] for p in planes])
    err = out.numpy() - np.clip(ref, 0, 255)
    assert np.abs(err).max() < 1.1 and abs(err.mean()) < 0.05, (np.abs(err).max(), err.mean())
    # random.Random(0)'s third draw is 0.42 < 0.5: this one flips
    flipped = train_transform(img, DataConfig(resolution=RES, random_crop=False, flip=True), random.Random(0))
    assert torch.equal(flipped, train_transform(img, cfg, random.Random(0)).flip(-1))


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_bad_samples_are_skipped_named_and_the_run_goes_on(tmp_path, kind):
    # 12 samples per epoch: 9 good + 3 bad files, or 10 good + 2 bad images (+ 1 caption-only sample, not an image)
    path = str(make_folder(tmp_path / "f", 9, bad=True)) if kind == "folder" else make_shards(tmp_path / "s", 1, 10, bad=True)
    cfg = DataConfig(path=path, resolution=RES, num_workers=0, num_val=0, shuffle_buffer=4)
    batches = take(build_train_loader(cfg, 4, seed=0), 6)  # 24 samples = 2 epochs
    skipped = [s for b in batches for s in b["skipped"]]
    good = sum(len(b["key"]) for b in batches)
    assert good + len(skipped) == 24
    assert all(len(b["key"]) == b["image"].shape[0] for b in batches)
    reasons = {name.rsplit("/", 1)[-1]: reason for name, reason in skipped}
    if kind == "folder":
        assert reasons.keys() == {"cut.jpg", "empty.png", "text.png"}
        assert "empty" in reasons["empty.png"] and "not an image" in reasons["text.png"]
    else:
        assert reasons.keys() == {"shard-000.tar:s0_cut.jpg", "shard-000.tar:s0_text.png"}  # caption-only: no image
    assert "truncated" in next(r for n, r in reasons.items() if "cut" in n)
    assert len(skipped) == 2 * len(reasons)  # each bad one once per epoch


def test_batches_without_any_good_image_are_folded_into_the_next(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "f", 3, bad=True)  # 3 good, 3 bad
    cfg = DataConfig(path=str(folder), resolution=RES, num_workers=0, num_val=0)
    batches = take(build_train_loader(cfg, 1, seed=0), 6)  # 6 good images = 2 epochs
    assert all(b["image"].shape == (1, 3, RES, RES) for b in batches)
    names = sorted(Path(n).name for b in batches for n, _ in b["skipped"])
    assert names == sorted(["cut.jpg", "empty.png", "text.png"] * 2)
    # Nothing usable at all: a clear error after a bounded number of empty batches.
    for f in folder.rglob("img*"):
        f.unlink()
    monkeypatch.setattr(TrainLoader, "MAX_EMPTY_BATCHES", 5)
    with pytest.raises(RuntimeError, match=r"5 batches in a row had no usable image; last skipped: .*(cut|empty|text)"):
        take(build_train_loader(cfg, 1, seed=0), 1)


def test_corrupt_shard_is_reported_in_the_batch(tmp_path):
    pattern = make_shards(tmp_path / "s", 2, 4)
    cut_shard(tmp_path / "s" / "shard-001.tar", 4)  # keeps 2 of its 4 samples
    cfg = DataConfig(path=pattern, resolution=RES, num_workers=0, num_val=0, shuffle_buffer=1)
    batches = take(build_train_loader(cfg, 3, seed=0), 4)
    skipped = [s for b in batches for s in b["skipped"]]
    assert any(n.endswith("shard-001.tar") and "cut short" in r for n, r in skipped)
    assert sum(len(b["key"]) for b in batches) == 12  # 4 + 2 per epoch


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_same_seed_same_batches(tmp_path, kind):
    path = str(make_folder(tmp_path / "f", 10)) if kind == "folder" else make_shards(tmp_path / "s", 3, 4)
    cfg = DataConfig(path=path, resolution=RES, num_workers=0, num_val=2)
    a = take(build_train_loader(cfg, 3, seed=5), 5)
    assert same_batches(a, take(build_train_loader(cfg, 3, seed=5), 5))
    assert not same_batches(a, take(build_train_loader(cfg, 3, seed=6), 5))


def test_folder_batches_do_not_depend_on_worker_count(tmp_path):
    cfg = DataConfig(path=str(make_folder(tmp_path / "f", 10)), resolution=RES, num_workers=0, num_val=2)
    a = take(build_train_loader(cfg, 3, seed=1), 7)
    b = take(build_train_loader(DataConfig(**{**cfg.__dict__, "num_workers": 2}), 3, seed=1), 7)
    assert same_batches(a, b)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("kind", ["folder", "shards", "pipe"])
def test_resume_gives_the_batches_of_an_uninterrupted_run(tmp_path, kind, num_workers):
    if kind == "folder":
        path = str(make_folder(tmp_path / "f", 11, bad=True))
    else:
        path = make_shards(tmp_path / "s", 4, 5, bad=True)
        path = "pipe:cat " + path if kind == "pipe" else path
    cfg = DataConfig(path=path, resolution=RES, num_workers=num_workers, num_val=2, shuffle_buffer=3)
    k, m = 5, 6  # 5 batches of 3 cross an epoch boundary for both sources
    full = take(build_train_loader(cfg, 3, seed=7), k + m)

    first = build_train_loader(cfg, 3, seed=7)
    head = take(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # must survive a checkpoint
    tail = take(build_train_loader(cfg, 3, seed=7, state=state), m)
    assert same_batches(head + tail, full)
    assert [b["skipped"] for b in head + tail] == [b["skipped"] for b in full]
    if kind == "folder":
        assert (state["epoch"], state["offset"]) == (1, 3)  # 15 samples of a 12-file epoch (14 files, 2 held out)
    # Iterating the same loader again continues from its state, too.
    assert same_batches(take(first, m), tail)


def test_resume_refuses_a_different_layout(tmp_path):
    cfg = DataConfig(path=make_shards(tmp_path / "s", 2, 3), resolution=RES, num_workers=0, num_val=0)
    loader = build_train_loader(cfg, 2, seed=0)
    take(loader, 2)
    state = loader.state_dict()
    with pytest.raises(ValueError, match=r"seed: saved 0, now 1"):
        build_train_loader(cfg, 2, seed=1, state=state)
    with pytest.raises(ValueError, match=r"rank: saved 0, now 1"):
        build_train_loader(cfg, 2, seed=0, rank=1, world_size=2, state=state)
    with pytest.raises(ValueError, match=r"num_workers: saved 0, now 2"):
        build_train_loader(DataConfig(**{**cfg.__dict__, "num_workers": 2}), 2, seed=0, state=state)
    folder_cfg = DataConfig(path=str(make_folder(tmp_path / "f", 5)), resolution=RES, num_workers=0, num_val=0)
    with pytest.raises(ValueError, match=r"kind: saved 'shards', now 'folder'"):
        build_train_loader(folder_cfg, 2, seed=0, state=state)


def test_folder_ranks_are_disjoint_and_cover_each_epoch(tmp_path):
    cfg = DataConfig(path=str(make_folder(tmp_path / "f", 13)), resolution=RES, num_workers=0, num_val=0)
    per_rank = 13 // 2  # 6: one image per epoch is left out so both ranks run 6 samples
    keys = [[k for b in take(build_train_loader(cfg, 3, seed=0, rank=r, world_size=2), 2) for k in b["key"]] for r in (0, 1)]
    assert all(len(k) == len(set(k)) == per_rank for k in keys)
    assert not set(keys[0]) & set(keys[1]) and len(set(keys[0]) | set(keys[1])) == 12
    # The left-out image changes with the epoch: over a few epochs everything is seen.
    sampler = [EpochBatchSampler(13, 3, seed=0, rank=r, world_size=2) for r in (0, 1)]
    seen = {i for e in range(6) for s in sampler for i in s.epoch_indices(e)}
    assert seen == set(range(13))


def test_shard_ranks_are_disjoint_and_cover_each_epoch(tmp_path):
    cfg = DataConfig(path=make_shards(tmp_path / "s", 4, 3), resolution=RES, num_workers=0, num_val=0)
    keys = [[k for b in take(build_train_loader(cfg, 3, seed=0, rank=r, world_size=2), 2) for k in b["key"]] for r in (0, 1)]
    assert all(len(k) == len(set(k)) == 6 for k in keys)  # 2 shards x 3 samples = one epoch per rank
    assert not set(keys[0]) & set(keys[1]) and len(set(keys[0]) | set(keys[1])) == 12


def test_shard_sample_split_fallback_when_too_few_shards(tmp_path, caplog):
    cfg = DataConfig(path=make_shards(tmp_path / "s", 1, 8), resolution=RES, num_workers=2, num_val=0)
    with caplog.at_level(logging.WARNING):
        loaders = [build_train_loader(cfg, 2, seed=0, rank=r, world_size=2) for r in (0, 1)]
    assert "splitting by sample" in caplog.text
    keys = [[k for b in take(loader, 2) for k in b["key"]] for loader in loaders]  # 2 batches x 2 = 4 = 8 / 2 ranks
    assert not set(keys[0]) & set(keys[1]) and len(set(keys[0]) | set(keys[1])) == 8


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_val_images_are_fixed_held_out_centre_crops(tmp_path, kind):
    path = str(make_folder(tmp_path / "f", 10)) if kind == "folder" else make_shards(tmp_path / "s", 3, 4)
    cfg = DataConfig(path=path, resolution=RES, num_workers=0, num_val=3)
    val = build_val_images(cfg, 3)
    assert val.shape == (3, 3, RES, RES) and val.min() >= -1 and val.max() <= 1
    assert torch.equal(val, build_val_images(cfg, 3))
    all_keys = _keys(path)
    n_train = len(all_keys) - 3
    train_keys = {k for b in take(build_train_loader(cfg, n_train, seed=0), 1) for k in b["key"]}  # one epoch
    assert len(train_keys) == n_train and len(set(all_keys) - train_keys) == 3  # exactly the held-out ones
    # A separate val_path is used as is; the training set then keeps all its images.
    other = str(make_folder(tmp_path / "v", 4))
    assert build_val_images(DataConfig(path=path, val_path=other, resolution=RES), 2).shape == (2, 3, RES, RES)
    assert build_val_images(cfg, 0).shape == (0, 3, RES, RES)
    with pytest.raises(ValueError, match="num_val is 0"):
        build_val_images(DataConfig(path=path, num_val=0), 2)
