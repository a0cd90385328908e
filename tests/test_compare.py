"""tools/compare.py end to end on tiny VAEs, plus its statistics and latent-health pieces."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from conftest import randomize_, tiny_model_config
from latentae.compare import CompareConfig, load_image_tensor, latent_bpp, parse_vae_arg, run_compare, t_interval
from latentae.health import LatentStats
from latentae.io import load_vae, save_diffusers, save_vae_safetensors
from latentae.model import DiagonalGaussian, build_vae
from latentae.perceptual import MissingWeightsError

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("latentae_compare_tool", ROOT / "tools" / "compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two tiny VAEs on disk (f4c4 as a diffusers folder, f4c16 as our safetensors) and 4 image files (one corrupt)."""
    root = tmp_path_factory.mktemp("cmp")
    torch.manual_seed(0)
    a = randomize_(build_vae(tiny_model_config(4, scaling_factor=0.5)), 1)
    b = randomize_(build_vae(tiny_model_config(16, quant=False, scaling_factor=1.1, shift_factor=0.1)), 2)
    save_diffusers(a, root / "vae_a")
    save_vae_safetensors(b, root / "vae_b.safetensors")
    imgs = root / "imgs"
    imgs.mkdir()
    Image.fromarray(skdata.astronaut()).resize((64, 64), Image.LANCZOS).save(imgs / "astronaut.png")
    Image.fromarray(skdata.coffee()).resize((66, 44), Image.LANCZOS).save(imgs / "coffee.png")  # not a multiple of 4
    (imgs / "sub").mkdir()
    Image.fromarray(skdata.chelsea()).resize((64, 48), Image.LANCZOS).save(imgs / "sub" / "cat.jpg", quality=95)
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return root


def test_t_interval_matches_scipy():
    v = [10.0, 12.5, 11.0, 9.5, 14.0]
    got = t_interval(v)
    lo, hi = stats.t.interval(0.95, len(v) - 1, loc=np.mean(v), scale=stats.sem(v))
    assert got["n"] == 5 and got["mean"] == pytest.approx(np.mean(v))
    assert got["ci95"] == pytest.approx([lo, hi], rel=1e-12)
    one = t_interval([3.0, math.inf])  # a pixel-exact image has PSNR inf: left out, counted
    assert one["n"] == 1 and one["non_finite"] == 1 and one["mean"] == 3.0 and one["ci95"] == [None, None]
    assert t_interval([])["mean"] is None


def test_latent_rate_examples():
    assert latent_bpp((4, 8, 8), 64, 64, 16) == 1.0  # f8c4 at fp16
    assert latent_bpp((16, 8, 8), 64, 64, 16) == 4.0  # f8c16
    assert latent_bpp((16, 16, 16), 64, 64, 16) == 16.0  # f4c16


def test_parse_vae_arg():
    assert parse_vae_arg("sd=/x/y") == ("sd", "/x/y")
    assert parse_vae_arg("/runs/exp1/") == ("exp1", "/runs/exp1/")
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_vae_arg("name=")


def test_size_and_crop_geometry():
    img = Image.fromarray(skdata.coffee())  # 600x400
    x, done = load_image_tensor(img, CompareConfig(size=64), "c")
    assert x.shape == (1, 3, 64, 64) and done == "resized" and -1 <= x.min() and x.max() <= 1
    x, done = load_image_tensor(img, CompareConfig(crop=100), "c")
    assert x.shape == (1, 3, 100, 100) and done == "cropped"
    # The crop is the centre of the original pixels.
    arr = np.asarray(img)[150:250, 250:350]
    assert torch.equal(((x[0] + 1) * 127.5).round().byte().permute(1, 2, 0), torch.from_numpy(arr.copy()))
    from latentae.imageio import BadImage

    with pytest.raises(BadImage, match="smaller than --crop 500"):
        load_image_tensor(img, CompareConfig(crop=500), "c")
    with pytest.raises(ValueError, match="at most one of size"):
        CompareConfig(size=64, crop=64)


