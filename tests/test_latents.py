"""Reading latents back (latentae.latents): round trip, seeded draws, workers and ranks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from latentae.latents import (
    LatentDataset,
    LatentFormatError,
    LatentNorm,
    escape_key,
    from_stored,
    latent_loader,
    to_stored,
    unescape_key,
)
from test_encode import make_images, one_torch_thread, run_encode, save_tiny_vae, to_input  # noqa: F401

N_IMAGES = 9


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """9 images encoded (fp32, mean+logvar, with flips) by a VAE with non-trivial factors."""
    d = tmp_path_factory.mktemp("latents")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    vae_path, vae = save_tiny_vae(d / "vae.safetensors", scaling_factor=0.7, shift_factor=0.2)
    make_images(d / "data", N_IMAGES, size=(32, 32))
    run_encode(vae_path, d / "data", d / "out", size=32, shard_size=2, dtype="fp32", flip=True)
    torch.set_num_threads(n)
    return d, vae


def test_round_trip_reproduces_direct_reconstruction(encoded):
    d, vae = encoded
    ds = LatentDataset(d / "out", sample=False)  # the means, normalised with the manifest's factors
    assert ds.norm == LatentNorm(scaling_factor=0.7, shift_factor=0.2)
    seen = 0
    for item in ds:
        z = ds.norm.denormalize(item["latent"])
        arr = np.asarray(Image.open(d / "data" / f"{item['key']}.png"))
        x = to_input(arr)
        with torch.no_grad():
            recon = vae.decode(z[None])[..., :32, :32]
            direct, post = vae(x, sample_posterior=False)
            # the normalised latent is what the model's own scale_latents gives
            torch.testing.assert_close(item["latent"], vae.scale_latents(post.mean)[0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(recon, direct, atol=1e-4, rtol=1e-4)
        seen += 1
    assert seen == N_IMAGES


def test_seeded_draws_are_reproducible_and_distributed_as_stored(encoded):
    d, _ = encoded
    a = list(LatentDataset(d / "out", seed=3, normalize=False))
    b = list(LatentDataset(d / "out", seed=3, normalize=False))
    c = list(LatentDataset(d / "out", seed=4, normalize=False))
    means = {it["key"]: it["latent"] for it in LatentDataset(d / "out", sample=False, normalize=False)}
    ds = LatentDataset(d / "out", seed=3, normalize=False)
    ds.set_epoch(1)
    e1 = list(ds)
    eps = []
    from latentae.latents import iter_shard_latents

    stored = {s.key: s for t in sorted((d / "out").glob("part-*.tar")) for s in iter_shard_latents(t)}
    for x, y, z, w in zip(a, b, c, e1):
        assert torch.equal(x["latent"], y["latent"])
        assert not torch.allclose(x["latent"], z["latent"]) and not torch.allclose(x["latent"], w["latent"])
        s = stored[x["key"]]
        eps.append(((x["latent"] - means[x["key"]]) / s.logvar.mul(0.5).exp()).flatten())
    eps = torch.cat(eps)
    assert abs(eps.mean()) < 0.15 and abs(eps.std() - 1) < 0.1  # 576 standard normal values


def test_loader_with_two_workers_yields_every_sample_once(encoded):
    d, _ = encoded
    ref = {it["key"]: it["latent"] for it in LatentDataset(d / "out", seed=5)}
    loader = latent_loader(d / "out", batch_size=2, num_workers=2, seed=5)
    got = {}
    for batch in loader:
        assert batch["latent"].shape[1:] == (4, 8, 8) and batch["latent"].shape[0] <= 2
        for k, z, meta in zip(batch["key"], batch["latent"], batch["meta"]):
            assert k not in got and meta["key"] == k
            got[k] = z
    assert got.keys() == ref.keys() and len(got) == N_IMAGES
    for k in ref:  # draws do not depend on which worker read the sample
        assert torch.equal(got[k], ref[k])


@pytest.mark.parametrize("world", [2, 7])  # 5 shards: by shard (2 ranks), by sample (7 ranks)
def test_ranks_split_disjointly(encoded, world):
    d, _ = encoded
    parts = [[it["index"] for it in LatentDataset(d / "out", rank=r, world_size=world)] for r in range(world)]
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(N_IMAGES)) and all(parts)


def test_flip_modes(encoded):
    d, vae = encoded
    both = list(LatentDataset(d / "out", sample=False, flip="both"))
    assert len(both) == 2 * N_IMAGES and sum(it["flipped"] for it in both) == N_IMAGES
    rnd = list(LatentDataset(d / "out", sample=False, flip="random", seed=1))
    assert len(rnd) == N_IMAGES and 0 < sum(it["flipped"] for it in rnd) < N_IMAGES
    it = next(x for x in both if x["flipped"])
    arr = np.asarray(Image.open(d / "data" / f"{it['key']}.png"))[:, ::-1]
    with torch.no_grad():
        want = vae.scale_latents(vae.encode(to_input(arr)).mean)[0]
    torch.testing.assert_close(it["latent"], want, atol=2e-5, rtol=1e-4)


def test_explicit_norm_and_shard_pattern(encoded):
    d, _ = encoded
    pattern = str(d / "out" / "part-*.tar")
    with pytest.raises(ValueError, match="needs the VAE factors"):
        LatentDataset(pattern)
    norm = LatentNorm(scaling_factor=2.0, shift_factor=-1.0)
    raw = {it["key"]: it["latent"] for it in LatentDataset(pattern, sample=False, normalize=False)}
    for it in LatentDataset(pattern, sample=False, norm=norm):
        torch.testing.assert_close(it["latent"], (raw[it["key"]] + 1.0) * 2.0)
        torch.testing.assert_close(norm.denormalize(it["latent"]), raw[it["key"]])
    pc = LatentNorm(scaling_factor=1.0, latents_mean=(0.1, 0.2, 0.3, 0.4), latents_std=(1, 2, 3, 4), per_channel=True)
    z = torch.randn(4, 8, 8)
    torch.testing.assert_close(pc.denormalize(pc.normalize(z)), z)
    torch.testing.assert_close(pc.normalize(z)[3], (z[3] - 0.4) / 4)


def test_bf16_and_key_escaping():
    z = torch.randn(4, 3, 5) * 10
    a = to_stored(z, "bf16")
    assert a.dtype == np.uint16
    assert torch.equal(from_stored(a, "bf16"), z.bfloat16().float())
    with pytest.raises(LatentFormatError, match="uint16"):
        from_stored(np.zeros(3, np.float32), "bf16")
    for key in ["a.b.c", "dir.v2/x%2E.y", "plain"]:
        e = escape_key(key)
        assert "." not in e and unescape_key(e) == key


def test_unfinished_folder_and_mixed_sizes_are_clear_errors(tmp_path, encoded):
    d, _ = encoded
    (tmp_path / "job.json").write_text(json.dumps({}))
    with pytest.raises(FileNotFoundError, match="has not finished"):
        LatentDataset(tmp_path)
    from latentae.latents import collate_latents

    with pytest.raises(ValueError, match="different sizes"):
        collate_latents([{"latent": torch.zeros(4, 8, 8)}, {"latent": torch.zeros(4, 8, 6)}])
    with pytest.raises(ValueError, match="needs latents encoded with --flip"):
        vae_path, _ = save_tiny_vae(tmp_path / "v.safetensors")
        make_images(tmp_path / "data", 1)
        run_encode(vae_path, tmp_path / "data", tmp_path / "out", size=32)
        LatentDataset(tmp_path / "out", flip="random")
