"""Training crops: native-scale and LDM-fraction crops, small images, config validation."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_data import same_batches, take

from latentae.config import ConfigError
from latentae.data import BadImage, DataConfig, build_train_loader, min_shorter_side, plan_crop, sample_rng, train_transform, val_transform
from latentae.data.transforms import PAD_VALUE
from latentae.recipe import load_config

CONFIGS = Path(__file__).parents[1] / "configs"
R = 16


def picture(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def levels(t: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> uint8 HWC, exactly (8-bit levels map linearly)."""
    return ((t + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def find_block(src: np.ndarray, block: np.ndarray) -> list[tuple[int, int]]:
    h, w = block.shape[:2]
    return [(x, y) for y in range(src.shape[0] - h + 1) for x in range(src.shape[1] - w + 1)
            if np.array_equal(src[y : y + h, x : x + w], block)]  # fmt: skip


def test_scale_one_copies_native_pixels():
    img = picture(40, 30)
    src = np.asarray(img)
    cfg = DataConfig(resolution=R, crop="scale", crop_range=(1.0, 1.0), small_images="skip", flip=False)
    spots = set()
    for i in range(12):
        out = levels(train_transform(img, cfg, sample_rng(0, 0, i)))
        found = find_block(src, out)
        assert len(found) == 1  # an exact block of the source: no resampling at all
        spots.add(found[0])
    assert len(spots) > 6  # and the position is random
    centred = levels(val_transform(img, cfg))
    assert find_block(src, centred) == [((40 - R) // 2, (30 - R) // 2)]


@pytest.mark.parametrize("crop,lo,hi", [("scale", 0.25, 1.0), ("scale", 0.5, 2.0), ("fraction", 0.5, 1.0)])
def test_crop_sides_follow_the_range(crop, lo, hi):
    cfg = DataConfig(resolution=R, crop=crop, crop_range=(lo, hi))
    w, h = 200, 120  # big enough for every side in range
    rng = random.Random(0)
    sides = []
    for _ in range(400):
        c = plan_crop(w, h, cfg, (rng.random(), rng.random(), rng.random()))
        x, y, cw, ch = c.box
        assert cw == ch and 0 <= x <= w - cw and 0 <= y <= h - ch and c.size == (R, R)
        sides.append(cw)
    want = (R / hi, R / lo) if crop == "scale" else (lo * h, hi * h)
    assert want[0] - 0.5 <= min(sides) < want[0] + 2 and want[1] - 2 < max(sides) <= want[1] + 0.5
    if crop == "scale":  # uniform in the scale R / side
        median = sorted(R / s for s in sides)[len(sides) // 2]
        assert abs(median - (lo + hi) / 2) < 0.1 * (hi - lo)


def test_no_upsampling_when_asked():
    """small_images=skip/pad never resample upwards; skip names the image, pad keeps native pixels."""
    rng = random.Random(1)
    for crop, rng_range in [("scale", (0.5, 1.0)), ("fraction", (0.3, 1.0)), ("resize", (0.5, 1.0))]:
        cfg = DataConfig(resolution=R, crop=crop, crop_range=rng_range, small_images="skip")
        need = min_shorter_side(cfg)
        for _ in range(200):
            w, h = rng.randint(need, 80), rng.randint(need, 80)
            c = plan_crop(w, h, cfg, (rng.random(), rng.random(), rng.random())[-(2 if crop == "resize" else 3) :])
            assert c.box[2] >= R and c.box[3] >= R  # every cut is at least the crop: a downscale or a copy
            if c.whole is not None:
                assert min(c.whole) == R and min(w, h) >= R
        with pytest.raises(BadImage, match=rf"image 20x{need - 1} is smaller than the {R}px crop .*small_images=skip"):
            plan_crop(20, need - 1, cfg, (0.5, 0.5, 0.5)[-(2 if crop == "resize" else 3) :], "x.jpg")

    img = picture(10, 30, seed=3)
    cfg = DataConfig(resolution=R, crop="scale", crop_range=(0.5, 1.0), small_images="pad", flip=False)
    out = levels(train_transform(img, cfg, sample_rng(0, 0, 0)))
    cols = [x for x in range(R) if not (out[:, x] == PAD_VALUE).all()]
    assert len(cols) == 10 and cols == list(range(cols[0], cols[0] + 10))  # the 10 native columns, the rest grey
    assert len(find_block(np.asarray(img), out[:, cols[0] : cols[0] + 10])) == 1
    up = DataConfig(resolution=R, crop="scale", crop_range=(0.5, 1.0), small_images="upscale")
    assert plan_crop(10, 30, up, (0.5, 0.5, 0.5)).box[2:] == (10, 10)  # the whole short side, resized up


def test_native_crops_resume_exactly_from_a_folder(tmp_path):
    root = tmp_path / "f"
    root.mkdir()
    for i in range(9):
        picture(30 + 7 * i, 40, seed=i).save(root / f"{i}.png")
    picture(12, 12, seed=99).save(root / "tiny.png")  # too small: skipped and named
    cfg = DataConfig(path=str(root), resolution=R, crop="scale", crop_range=(0.5, 1.0), small_images="skip", num_val=0,
                     num_workers=0)  # fmt: skip
    full = take(build_train_loader(cfg, 3, seed=2), 6)
    first = build_train_loader(cfg, 3, seed=2)
    head = take(first, 3)
    tail = take(build_train_loader(cfg, 3, seed=2, resume_states=[json.loads(json.dumps(first.state_dict()))]), 3)
    assert same_batches(head + tail, full)
    skipped = [s for b in full for s in b["skipped"]]
    assert skipped and all(n.endswith("tiny.png") and "small_images=skip" in r for n, r in skipped)


def test_crop_config_is_strict():
    with pytest.raises(ConfigError, match=r"crop: expected one of 'resize', 'scale', 'fraction', got 'scal'"):
        DataConfig(crop="scal")
    with pytest.raises(ConfigError, match=r"small_images: expected one of"):
        DataConfig(small_images="drop")
    for kw, msg in [
        (dict(crop_range=(1.0,)), r"crop_range must be \[low, high\]"),
        (dict(crop_range=(0.0, 1.0)), r"0 < low <= high"),
        (dict(crop_range=(1.0, 0.5)), r"0 < low <= high"),
        (dict(crop="fraction", crop_range=(0.5, 1.5)), r"fraction of the shorter side .* high <= 1"),
        (dict(crop="scale", crop_range=(1.5, 2.0), small_images="skip"), r"upsamples every crop"),
        (dict(crop="scale", resize_shorter=False), r"resize_shorter applies to data.crop=resize only"),
        (dict(shards_per_worker=0), r"shards_per_worker must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=msg):
            DataConfig(**kw)
    with pytest.raises(ConfigError, match=r"data.crop: expected one of .* got 'native'"):
        load_config(CONFIGS / "tiny-f8c4.yaml", ["data.crop=native"])
    cfg = load_config(CONFIGS / "tiny-f8c4.yaml", ["data.crop=scale", "data.crop_range=[0.5, 1]"])
    assert cfg.data.crop_range == (0.5, 1.0)


@pytest.mark.parametrize("name", ["sd-f8c4.yaml", "sd-f8c16.yaml"])
def test_sd_configs_train_on_native_scale_crops(name):
    data = load_config(CONFIGS / name, ["data.path=/x"]).data
    assert data.crop == "scale" and data.crop_range[1] == 1.0 and data.small_images != "upscale"