def test_latent_stats_against_direct_computation():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 3, 4, 5, generator=g) * torch.tensor([2.0, 0.5, 0.0]).view(1, 3, 1, 1)
    logvar = torch.randn(3, 3, 4, 5, generator=g) * 0.1 - 3
    logvar[:, 2] = 0.0  # channel 2: posterior == prior N(0, 1): a collapsed, inactive channel
    post = DiagonalGaussian(torch.cat([mean, logvar], 1))
    s = LatentStats(3)
    z = post.sample(g)
    s.update(DiagonalGaussian(torch.cat([mean[:1], logvar[:1]], 1)), z[:1])
    s.update(DiagonalGaussian(torch.cat([mean[1:], logvar[1:]], 1)), z[1:])
    r = s.result(active_kl=0.01, scaling_factor=0.5, shift_factor=0.2)
    zc = z.transpose(0, 1).reshape(3, -1).double()
    np.testing.assert_allclose(r["mean"], zc.mean(1).numpy(), rtol=1e-10)
    np.testing.assert_allclose(r["std"], zc.std(1, unbiased=False).numpy(), rtol=1e-8)
    kl = post.kl().double()
    np.testing.assert_allclose(r["kl_per_element"], kl.mean((0, 2, 3)).numpy(), rtol=1e-6)
    np.testing.assert_allclose(r["kl_per_image"], kl.sum((2, 3)).mean(0).numpy(), rtol=1e-6)
    assert r["active"] == [True, True, False] and r["active_channels"] == 2
    allz = z.double().flatten()
    assert r["suggested"]["shift_factor"] == pytest.approx(allz.mean().item())
    assert r["suggested"]["scaling_factor"] == pytest.approx(1 / allz.std(unbiased=False).item())
    assert r["suggested"]["scaling_factor_no_shift"] == pytest.approx(1 / allz.pow(2).mean().sqrt().item())
    assert r["configured"]["normalised_std"] == pytest.approx(0.5 * allz.std(unbiased=False).item())
    with pytest.raises(ValueError, match="zero images"):
        LatentStats(2).result()


def test_compare_tool_end_to_end(setup, tmp_path, capsys):
    out = tmp_path / "report"
    rc = _tool().main([
        "--vae", f"a={setup / 'vae_a'}", "--vae", f"b={setup / 'vae_b.safetensors'}",
        "--data", str(setup / "imgs"), "--out", str(out), "--offline", "--max-report-images", "2", "--device", "cpu",
    ])
    assert rc == 0
    printed = capsys.readouterr()
    assert "PSNR dB" in printed.out and "f4c16" in printed.out and "rFID RANDOM" in printed.out
    assert "Diffusability" in printed.out and "latent HF share" in printed.out and "eq-PSNR rot90 dB" in printed.out
    assert "NOT meaningful" in printed.err and "broken.jpg" in printed.err

    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 3 * 2 and {r["vae"] for r in rows} == {"a", "b"}
    assert all(r["hf_share"] and r["eq_down2_psnr"] and r["eq_down4_psnr"] and r["eq_rot90_psnr"] for r in rows)
    s = json.loads((out / "metrics.json").read_text())
    assert s["images_used"] == 3 and [x["image"] for x in s["skipped"]] == [str(setup / "imgs" / "broken.jpg")]
    assert s["vaes"][0]["bpp_nominal"] == 4.0 and s["vaes"][1]["bpp_nominal"] == 16.0  # f4c4 / f4c16 at 16 bits
    agg = s["aggregate"]["b"]
    assert agg["psnr"]["n"] == 3 and agg["psnr"]["ci95"][0] < agg["psnr"]["mean"] < agg["psnr"]["ci95"][1]
    assert agg["ms_ssim"]["n"] == 0 and agg["ms_ssim"]["mean"] is None  # all images < 176 px
    assert agg["lpips_vgg_random"]["n"] == 3 and "lpips_vgg" not in agg  # random backbones are named as such
    assert set(s["rfid"]) == {"a", "b"} and all(v >= 0 for v in s["rfid"].values()) and s["rfid_key"] == "rfid_random"
    assert s["paired_vs_baseline"]["baseline"] == "a" and s["paired_vs_baseline"]["b"]["psnr"]["n"] == 3
    h = s["latent_health"]
    assert h["a"]["channels"] == 4 and h["b"]["channels"] == 16 and h["b"]["configured"]["shift_factor"] == 0.1
    notices = " ".join(s["notices"])
    assert "not a multiple of 4" in notices and "MS-SSIM is n/a for 3 of 3" in notices and "RANDOM" in notices

    # Diffusability: per image in the rows, aggregated with intervals, the spectrum in the latent health.
    for n in ("a", "b"):
        spec = h[n]["spectrum"]
        assert s["aggregate"][n]["hf_share"]["mean"] == pytest.approx(spec["hf_share"])
        assert s["aggregate"][n]["hf_share_image"]["mean"] == pytest.approx(spec["hf_share_image"])
        assert 0 < spec["hf_share"] < 1 and len(spec["hf_share_per_channel"]) == h[n]["channels"]
        assert len(spec["freq"]) == len(spec["latent"]) == len(spec["image"])
        assert all(s["aggregate"][n][k]["n"] == 3 for k in ("eq_down2_psnr", "eq_down4_psnr", "eq_rot90_psnr"))
    img_share = {(r["vae"], r["image"]): r["hf_share_image"] for r in s["per_image"]}
    assert all(img_share[("a", k)] == img_share[("b", k)] for k in ("astronaut", "coffee", "sub/cat"))  # both f4
    assert "eq_rot90_psnr" in s["paired_vs_baseline"]["b"] and s["diffusability_note"]

    # The numbers are the reconstructions' honest scores: recompute PSNR / SSIM with skimage.
    row = next(r for r in s["per_image"] if r["vae"] == "b" and r["image"] == "sub/cat")
    vae = load_vae(setup / "vae_b.safetensors")
    x = torch.from_numpy(np.array(Image.open(setup / "imgs" / "sub" / "cat.jpg").convert("RGB"))).permute(2, 0, 1)
    x = (x.float() / 127.5 - 1)[None]
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).mean).clamp(-1, 1)
    a_np, r_np = x[0].double().numpy(), rec[0].double().numpy()
    assert row["psnr"] == pytest.approx(peak_signal_noise_ratio(a_np, r_np, data_range=2), abs=1e-4)
    assert row["ssim"] == pytest.approx(structural_similarity(
        a_np, r_np, data_range=2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=0), abs=1e-4)
    assert row["bpp"] == pytest.approx(16 * 12 * 16 * 16 / (48 * 64))
    # Equivariance by hand: 2x2 block means of the latent mean (12 x 16) and of the image; rotation by 90 degrees.
    with torch.no_grad():
        z = vae.encode(x).mean
        down = vae.decode(torch.nn.functional.avg_pool2d(z, 2)).clamp(-1, 1)
        rot = vae.decode(torch.rot90(z, 1, (2, 3))).clamp(-1, 1)
    target = torch.nn.functional.avg_pool2d(x, 2)[0].double().numpy()
    assert row["eq_down2_psnr"] == pytest.approx(peak_signal_noise_ratio(target, down[0].double().numpy(), data_range=2), abs=1e-4)
    rot_target = torch.rot90(x, 1, (2, 3))[0].double().numpy()
    assert row["eq_rot90_psnr"] == pytest.approx(peak_signal_noise_ratio(rot_target, rot[0].double().numpy(), data_range=2), abs=1e-4)

    html = (out / "report.html").read_text()
    assert html.count('"gallery":{') == 2  # --max-report-images 2
    # Self-contained: no external resources.
    for bad in ('src="http', "src='http", 'href="http', "<link", "@import", "url(http"):
        assert bad not in html


