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
    assert "rendered 3 images, 20 pictures" in dom  # 2 gallery cards x (original + crop + 2 VAEs x 4)
    assert len(re.findall(r'<tr data-vae="', dom)) == 2
    assert len(re.findall(r'<table class="health"', dom)) == 2
    assert len(re.findall(r'<tr data-paired="c16"', dom)) == 1  # paired differences to the baseline c4
    order = re.findall(r'<tr data-image="(\d+)"', dom)
    psnr = {r_["image"]: r_["psnr"] for r_ in s["per_image"] if r_["vae"] == "c4"}
    keys = ["astronaut", "coffee", "cat"]
    assert [keys[int(i)] for i in order] == sorted(keys, key=lambda k: -psnr[k])
    # The gallery follows the table's order.
    cards = [int(i) for i in re.findall(r'id="img-(\d+)"', dom)]
    assert cards == [int(i) for i in order if int(i) in (0, 1)]
    assert len(re.findall(r'<img src="data:image/png;base64,', dom)) == 20


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
