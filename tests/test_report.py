"""report.html: its picture helpers, and that it renders in headless Chromium (JS builds and sorts it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from conftest import randomize_, tiny_model_config
from latentae import report as rep
from latentae.compare import CompareConfig, run_compare
from latentae.model import build_vae

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def test_heatmap_scale_and_colours():
    err = np.array([[0.0, 0.05], [0.1, 0.5]])
    h = rep.heatmap(err, vmax=0.1)
    assert h.shape == (2, 2, 3) and h.dtype == np.uint8
    assert tuple(h[0, 0]) == (0, 0, 4)  # zero error: black
    assert tuple(h[1, 0]) == tuple(h[1, 1]) == (252, 255, 164)  # >= vmax: saturates
    assert h[0, 1].astype(int).sum() > h[0, 0].astype(int).sum()  # monotone brightness


def test_latent_grid_layout_and_per_channel_stretch():
    z = torch.zeros(5, 4, 6)
    z[0] = torch.linspace(0, 1, 24).view(4, 6)
    z[1] = torch.linspace(0, 1000, 24).view(4, 6)  # a 1000x larger channel still spans the full range
    g = rep.latent_grid(z)
    assert g.shape == (2 * 5 - 1, 3 * 7 - 1) and g.dtype == np.uint8  # 5 channels: 2 rows x 3 columns, 1 px gaps
    np.testing.assert_array_equal(g[:4, :6], g[:4, 7:13])
    assert g[:4, :6].min() == 0 and g[:4, :6].max() == 255
    assert rep.latent_grid(torch.randn(32, 2, 2)).shape == (4 * 3 - 1, 4 * 3 - 1)  # first 16 channels only


def test_worst_window_finds_the_planted_error():
    err = torch.rand(100, 80) * 0.01
    err[60:76, 20:36] = 1.0
    y, x, s = rep.worst_window(err, 16)
    assert s == 16 and abs(y - 60) <= 4 and abs(x - 20) <= 4
    assert rep.worst_window(torch.rand(8, 8), 64)[2] == 8  # never larger than the image


def test_thumbnails_are_jpeg_444_and_small():
    import base64
    import io

    from PIL import JpegImagePlugin

    photo = np.asarray(Image.fromarray(skdata.astronaut()).resize((256, 256), Image.LANCZOS))
    png, jpg = rep.image_data_uri(photo, "png"), rep.image_data_uri(photo, "jpeg", 90)
    assert png.startswith("data:image/png;base64,") and jpg.startswith("data:image/jpeg;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(jpg.split(",", 1)[1])))
    assert JpegImagePlugin.get_sampling(img) == 0  # 4:4:4: no chroma subsampling to blur colour artefacts
    err = np.abs(np.asarray(img.convert("RGB")).astype(int) - photo).mean()
    assert err < 2.5 and len(jpg) * 3 < len(png)  # close to the pixels at a third of the bytes or less
    webp = rep.image_data_uri(photo, "webp", 90)
    assert webp.startswith("data:image/webp;base64,") and len(webp) < len(png)
    with pytest.raises(ValueError, match="png, jpeg or webp"):
        rep.image_data_uri(photo, "gif")


def test_script_payload_cannot_close_the_script_tag():
    page = rep.render_html({"title": "t", "notices": ["</script><b>x"], "metrics": [], "vaes": [], "images": [],
                            "aggregate": {}, "latent_health": {}, "rfid": {}, "key": "</script>"})
    payload = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S).group(1)
    assert json.loads(payload)["key"] == "</script>"
    assert '<div class="notice">&lt;/script&gt;&lt;b&gt;x</div>' in page  # notices are escaped HTML text
    assert page.count("</script>") == 2  # only the two real closing tags


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    vaes = [
        ("c4", randomize_(build_vae(tiny_model_config(4, scaling_factor=0.5)), 1)),
        ("c16", randomize_(build_vae(tiny_model_config(16, quant=False, scaling_factor=1.0, shift_factor=0.1)), 2)),
    ]
    imgs = [
        ("astronaut", Image.fromarray(skdata.astronaut()).resize((64, 64))),
        ("coffee", Image.fromarray(skdata.coffee()).resize((72, 48))),
        ("cat", Image.fromarray(skdata.chelsea()).resize((60, 40))),
    ]
    s = run_compare(vaes, imgs, out, CompareConfig(lpips="off", fid="off", max_report_images=2))
    return out / "report.html", s


@pytest.fixture(scope="module")
def chromium() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no chromium binary on PATH (install it: apt-get install -y chromium)")


def _run_chromium(chromium: str, args: list[str], tmp_path) -> subprocess.CompletedProcess:
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           *args]
    return subprocess.run(cmd, capture_output=True, timeout=120)


def test_report_renders_and_sorts_in_chromium(chromium, report, tmp_path):
    path, s = report
    # Open it pre-sorted by column 2 (PSNR of the first VAE), descending: the JS must build and sort.
    r = _run_chromium(chromium, ["--dump-dom", f"file://{path}#sort=-2"], tmp_path)
    dom = r.stdout.decode("utf-8", "replace")
    assert r.returncode == 0 and "<html" in dom, r.stderr.decode()[-2000:]
    # 2 gallery cards x (original + crop + 2 VAEs x 4); plots: rate-distortion for PSNR and SSIM (LPIPS off),
    # distributions of PSNR and SSIM (MS-SSIM n/a), the paired PSNR differences, the spectrum.
    assert "rendered 3 images, 20 pictures, 6 plots" in dom
    agg = re.search(r'<table id="aggregate">.*?</table>', dom, re.S).group(0)
    assert len(re.findall(r'<tr data-vae="', agg)) == 2
    dif = re.search(r'<table id="diffusability">.*?</table>', dom, re.S).group(0)
    assert len(re.findall(r'<tr data-vae="', dif)) == 2 and "latent HF share" in dif and "eq-PSNR rot90 dB" in dif
    assert len(re.findall(r'<table class="health"', dom)) == 2
    assert len(re.findall(r'<tr data-paired="c16"', dom)) == 1  # paired differences to the baseline c4
    order = re.findall(r'<tr data-image="(\d+)"', dom)
    psnr = {r_["image"]: r_["psnr"] for r_ in s["per_image"] if r_["vae"] == "c4"}
    keys = ["astronaut", "coffee", "cat"]
    assert [keys[int(i)] for i in order] == sorted(keys, key=lambda k: -psnr[k])
    # The gallery follows the table's order.
    cards = [int(i) for i in re.findall(r'id="img-(\d+)"', dom)]
    assert cards == [int(i) for i in order if int(i) in (0, 1)]
    # Thumbnails and heat maps are JPEG; zoomed crops and latents lossless PNG.
    assert len(re.findall(r'<img src="data:image/jpeg;base64,', dom)) == 10
    assert len(re.findall(r'<img src="data:image/png;base64,', dom)) == 10


def test_report_screenshot_is_not_blank(chromium, report, tmp_path):
    path, _ = report
    shot = tmp_path / "shot.png"
    r = _run_chromium(chromium, ["--window-size=1200,1600", "--hide-scrollbars", f"--screenshot={shot}", f"file://{path}"], tmp_path)
    assert r.returncode == 0 and shot.is_file(), r.stderr.decode()[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert img.shape[:2] == (1600, 1200)
    background = np.array([250, 250, 250])
    drawn = (np.abs(img - background).sum(-1) > 30).mean()
    assert drawn > 0.05, f"only {drawn:.1%} of the screenshot differs from the page background"
    assert img.std() > 20


def _plot_boxes(dom: str) -> dict[str, tuple[int, int, int, int]]:
    """``{svg id: (left, top, width, height)}`` as the page's script measured them."""
    out = {}
    for tag in re.findall(r'<svg [^>]*class="plot"[^>]*>', dom):
        pid, box = re.search(r'id="([^"]+)"', tag).group(1), re.search(r'data-box="([^"]+)"', tag).group(1)
        out[pid] = tuple(int(v) for v in box.split(","))
    return out