def test_size_option_resizes_and_enables_ms_ssim(setup, tmp_path):
    s = run_compare([("a", setup / "vae_a")], str(setup / "imgs"), tmp_path / "r",
                    CompareConfig(size=176, lpips="off", fid="off", max_report_images=1,
                                  equivariance_scales=(), equivariance_rotation=False))
    assert s["aggregate"]["a"]["ms_ssim"]["n"] == 3
    assert not any(k.startswith("eq_") for k in s["per_image"][0])  # equivariance turned off
    assert {m["key"] for m in s["metrics"] if m["group"] == "diffusability"} == {"hf_share", "hf_share_image"}
    assert all(r["width"] == r["height"] == 176 for r in s["per_image"])
    notices = " ".join(s["notices"])
    assert "3 of 3 images were resized (shorter side -> 176) and centre-cropped to 176x176" in notices
    assert "Gallery shows the first 1 of 3 images" in notices
    assert "not a multiple" not in notices and "MS-SSIM is n/a" not in notices


def test_lpips_auto_without_weights_skips_with_notice(setup, tmp_path):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "empty-hub"))
    try:
        cfg = CompareConfig(lpips="auto", fid="auto", max_report_images=0)
        imgs = [("astro", Image.fromarray(skdata.astronaut()).resize((32, 32)))]
        same = load_vae(setup / "vae_a")
        s = run_compare([("a", setup / "vae_a"), ("a_again", same)], imgs, tmp_path / "r", cfg)
        notices = "\n".join(s["notices"])
        assert "LPIPS-vgg skipped" in notices and "vgg16-397923af.pth" in notices and "--lpips random" in notices
        assert "rFID skipped" in notices and "inception_v3_google-0cc3c7bd.pth" in notices
        assert not any(m["key"].startswith("lpips") for m in s["metrics"]) and s["rfid"] == {}
        # The same weights twice: a paired difference of exactly zero.
        assert s["paired_vs_baseline"]["a_again"]["psnr"]["mean"] == 0.0
        with pytest.raises(MissingWeightsError, match="vgg16"):
            run_compare([("a", setup / "vae_a")], imgs, tmp_path / "r2", CompareConfig(lpips="pretrained", fid="off"))
    finally:
        torch.hub.set_dir(old)


