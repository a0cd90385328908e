"""Latent statistics (latentae.latent_stats, tools/latent_stats.py) against direct NumPy computation."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from latentae.latent_stats import ChannelMoments, compute_latent_stats, write_diffusers_config
from latentae.latents import LatentDataset
from test_encode import load_tool, make_images, one_torch_thread, run_encode, save_tiny_vae  # noqa: F401


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    d = tmp_path_factory.mktemp("stats")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    vae_path, vae = save_tiny_vae(d / "vae.safetensors")
    make_images(d / "data", 6, size=lambda i: (32 + 8 * (i % 2), 32))
    run_encode(vae_path, d / "data", d / "out", preprocess="keep", shard_size=4, dtype="fp32", flip=True)
    torch.set_num_threads(n)
    return d, vae


def read_means_directly(folder: Path) -> list[np.ndarray]:
    """The stored means, parsed with tarfile + np.load only (independent of latentae.latents)."""
    out = []
    for tar in sorted(folder.glob("part-*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".mean.npy") and not m.name.endswith("flip_mean.npy"):
                    out.append(np.load(io.BytesIO(tf.extractfile(m).read())))
    return out


def direct_stats(latents: list[np.ndarray]) -> dict:
    flat = np.concatenate([z.reshape(z.shape[0], -1).astype(np.float64) for z in latents], axis=1)  # [C, N]
    return {"channel_mean": flat.mean(1), "channel_std": flat.std(1), "mean": flat.mean(), "std": flat.std()}


def test_mean_statistics_equal_numpy_on_all_latents(encoded):
    d, _ = encoded
    means = read_means_directly(d / "out")
    assert len(means) == 6 and {m.shape[-1] for m in means} == {8, 10}  # two latent sizes
    want = direct_stats(means)
    s = compute_latent_stats(d / "out", use="mean", batch=4)
    assert s.num_latents == 6 and s.use == "mean"
    np.testing.assert_allclose(s.channel_mean, want["channel_mean"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s.channel_std, want["channel_std"], rtol=1e-12)
    assert s.mean == pytest.approx(want["mean"], rel=1e-12, abs=1e-12)
    assert s.std == pytest.approx(want["std"], rel=1e-12)
    assert s.scaling_factor == pytest.approx(1 / want["std"], rel=1e-12)
    assert s.shift_factor == pytest.approx(want["mean"], rel=1e-12, abs=1e-12)
    assert s.rms == pytest.approx(np.sqrt(want["std"] ** 2 + want["mean"] ** 2), rel=1e-12)


def test_sample_statistics_equal_numpy_on_the_same_draws(encoded):
    d, _ = encoded
    draws = [it["latent"].numpy() for it in LatentDataset(d / "out", seed=7, normalize=False, flip="both")]
    want = direct_stats(draws)
    s = compute_latent_stats(d / "out", use="sample", seed=7, include_flip=True, batch=5)
    assert s.num_latents == 12
    np.testing.assert_allclose(s.channel_mean, want["channel_mean"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(s.channel_std, want["channel_std"], rtol=1e-10)
    assert s.std == pytest.approx(want["std"], rel=1e-10)
    # samples add the posterior variance: their spread exceeds that of the means
    assert s.std > compute_latent_stats(d / "out", use="mean").std


def test_channel_moments_are_stable_and_mergeable():
    rng = np.random.default_rng(0)
    x = rng.normal(1e6, 1e-2, size=(3, 10_000)).astype(np.float64)  # sum-of-squares would lose it all
    a, b = ChannelMoments(3), ChannelMoments(3)
    for chunk in np.array_split(x[:, :6000], 7, axis=1):
        a.update(chunk)
    b.update(x[:, 6000:])
    a.merge(b)
    np.testing.assert_allclose(a.mean, x.mean(1), rtol=1e-14)
    np.testing.assert_allclose(np.sqrt(a.m2 / a.count), x.std(1), rtol=1e-6)
    n, mean, m2 = a.overall()
    assert n == x.size and mean == pytest.approx(x.mean(), rel=1e-14)
    assert np.sqrt(m2 / n) == pytest.approx(x.std(), rel=1e-6)


def test_write_config_updates_only_the_factors(tmp_path, encoded):
    d, vae = encoded
    from latentae.io import load_vae, save_diffusers

    save_diffusers(vae, tmp_path / "vae")
    before = json.loads((tmp_path / "vae" / "config.json").read_text())
    main = load_tool("latent_stats").main
    assert main([str(d / "out"), "--use", "mean", "--write-config", str(tmp_path / "vae"),
                 "--json", str(tmp_path / "s.json"), "--no-progress"]) == 0
    after = json.loads((tmp_path / "vae" / "config.json").read_text())
    s = json.loads((tmp_path / "s.json").read_text())
    assert after["scaling_factor"] == pytest.approx(s["scaling_factor"]) and s["scaling_factor"] != 1.0
    assert after["shift_factor"] == pytest.approx(s["shift_factor"])
    assert list(after) == list(before)  # same keys, same order
    assert {k: v for k, v in after.items() if k not in ("scaling_factor", "shift_factor")} == {
        k: v for k, v in before.items() if k not in ("scaling_factor", "shift_factor")
    }
    # the exported VAE still loads, now with the new factors
    loaded = load_vae(tmp_path / "vae", fast=False)
    assert loaded.config.scaling_factor == pytest.approx(s["scaling_factor"])

    stats = compute_latent_stats(d / "out", use="mean")
    fields = write_diffusers_config(stats, tmp_path / "vae", mode="per-channel")
    cfg = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert cfg["latents_mean"] == pytest.approx(list(stats.channel_mean)) and cfg["scaling_factor"] == 1.0
    assert cfg["shift_factor"] is None and set(fields) == {"scaling_factor", "shift_factor", "latents_mean", "latents_std"}
    write_diffusers_config(stats, tmp_path / "vae", mode="no-shift")
    cfg = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert cfg["scaling_factor"] == pytest.approx(1 / stats.rms) and cfg["shift_factor"] is None


def test_write_config_refuses_other_vae_and_missing_folder(tmp_path, encoded):
    d, _ = encoded
    stats = compute_latent_stats(d / "out", use="mean")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        write_diffusers_config(stats, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"latent_channels": 16, "scaling_factor": 1.0}))
    with pytest.raises(ValueError, match="latent_channels is 16, but the latents have 4"):
        write_diffusers_config(stats, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["scaling_factor"] == 1.0