def _near(img: np.ndarray, hex_colour: str, tol: int = 40) -> int:
    rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(img - rgb).sum(-1) < tol).sum())


def test_report_plots_render_in_chromium(chromium, report, tmp_path):
    """The SVG plots are in the DOM with their marks, and a screenshot shows them where the DOM says."""
    from latentae.svgplot import color

    path, s = report
    width = 1200
    r = _run_chromium(chromium, [f"--window-size={width},900", "--dump-dom", f"file://{path}"], tmp_path)
    dom = r.stdout.decode("utf-8", "replace")
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    boxes = _plot_boxes(dom)
    assert set(boxes) == {"rd-psnr", "rd-ssim", "dist-psnr", "dist-ssim", "paired-psnr", "spectrum"}
    rd = re.search(r'<svg [^>]*id="rd-psnr".*?</svg>', dom, re.S).group(0)
    assert [f for f in re.findall(r'<circle [^>]*fill="(#[0-9A-Fa-f]{6})"', rd)] == [color(0), color(1)]
    assert ">c4</text>" in rd and ">c16</text>" in rd  # points are labelled with the VAE names
    spec = re.search(r'<svg [^>]*id="spectrum".*?</svg>', dom, re.S).group(0)
    assert len(re.findall(r'<polyline class="series"', spec)) == 3  # two VAEs + the images at 1/4
    dist = re.search(r'<svg [^>]*id="dist-psnr".*?</svg>', dom, re.S).group(0)
    assert len(re.findall(r'<g class="box"', dist)) == 2 and len(re.findall(r"<title>", dist)) >= 2 * 3

    bottom = max(t + h for _, t, _, h in boxes.values())
    shot = tmp_path / "plots.png"
    r = _run_chromium(chromium, [f"--window-size={width},{bottom + 40}", "--hide-scrollbars", f"--screenshot={shot}", f"file://{path}"], tmp_path)
    assert r.returncode == 0 and shot.is_file(), r.stderr.decode()[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    for pid, (left, top, w, h) in boxes.items():
        assert w >= 200 and h >= 200, (pid, w, h)
        crop = img[top : top + h, left : left + w]
        ink = (np.abs(crop - 255).sum(-1) > 100).mean()  # on the plot's white background; grid lines are lighter
        assert 0.02 < ink < 0.6, f"{pid}: {ink:.1%} of its box is drawn"
        # Each VAE's marks are visible in its colour (the paired plot shows only the non-baseline VAE).
        for c in ([color(1)] if pid.startswith("paired") else [color(0), color(1)]):
            assert _near(crop, c) > 30, (pid, c)