def test_compare_rejects_bad_arguments(setup, tmp_path):
    with pytest.raises(ValueError, match="unique"):
        run_compare([("a", setup / "vae_a"), ("a", setup / "vae_a")], [], tmp_path, CompareConfig(lpips="off", fid="off"))
    with pytest.raises(FileNotFoundError, match="nope"):
        run_compare([("a", tmp_path / "nope")], [], tmp_path, CompareConfig(lpips="off", fid="off"))
    with pytest.raises(RuntimeError, match="no image could be measured"):
        run_compare([("a", setup / "vae_a")], str(setup / "imgs"), tmp_path / "r",
                    CompareConfig(lpips="off", fid="off", crop=4096))
    with pytest.raises(SystemExit):
        _tool().main(["--vae", "a=x", "--data", "d", "--out", "o", "--size", "8", "--crop", "8"])
    with pytest.raises(ValueError, match="equivariance_scales must be integers >= 2"):
        CompareConfig(equivariance_scales=(1,))
    with pytest.raises(ValueError, match="thumb_format"):
        CompareConfig(thumb_format="gif")


def test_tile_option_calls_tiled_codec_with_pixel_and_latent_sizes(setup, tmp_path, monkeypatch):
    """--tile wiring: image-pixel tile sizes for encode, latent-pixel sizes for decode."""
    import sys
    import types

    calls = []

    def tiled_encode(vae, images, *, tile, overlap):
        calls.append(("encode", tile, overlap))
        return vae.encode(images)

    def tiled_decode(vae, latents, *, tile, overlap):
        calls.append(("decode", tile, overlap))
        return vae.decode(latents)

    monkeypatch.setitem(sys.modules, "latentae.tiling", types.SimpleNamespace(tiled_encode=tiled_encode, tiled_decode=tiled_decode))
    imgs = [("astro", Image.fromarray(skdata.astronaut()).resize((48, 48)))]
    cfg = CompareConfig(tile=True, tile_size=32, tile_overlap=8, lpips="off", fid="off", max_report_images=0)
    plain = run_compare([("a", setup / "vae_a")], imgs, tmp_path / "plain", CompareConfig(lpips="off", fid="off"))
    tiled = run_compare([("a", setup / "vae_a")], imgs, tmp_path / "tiled", cfg)
    # f = 4; the equivariance decodes (1/2, 1/4, rot90) go through the same tiled decoder.
    assert calls == [("encode", 32, 8)] + [("decode", 8, 2)] * 4
    assert tiled["per_image"][0]["psnr"] == pytest.approx(plain["per_image"][0]["psnr"], abs=1e-6)


def test_tile_without_tiling_module_fails_at_start(setup, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "latentae.tiling", None)  # import raises ImportError
    with pytest.raises(RuntimeError, match="needs latentae.tiling"):
        run_compare([("a", setup / "vae_a")], [], tmp_path, CompareConfig(tile=True, lpips="off", fid="off"))


def test_real_tiling_close_to_plain(setup, tmp_path):
    pytest.importorskip("latentae.tiling", reason="latentae.tiling (tiled encode/decode) not written yet")
    imgs = [("astro", Image.fromarray(skdata.astronaut()).resize((96, 96)))]
    base = dict(lpips="off", fid="off", max_report_images=0)
    plain = run_compare([("a", setup / "vae_a")], imgs, tmp_path / "p", CompareConfig(**base))
    tiled = run_compare([("a", setup / "vae_a")], imgs, tmp_path / "t", CompareConfig(tile=True, tile_size=64, tile_overlap=16, **base))
    # Tiling changes the reconstruction slightly (GroupNorm statistics, seams): scores stay close.
    assert tiled["per_image"][0]["psnr"] == pytest.approx(plain["per_image"][0]["psnr"], abs=1.0)


def test_equivariance_na_when_the_latent_is_smaller_than_the_scale(setup, tmp_path):
    imgs = [("tiny", Image.fromarray(skdata.astronaut()).resize((12, 12))), ("ok", Image.fromarray(skdata.coffee()).resize((24, 16)))]
    s = run_compare([("a", setup / "vae_a"), ("b", setup / "vae_b.safetensors")], imgs, tmp_path / "r",
                    CompareConfig(lpips="off", fid="off", max_report_images=0))
    rows = {(r["vae"], r["image"]): r for r in s["per_image"]}
    assert rows[("a", "tiny")]["eq_down4_psnr"] is None and math.isfinite(rows[("a", "tiny")]["eq_down2_psnr"])  # 3x3 latent
    assert math.isfinite(rows[("b", "ok")]["eq_down4_psnr"])  # 6x4 latent
    assert "Equivariance PSNR at 1/4 scale is n/a for 1 of 2 images" in " ".join(s["notices"])
    assert s["aggregate"]["a"]["eq_down4_psnr"]["n"] == 1
