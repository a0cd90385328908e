"""Dataset encoding (latentae.encode, tools/encode.py): shard contents, options, resume, processes."""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from latentae.encode import SHARD_STRIDE, EncodeConfig, JobMismatch, encode_dataset, preprocess
from latentae.io import save_vae_safetensors
from latentae.latents import MANIFEST, iter_shard_latents, read_manifest
from latentae.model import ModelConfig, build_vae

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers (also used by
# test_latents.py / test_latent_stats.py)


def tiny_vae_config(**kw) -> ModelConfig:
    base = dict(
        latent_channels=4,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
    )
    base.update(kw)
    return ModelConfig(**base)


def save_tiny_vae(path: Path, seed: int = 0, **kw) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(seed)
    vae = build_vae(tiny_vae_config(**kw)).eval()
    save_vae_safetensors(vae, path)
    return path, vae


def photo_like(w: int, h: int, seed: int) -> np.ndarray:
    """Smooth colour gradients plus noise: compresses like a photo, differs per seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, 2 * np.pi, 3)
    img = 127 + 100 * np.sin(xx[..., None] / rng.uniform(5, 15) + yy[..., None] / rng.uniform(5, 15) + a)
    img += rng.normal(0, 10, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_images(folder: Path, n: int, size=(48, 40), seed: int = 0, ext: str = "png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        w, h = size if isinstance(size, tuple) else size(i)
        p = folder / f"img{i:04d}.{ext}"
        Image.fromarray(photo_like(w, h, seed * 100_000 + i)).save(p)
        out.append(p)
    return out


def add_bad_files(folder: Path) -> dict[str, str]:
    """A text file named .png, an empty .jpg and a truncated JPEG; returns name -> expected reason word."""
    (folder / "bad_text.png").write_text("definitely not a PNG")
    (folder / "bad_empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(photo_like(64, 64, 999)).save(buf, format="JPEG", quality=90)
    (folder / "bad_truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return {"bad_text.png": "not an image", "bad_empty.jpg": "empty", "bad_truncated.jpg": "truncated"}


def leftovers(out: Path) -> list[Path]:
    """Temporaries and claims: none may remain after a run, finished or stopped."""
    found = [*out.glob("*.tmp"), *(out / "tmp").rglob("*"), *(out / "claims").glob("*")]
    return [p for p in found if p.is_file()]


def read_all(out: Path) -> list:
    return [s for tar in sorted(out.glob("part-*.tar")) for s in iter_shard_latents(tar)]


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """The documented 'resize' preprocessing, written independently of latentae.encode:
    shorter side to size (antialiased bicubic, torch on uint8), centre crop."""
    w, h = img.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    left, top = (nw - size) // 2, (nh - size) // 2
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None]
    if (nw, nh) != (w, h):
        x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True)
    return x[0, :, top : top + size, left : left + size].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("wh, size", [((200, 120), 64), ((120, 200), 64), ((97, 61), 48), ((64, 64), 64), ((90, 90), 32)])
def test_resize_matches_float_pil_resize_then_crop(wh, size):
    """The uint8 resize has PIL's geometry and kernel: against PIL's bicubic done in float
    ('F' mode, no rounding), every pixel is within 8-bit rounding (~1) and there is no
    shift (a one-pixel shift of this noisy image is off by ~10 on average)."""
    img = Image.fromarray(photo_like(*wh, seed=1))
    cfg = EncodeConfig(vae="x", data="x", out="x", size=size)
    t, meta = preprocess(img, wh, cfg, "x")
    assert t.dtype == torch.uint8 and t.shape == (3, size, size) and t.is_contiguous()
    arr = t.permute(1, 2, 0).numpy().astype(np.float64)
    w, h = wh
    nw, nh = meta["resized_size"]
    assert min(nw, nh) == size and abs(nw / nh - w / h) < 2 / size
    box = tuple(meta["crop_box"])
    assert (box[2] - box[0], box[3] - box[1]) == (size, size)
    planes = [Image.fromarray(np.asarray(img)[..., c].astype(np.float32), "F") for c in range(3)]
    ref = np.stack([np.asarray(p.resize((nw, nh), Image.Resampling.BICUBIC).crop(box)) for p in planes], -1)
    err = arr - np.clip(ref, 0, 255)
    assert np.abs(err).max() < 1.1 and np.abs(err).mean() < 0.4 and abs(err.mean()) < 0.05, (
        np.abs(err).max(), np.abs(err).mean(), err.mean())
    if (nw, nh) == (w, h):  # no resampling at all: an exact crop
        assert np.array_equal(arr, np.asarray(img.crop(box)))


def to_input(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def run_encode(vae_path, data, out, **kw) -> object:
    cfg = EncodeConfig(vae=str(vae_path), data=str(data), out=str(out), **{"num_workers": 0, **kw})
    return encode_dataset(cfg, progress=False)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models: one intra-op thread is fastest, and on a busy 2-core machine two
    OpenMP threads next to a DataLoader worker can be 30x slower (spinning barriers)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("vae")
    return save_tiny_vae(d / "vae.safetensors")


def load_tool(name: str):
    """Import tools/<name>.py (a script folder, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"latentae_tool_{name}", ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


# ----------------------------------------------------------------------------- contents


def test_shards_and_manifest_match_direct_encoding(tmp_path, vae_file):
    vae_path, vae = vae_file
    imgs = make_images(tmp_path / "data", 7, size=lambda i: (40 + 8 * i, 36 + 4 * (i % 3)))
    bad = add_bad_files(tmp_path / "data")
    out = tmp_path / "out"
    r = run_encode(vae_path, tmp_path / "data", out, size=32, shard_size=4, batch_size=3, dtype="fp32")
    m = read_manifest(out)
    assert (m["num_inputs"], m["num_encoded"], m["num_skipped"]) == (10, 7, 3)
    assert r.manifest is not None and r.parts_written == 3
    assert [s["num_inputs"] for s in m["parts"]] == [4, 4, 2]
    assert [s["file"] for s in m["shards"]] == ["part-000000-0000.tar", "part-000001-0000.tar", "part-000002-0000.tar"]
    assert sum(s["num_encoded"] for s in m["shards"]) == 7
    # every skipped input is named with a reason
    reasons = {Path(s["source"]).name: s["reason"] for s in m["skipped"]}
    assert set(reasons) == set(bad)
    for name, word in bad.items():
        assert word in reasons[name], (name, reasons[name])
    # job identity is recorded
    from latentae.io import load_vae, weights_hash

    assert m["job"]["vae"]["weights_hash"] == weights_hash(load_vae(vae_path, fast=False))
    assert m["job"]["preprocess"]["mode"] == "resize" and m["job"]["preprocess"]["size"] == 32
    # the precision the model ran in: fp32 weights on the CPU compute in fp32, no fallbacks
    assert m["job"]["precision"] == {"parameters": "fp32", "compute": "float32"}
    assert m["precision"] == {"parameters": "fp32", "compute": "float32", "fp32_fallbacks": 0}
    assert not leftovers(out)

    samples = read_all(out)
    assert sorted(s.key for s in samples) == sorted(p.stem for p in imgs)
    by_key = {s.key: s for s in samples}
    for p in imgs:
        s = by_key[p.stem]
        img = Image.open(p).convert("RGB")
        assert s.meta["original_size"] == list(img.size)
        assert s.meta["size"] == [32, 32] and s.meta["latent_size"] == [8, 8]
        assert s.meta["source"] == str(p) and s.meta["dtype"] == "fp32"
        rw, rh = s.meta["resized_size"]
        assert min(rw, rh) == 32
        l, t, r_, b = s.meta["crop_box"]
        assert (r_ - l, b - t) == (32, 32) and l == (rw - 32) // 2 and t == (rh - 32) // 2
        with torch.no_grad():
            post = vae.encode(to_input(resize_center_crop(img, 32)))
        assert s.mean.shape == (4, 8, 8)
        torch.testing.assert_close(s.mean, post.mean[0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(s.logvar, post.logvar[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_dtypes_round_trip(tmp_path, vae_file, dtype):
    vae_path, _ = vae_file
    make_images(tmp_path / "data", 3)
    out32, out = tmp_path / "ref", tmp_path / dtype
    run_encode(vae_path, tmp_path / "data", out32, size=32, dtype="fp32")
    run_encode(vae_path, tmp_path / "data", out, size=32, dtype=dtype)
    ref = {s.key: s for s in read_all(out32)}
    with tarfile.open(next(out.glob("part-*.tar"))) as tf:
        raw = np.load(io.BytesIO(tf.extractfile(next(m for m in tf if m.name.endswith(".mean.npy"))).read()))
    assert raw.dtype == {"fp16": np.float16, "bf16": np.uint16, "fp32": np.float32}[dtype]
    for s in read_all(out):
        assert s.meta["dtype"] == dtype and s.mean.dtype == torch.float32
        want = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        # exactly what rounding the fp32 latents to that dtype gives
        assert torch.equal(s.mean, ref[s.key].mean.to(want).float())
        assert torch.equal(s.logvar, ref[s.key].logvar.to(want).float())


def test_flip_stores_latents_of_flipped_image(tmp_path, vae_file):
    vae_path, vae = vae_file
    imgs = make_images(tmp_path / "data", 2, size=(32, 32))
    run_encode(vae_path, tmp_path / "data", tmp_path / "out", size=32, flip=True, dtype="fp32")
    for s in read_all(tmp_path / "out"):
        arr = np.asarray(Image.open(tmp_path / "data" / f"{s.key}.png"))
        with torch.no_grad():
            plain = vae.encode(to_input(arr))
            flipped = vae.encode(to_input(arr[:, ::-1]))
        torch.testing.assert_close(s.mean, plain.mean[0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(s.flip_mean, flipped.mean[0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(s.flip_logvar, flipped.logvar[0], atol=2e-5, rtol=1e-4)
        assert not torch.allclose(s.mean, s.flip_mean)
    assert len(imgs) == 2


def test_crop_mode_centre_crops_and_skips_small_images(tmp_path, vae_file):
    vae_path, vae = vae_file
    make_images(tmp_path / "data", 2, size=(50, 40))
    Image.fromarray(photo_like(20, 40, 5)).save(tmp_path / "data" / "small.png")
    run_encode(vae_path, tmp_path / "data", tmp_path / "out", preprocess="crop", size=32, dtype="fp32")
    m = read_manifest(tmp_path / "out")
    assert m["num_encoded"] == 2 and [Path(s["source"]).name for s in m["skipped"]] == ["small.png"]
    assert "smaller than" in m["skipped"][0]["reason"]
    for s in read_all(tmp_path / "out"):
        assert s.meta["crop_box"] == [9, 4, 41, 36] and s.meta["resized_size"] == [50, 40]
        arr = np.asarray(Image.open(tmp_path / "data" / f"{s.key}.png"))[4:36, 9:41]
        with torch.no_grad():
            torch.testing.assert_close(s.mean, vae.encode(to_input(arr)).mean[0], atol=2e-5, rtol=1e-4)


def test_keep_mode_buckets_sizes_and_pads_odd_sizes(tmp_path, vae_file):
    vae_path, vae = vae_file
    sizes = [(32, 24), (30, 18), (32, 24), (30, 18), (32, 24)]
    make_images(tmp_path / "data", len(sizes), size=lambda i: sizes[i])
    run_encode(vae_path, tmp_path / "data", tmp_path / "out", preprocess="keep", batch_size=4, dtype="fp32")
    samples = read_all(tmp_path / "out")
    assert len(samples) == 5
    for s in samples:
        w, h = sizes[int(s.key[3:])]
        assert s.meta["size"] == [w, h] and s.meta["original_size"] == [w, h]
        assert s.meta["padded_size"] == [-(-w // 4) * 4, -(-h // 4) * 4]  # f = 4 for the tiny VAE
        assert list(s.mean.shape[-2:]) == [s.meta["padded_size"][1] // 4, s.meta["padded_size"][0] // 4]
        arr = np.asarray(Image.open(tmp_path / "data" / f"{s.key}.png"))
        with torch.no_grad():  # the model pads odd sizes itself
            torch.testing.assert_close(s.mean, vae.encode(to_input(arr)).mean[0], atol=2e-5, rtol=1e-4)


def test_store_mode_and_seeded_sample(tmp_path, vae_file):
    vae_path, _ = vae_file
    make_images(tmp_path / "data", 3)
    kw = dict(size=32, dtype="fp32")
    run_encode(vae_path, tmp_path / "data", tmp_path / "dist", **kw)
    run_encode(vae_path, tmp_path / "data", tmp_path / "mode", store="mode", **kw)
    run_encode(vae_path, tmp_path / "data", tmp_path / "s1", store="sample", seed=1, **kw)
    run_encode(vae_path, tmp_path / "data", tmp_path / "s1b", store="sample", seed=1, batch_size=1, **kw)
    run_encode(vae_path, tmp_path / "data", tmp_path / "s2", store="sample", seed=2, **kw)
    dist = {s.key: s for s in read_all(tmp_path / "dist")}
    mode, s1, s1b, s2 = ({s.key: s for s in read_all(tmp_path / d)} for d in ("mode", "s1", "s1b", "s2"))
    for k, d in dist.items():
        assert mode[k].logvar is None and torch.equal(mode[k].mean, d.mean)
        # a draw depends on (seed, input index) only, not on batching
        torch.testing.assert_close(s1[k].mean, s1b[k].mean, atol=1e-5, rtol=0)
        assert not torch.allclose(s1[k].mean, s2[k].mean)
        eps = (s1[k].mean - d.mean) / d.logvar.mul(0.5).exp()
        assert eps.abs().max() < 6 and eps.std() > 0.5


# ----------------------------------------------------------------------------- job control


def test_rerun_is_noop_and_changed_job_is_refused(tmp_path, vae_file):
    vae_path, _ = vae_file
    make_images(tmp_path / "data", 5)
    out = tmp_path / "out"
    run_encode(vae_path, tmp_path / "data", out, size=32, shard_size=2)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r = run_encode(vae_path, tmp_path / "data", out, size=32, shard_size=2)
    assert r.nothing_to_do and r.parts_written == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    other_vae, _ = save_tiny_vae(tmp_path / "other.safetensors", seed=1)
    with pytest.raises(JobMismatch, match="VAE weights"):
        run_encode(other_vae, tmp_path / "data", out, size=32, shard_size=2)
    with pytest.raises(JobMismatch, match="preprocessing"):
        run_encode(vae_path, tmp_path / "data", out, size=16, shard_size=2)
    with pytest.raises(JobMismatch, match="storage"):
        run_encode(vae_path, tmp_path / "data", out, size=32, shard_size=2, dtype="bf16")
    make_images(tmp_path / "data", 6)  # one more image: the input changed
    with pytest.raises(JobMismatch, match="input"):
        run_encode(vae_path, tmp_path / "data", out, size=32, shard_size=2)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps  # refused = untouched

    # the CLI says it clearly and exits non-zero
    encode_main = load_tool("encode").main
    argv = ["--vae", str(other_vae), "--data", str(tmp_path / "data"), "--out", str(out), "--size", "32",
            "--shard-size", "2", "--num-workers", "0", "--no-progress"]
    assert encode_main(argv) == 2
    (out / "unrelated.txt").write_text("keep me")
    assert encode_main(argv + ["--overwrite"]) == 0
    m = read_manifest(out)
    assert m["num_encoded"] == 6 and m["job"]["vae"]["path"] == str(other_vae)
    assert (out / "unrelated.txt").read_text() == "keep me"  # --overwrite deletes only our files
    (out / "job.json").unlink()  # shards of an unknown job are not silently reused
    with pytest.raises(JobMismatch, match="no job.json"):
        run_encode(other_vae, tmp_path / "data", out, size=32, shard_size=2)


def test_vae_with_new_factors_is_the_same_job(tmp_path, vae_file):
    """Re-exporting the VAE with latent_stats' factors does not change raw latents."""
    vae_path, vae = vae_file
    make_images(tmp_path / "data", 3)
    run_encode(vae_path, tmp_path / "data", tmp_path / "out", size=32, shard_size=2)
    (tmp_path / "out" / "part-000001-0000.tar").unlink()
    from latentae.io import save_diffusers

    save_diffusers(vae, tmp_path / "rescaled", scaling_factor=0.5, shift_factor=0.1)
    r = run_encode(tmp_path / "rescaled", tmp_path / "data", tmp_path / "out", size=32, shard_size=2)
    assert r.parts_written == 1 and r.manifest["num_encoded"] == 3


def test_out_of_memory_alone_and_non_finite_latents_are_skipped(tmp_path, vae_file, monkeypatch):
    """A sample that does not fit in memory even alone, or whose latents are NaN, costs only itself."""
    vae_path, _ = vae_file
    make_images(tmp_path / "data", 6, size=(32, 32))
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "data" / "img0002.png")  # black
    Image.fromarray(np.full((32, 32, 3), 255, np.uint8)).save(tmp_path / "data" / "img0004.png")  # white
    import latentae.io

    real_load = latentae.io.load_vae

    def load_flaky(*a, **kw):
        vae = real_load(*a, **kw)
        plain = vae.encode

        def encode(x):
            flat = x.flatten(1)
            if (flat == -1).all(1).any():
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory: simulated out of memory")
            post = plain(x)
            white = (flat == 1).all(1)
            post.mean[white] = float("nan")
            return post

        vae.encode = encode
        return vae

    monkeypatch.setattr(latentae.io, "load_vae", load_flaky)
    run_encode(vae_path, tmp_path / "data", tmp_path / "out", size=32, batch_size=3)
    m = read_manifest(tmp_path / "out")
    assert m["num_encoded"] == 4
    reasons = {s["key"]: s["reason"] for s in m["skipped"]}
    assert "does not fit in memory even alone" in reasons["img0002"] and "simulated" in reasons["img0002"]
    assert "non-finite" in reasons["img0004"]
    assert sorted(s.key for s in read_all(tmp_path / "out")) == ["img0000", "img0001", "img0003", "img0005"]


def test_duplicate_keys_are_skipped_not_fatal(tmp_path, vae_file):
    vae_path, _ = vae_file
    make_images(tmp_path / "data", 2)
    make_images(tmp_path / "data", 1, ext="jpg")  # img0000.jpg next to img0000.png
    run_encode(vae_path, tmp_path / "data", tmp_path / "out", size=32)
    m = read_manifest(tmp_path / "out")
    assert m["num_encoded"] == 2 and m["num_skipped"] == 1
    assert "duplicate key 'img0000'" in m["skipped"][0]["reason"]


def test_tile_option(tmp_path, vae_file):
    vae_path, vae = vae_file
    make_images(tmp_path / "data", 2, size=(64, 48))
    try:
        import latentae.tiling  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="--tile needs tiled encoding"):
            run_encode(vae_path, tmp_path / "data", tmp_path / "out", preprocess="keep", tile=32, tile_overlap=8)
        return
    run_encode(vae_path, tmp_path / "data", tmp_path / "out", preprocess="keep", tile=32, tile_overlap=16,
               dtype="fp32")
    for s in read_all(tmp_path / "out"):
        arr = np.asarray(Image.open(tmp_path / "data" / f"{s.key}.png"))
        with torch.no_grad():
            ref = vae.encode(to_input(arr)).mean[0]
        assert s.mean.shape == ref.shape
        err = (s.mean - ref).abs().mean() / ref.abs().mean()
        # tiled (so not bit-equal: the tile path really ran) yet close (measured ~1.3% here)
        assert 0 < err < 0.05, err


# ----------------------------------------------------------------------------- shard input


def write_input_shards(folder: Path, n_shards: int, per_shard: int, bad: set[int] = frozenset()) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    i = 0
    for s in range(n_shards):
        with wds.TarWriter(str(folder / f"in-{s:03d}.tar")) as w:
            for _ in range(per_shard):
                buf = io.BytesIO()
                Image.fromarray(photo_like(40, 36, i)).save(buf, format="PNG")
                data = b"garbage" if i in bad else buf.getvalue()
                w.write({"__key__": f"s{s}.d/k{i:04d}", "png": data, "txt": f"caption {i}"})
                i += 1
    return [str(folder / f"in-{s:03d}.tar") for s in range(n_shards)]


def test_webdataset_input_one_part_per_input_shard(tmp_path, vae_file):
    vae_path, _ = vae_file
    urls = write_input_shards(tmp_path / "in", 3, 5, bad={6})
    pattern = str(tmp_path / "in" / "in-{000..002}.tar")
    out = tmp_path / "out"
    run_encode(vae_path, pattern, out, size=32, shard_size=2, batch_size=3)
    m = read_manifest(out)
    assert (m["num_inputs"], m["num_encoded"], m["num_skipped"]) == (15, 14, 1)
    assert m["job"]["input"]["count"] == 3 and len(m["job"]["input"]["shards"]) == 3
    # part p = input shard p, its latents in tars of at most shard_size = 2
    assert [(s["file"], s["num_encoded"]) for s in m["shards"][:4]] == [
        ("part-000000-0000.tar", 2), ("part-000000-0001.tar", 2), ("part-000000-0002.tar", 1), ("part-000001-0000.tar", 2)]
    assert [p["num_inputs"] for p in m["parts"]] == [5, 5, 5] and m["parts"][1]["num_skipped"] == 1
    samples = read_all(out)
    want = [p * SHARD_STRIDE + i for p in range(3) for i in range(5)]
    want.remove(SHARD_STRIDE + 1)  # sample 6 overall = position 1 of shard 1
    assert sorted(s.index for s in samples) == want
    assert m["skipped"][0]["index"] == SHARD_STRIDE + 1 and "not an image" in m["skipped"][0]["reason"]
    # keys with dots survive the WebDataset naming; sources name shard and member
    s = next(x for x in samples if x.index == SHARD_STRIDE + 2)
    assert s.key == "s1.d/k0007" and s.meta["source"].endswith("in-001.tar:s1.d/k0007.png")
    # re-run: a part with one shard deleted is redone whole, the others are left alone
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("part-00000[02]*")}
    (out / "part-000001-0001.tar").unlink()
    r = run_encode(vae_path, pattern, out, size=32, shard_size=2, batch_size=3)
    assert r.parts_written == 1 and r.parts_done_before == 2
    assert sorted(s.index for s in read_all(out)) == want
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-00000[02]*")} == stamps
    # the same data through pipe: URLs that log each opening: one pass, each shard read once
    log = tmp_path / "opened.log"
    r = run_encode(vae_path, counting_source(urls, log), tmp_path / "out_pipe", size=32, shard_size=4, num_workers=2)
    assert r.manifest["num_encoded"] == 14 and r.manifest["num_inputs"] == 15
    assert sorted(log.read_text().split()) == urls


# ----------------------------------------------------------------------------- processes


def counting_source(urls: list[str], log: Path) -> str:
    """pipe: URLs that append the shard's name to ``log`` each time the shard is opened."""
    return "::".join(f"pipe:sh -c 'echo {u} >> {log}; cat {u}'" for u in urls)


def _indices(out: Path) -> list[int]:
    return sorted(s.index for s in read_all(out))


def test_resume_after_sigkill_encodes_everything_exactly_once(tmp_path, vae_file):
    vae_path, _ = vae_file
    n = 320
    make_images(tmp_path / "data", n, size=(40, 40))
    (tmp_path / "data" / "zz_bad.png").write_text("nope")
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "tools" / "encode.py"), "--vae", str(vae_path), "--data",
           str(tmp_path / "data"), "--out", str(out), "--size", "32", "--shard-size", "8", "--batch-size", "4",
           "--num-workers", "1", "--no-progress"]
    # A random moment: after a random number of finished shards, plus a random fraction of the next.
    # (Waiting for shards rather than seconds keeps the kill mid-run on a fast machine too.)
    k, delay = random.randint(1, 15), random.uniform(0.0, 0.02)
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list(out.glob("part-*.tar"))) < k and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = list(out.glob("part-??????.json"))  # a part is done when its json exists (written last)
    assert not (out / MANIFEST).exists(), f"the run finished before the kill (k={k}, delay={delay:.3f})"
    assert k - 1 <= len(done) < 41, (k, len(done))
    # The remains of an unfinished part (a temporary, a published tar without its json, the dead
    # process's claim) must be redone, not trusted.
    pending = next(p for p in range(41) if not (out / f"part-{p:06d}.json").exists())
    (out / "tmp" / f"part-{pending:06d}").mkdir(parents=True, exist_ok=True)
    (out / "tmp" / f"part-{pending:06d}" / f"part-{pending:06d}-0000.tar.deadbeef0000").write_bytes(b"half a shard")
    (out / f"part-{pending:06d}-0000.tar").write_bytes(b"published, but its json never was")
    claim = out / "claims" / f"part-{pending:06d}.claim"
    if not claim.exists():
        dead = subprocess.Popen(["true"])
        dead.wait()
        from latentae.encode.claims import machine_id

        claim.parent.mkdir(exist_ok=True)
        claim.write_text(f'{{"machine": "{machine_id()}", "pid": {dead.pid}, "started": null, "token": "dead"}}')

    rerun = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{len(done)} of 41 parts were already done" in rerun.stdout
    assert _indices(out) == list(range(n))  # every valid input exactly once
    m = read_manifest(out)
    assert (m["num_encoded"], m["num_skipped"]) == (n, 1) and len(m["parts"]) == 41
    assert len(m["shards"]) == 40  # the last part holds only the bad file: no shard
    assert not leftovers(out)
    again = run_encode(vae_path, tmp_path / "data", out, size=32, shard_size=8, batch_size=4)
    assert again.nothing_to_do


def test_two_processes_share_the_parts_and_read_each_input_shard_once(tmp_path, vae_file):
    """torchrun, 2 CPU processes (gloo): rank 0 plans and the other receives the plan; the
    parts are shared by claims; a counting pipe: opener shows every input shard was read
    exactly once in all (no counting pass, no shard read by both)."""
    vae_path, _ = vae_file
    urls = write_input_shards(tmp_path / "in", 6, 4, bad={5})
    log = tmp_path / "opened.log"
    source = counting_source(urls, log)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tools" / "encode.py"), "--vae", str(vae_path), "--data", source,
           "--out", str(out), "--size", "32", "--batch-size", "2", "--num-workers", "1", "--no-progress"]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    per_rank = [line for line in r.stdout.splitlines() if line.startswith("encoded ")]
    assert len(per_rank) == 2
    written = [int(line.split(" into ")[1].split()[0]) for line in per_rank]
    assert sum(written) == 6  # each of the 6 parts (input shards) written by one of the two ranks
    assert sorted(log.read_text().split()) == urls  # each input shard opened once
    want = [p * SHARD_STRIDE + i for p in range(6) for i in range(4) if (p, i) != (1, 1)]
    assert _indices(out) == want  # disjoint (no index twice) and complete
    m = read_manifest(out)
    assert (m["num_inputs"], m["num_encoded"], m["num_skipped"]) == (24, 23, 1)

    # lose three parts, finish with ONE process: only their input shards are read again
    for p in (0, 3, 5):
        (out / f"part-{p:06d}-0000.tar").unlink()
    (out / MANIFEST).unlink()
    res = run_encode(vae_path, source, out, size=32, batch_size=2)
    assert res.parts_written == 3 and res.parts_done_before == 3
    assert sorted(log.read_text().split()) == sorted(urls + [urls[0], urls[3], urls[5]])
    assert _indices(out) == want


# ----------------------------------------------------------------------------- worker priority


@pytest.mark.parametrize("priority", ["auto", "low", "normal"])
def test_decoding_workers_priority(tmp_path, vae_file, monkeypatch, priority):
    """The worker_init_fn really sets the worker's scheduling, and only the worker's:
    'auto' on the CPU is SCHED_IDLE (cores the model leaves idle), 'low' is nice +10."""
    import latentae.encode.reading as enc

    load, marker = enc.load_sample, tmp_path / "sched.txt"

    def spy(*args, **kw):  # runs in the forked worker: report its scheduling through a file
        with open(marker, "a") as f:
            f.write(f"{os.sched_getscheduler(0)} {os.nice(0)}\n")
        return load(*args, **kw)

    monkeypatch.setattr(enc, "load_sample", spy)
    data = tmp_path / "images"
    make_images(data, 3)
    base = (os.sched_getscheduler(0), os.nice(0))
    r = run_encode(vae_file[0], data, tmp_path / "out", size=32, num_workers=1, worker_priority=priority)
    assert r.num_encoded == 3
    assert 0 < r.first_batch_seconds <= r.pipeline_seconds <= r.seconds
    want = {"auto": (os.SCHED_IDLE, base[1]), "low": (base[0], min(base[1] + 10, 19)), "normal": base}[priority]
    assert [tuple(map(int, v.split())) for v in marker.read_text().splitlines()] == [want] * 3
    assert (os.sched_getscheduler(0), os.nice(0)) == base  # the encoding process itself is unchanged


def test_device_policies_without_a_gpu():
    """The device-dependent decisions are plain functions of the device type (and cores)."""
    from latentae.encode.device import (
        default_num_workers,
        is_out_of_memory,
        pin_memory,
        use_writer_thread,
        worker_priority,
    )

    assert worker_priority("auto", "cpu") == "idle" and worker_priority("auto", "cuda") == "normal"
    assert worker_priority("low", "cuda") == "low"
    with pytest.raises(ValueError, match=r"worker_priority: expected one of .* got 'idel' \(did you mean 'idle'\?\)"):
        EncodeConfig(worker_priority="idel")
    # decoding workers: today's 2 on the CPU; on a GPU the process's share of the cores minus 2, in [2, 16]
    assert default_num_workers("cpu", 64, 1) == 2
    assert default_num_workers("cuda", 96, 8) == 10 and default_num_workers("cuda", 16, 1) == 14
    assert default_num_workers("cuda", 8, 8) == 2 and default_num_workers("cuda", 256, 1) == 16
    # the writer is a thread where a device runs the model, inline where the CPU does
    assert use_writer_thread("auto", "cuda") and not use_writer_thread("auto", "cpu")
    assert use_writer_thread("thread", "cpu") and not use_writer_thread("inline", "cuda")
    assert pin_memory("cuda") and not pin_memory("cpu")
    # out of memory (retried smaller) vs a device fault (stops the job)
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"))
    assert not is_out_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_out_of_memory(ValueError("expected images of shape [N, 3, H, W]"))


def test_precision_recorded_is_what_the_engine_ran(tmp_path, vae_file, monkeypatch):
    """job.json / manifest.json record the dtype the model's inference engine computes in
    (not the one asked for) and how many batches it repeated in fp32."""
    import latentae.io

    real_load = latentae.io.load_vae

    def load(*a, **kw):  # an engine that computes in bf16 and falls back to fp32 on every call
        vae = real_load(*a, **kw)
        monkeypatch.setattr(vae.inference, "compute_dtype", lambda v: torch.bfloat16)
        plain = vae.encode

        def encode(x):
            vae.inference.retries += 1
            return plain(x)

        vae.encode = encode
        return vae

    monkeypatch.setattr(latentae.io, "load_vae", load)
    make_images(tmp_path / "data", 5)
    r = run_encode(vae_file[0], tmp_path / "data", tmp_path / "out", size=32, batch_size=2, shard_size=2)
    m = r.manifest
    assert m["job"]["precision"] == {"parameters": "fp32", "compute": "bfloat16"}
    assert m["precision"]["fp32_fallbacks"] == 3 and [p["fp32_fallbacks"] for p in m["parts"]] == [1, 1, 1]
    assert read_manifest(tmp_path / "out")["job"] == m["job"]


def test_cli_usage_errors_are_one_line_with_status_2(tmp_path, vae_file, capsys):
    main = load_tool("encode").main
    base = ["--vae", str(vae_file[0]), "--out", str(tmp_path / "out"), "--no-progress"]
    for argv, want in [
        (base + ["--data", str(tmp_path / "missing")], "error: data path not found: "),
        (base + ["--data", str(tmp_path), "--size", "0"], "error: size must be >= 1, got 0"),
        (["--vae", str(tmp_path / "nope.safetensors"), "--data", str(tmp_path), "--out", str(tmp_path / "o")],
         "error: VAE not found: "),
        (base + ["--data", str(tmp_path)], "error: no images found in "),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(want) and err.count("\n") == 1, err
