"""Reading latents back (latentae.latents): round trip, seeded draws, workers and ranks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from latentae.latents import (
    LatentDataset,
    LatentTarWriter,
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
    # the stored order (shuffle=False), so that the lists line up sample by sample
    a = list(LatentDataset(d / "out", seed=3, normalize=False, shuffle=False))
    b = list(LatentDataset(d / "out", seed=3, normalize=False, shuffle=False))
    c = list(LatentDataset(d / "out", seed=4, normalize=False, shuffle=False))
    means = {it["key"]: it["latent"] for it in LatentDataset(d / "out", sample=False, normalize=False)}
    ds = LatentDataset(d / "out", seed=3, normalize=False, shuffle=False)
    ds.set_epoch(1)
    e1 = list(ds)
    eps = []
    from latentae.latents import iter_shard_latents

    stored = {s.key: s for t in sorted((d / "out").glob("part-*.tar")) for s in iter_shard_latents(t)}
    assert [x["key"] for x in a] == [x["key"] for x in c] == [x["key"] for x in e1]
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


@pytest.mark.parametrize("uneven", ["drop", "wrap"])
def test_ranks_get_equal_counts(encoded, uneven):
    """9 latents in 5 shards on 2 ranks: 4 + 4 (one left out) or 5 + 5 (one seen twice)."""
    d, _ = encoded
    parts = [[it["index"] for it in LatentDataset(d / "out", rank=r, world_size=2, uneven=uneven)] for r in range(2)]
    flat = [i for p in parts for i in p]
    if uneven == "drop":
        assert [len(p) for p in parts] == [4, 4] and len(set(flat)) == 8
    else:
        assert [len(p) for p in parts] == [5, 5] and set(flat) == set(range(N_IMAGES))


def test_flip_modes(encoded):
    d, vae = encoded
    both = list(LatentDataset(d / "out", sample=False, flip="both"))
    assert len(both) == 2 * N_IMAGES and sum(it["flipped"] for it in both) == N_IMAGES
    rnd = list(LatentDataset(d / "out", sample=False, flip="random", seed=1))
    assert len(rnd) == N_IMAGES and 0 < sum(it["flipped"] for it in rnd) < N_IMAGES
    # the choice is seeded by (seed, epoch, index): the same on every run, another one next epoch
    choice = {it["index"]: it["flipped"] for it in rnd}
    assert choice == {it["index"]: it["flipped"] for it in LatentDataset(d / "out", sample=False, flip="random", seed=1)}
    ds = LatentDataset(d / "out", sample=False, flip="random", seed=1)
    ds.set_epoch(1)
    assert choice != {it["index"]: it["flipped"] for it in ds}
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


# ----------------------------------------------------------------------------- order, ranks, resume


def write_latents(folder, sizes: list[int], flip: bool = False) -> list[str]:
    """Shards of tiny latents whose mean is filled with the sample's index (no VAE needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, idx = [], 0
    for s, n in enumerate(sizes):
        path = folder / f"lat-{s:03d}.tar"
        with open(path, "wb") as f:
            w = LatentTarWriter(f)
            for _ in range(n):
                mean = np.full((4, 2, 2), idx, np.float32)
                arrays = {"mean.npy": mean, "logvar.npy": np.full_like(mean, -4.0)}
                if flip:
                    arrays.update({"flip_mean.npy": -mean, "flip_logvar.npy": np.full_like(mean, -4.0)})
                w.add({"key": f"k{idx:04d}", "index": idx, "dtype": "fp32", "store": "dist"}, arrays)
                idx += 1
            w.close()
        paths.append(str(path))
    return paths


def epoch_of(loader) -> list[list[int]]:
    return [batch["index"] for batch in loader]


def test_order_functions():
    from latentae.latents.order import buffer_order, interleaved, rank_span, worker_slots

    out = buffer_order(1000, 64, seed=1)
    assert sorted(out.tolist()) == list(range(1000)) and out.tolist() != list(range(1000))
    assert np.array_equal(out, buffer_order(1000, 64, seed=1)) and not np.array_equal(out, buffer_order(1000, 64, seed=2))
    # a buffer of 64 moves an item forward by at most 63 places
    assert all(t >= item - 63 for t, item in enumerate(out.tolist()))
    stream, lanes = interleaved(10, 3)
    assert stream.tolist() == [0, 3, 6, 1, 4, 7, 2, 5, 8, 9] and lanes == (0, 3, 6)
    assert [rank_span(21, 2, r, "drop") for r in range(2)] == [(0, 10), (10, 10)]
    assert [rank_span(21, 2, r, "wrap") for r in range(2)] == [(0, 11), (11, 11)]
    for begin in (0, 5):
        slots = [list(worker_slots(23, begin, 4, 3, w)) for w in range(3)]
        assert sorted(t for s in slots for t in s) == list(range(begin, 23))
        assert slots[0][:5] == [begin, begin + 1, begin + 2, begin + 3, begin + 12]  # whole batches, round-robin


@pytest.mark.parametrize("sizes, world, uneven, per_rank", [
    ([10, 10, 10], 2, "drop", 15),  # 3 shards of 10 on 2 ranks: 15 + 15 (was 20 + 10)
    ([7, 10, 4], 2, "drop", 10),  # uneven shards: 21 -> 10 + 10, one left out
    ([7, 10, 4], 2, "wrap", 11),  # ... or 11 + 11, one seen twice
    ([7, 10, 4], 4, "drop", 5),  # 4 ranks x 2 workers = 8 readers of 3 shards
])
def test_every_rank_gets_the_same_count_with_workers(tmp_path, sizes, world, uneven, per_rank):
    paths = write_latents(tmp_path, sizes)
    total = sum(sizes)
    got = []
    for r in range(world):
        loader = latent_loader(paths, batch_size=4, num_workers=2, normalize=False, sample=False, rank=r,
                               world_size=world, uneven=uneven, buffer_size=8)
        batches = epoch_of(loader)
        assert len(batches) == len(loader) == -(-per_rank // 4)  # equal steps on every rank
        got.append([i for b in batches for i in b])
    assert [len(g) for g in got] == [per_rank] * world
    flat = [i for g in got for i in g]
    if uneven == "drop":
        assert len(set(flat)) == len(flat) == world * per_rank  # disjoint
    else:
        assert set(flat) == set(range(total)) and len(flat) - len(set(flat)) == world * per_rank - total


def test_shuffled_by_default_seeded_and_new_each_epoch(tmp_path):
    """Folder-per-class data in path order made every batch one class; now the shard order
    and a shuffle buffer mix it, the same way on every run with the same seed and epoch."""
    paths = write_latents(tmp_path, [25, 25, 25, 25])
    kw = dict(batch_size=5, normalize=False, sample=False)
    stored = list(range(100))
    a = latent_loader(paths, **kw, seed=1, buffer_size=20)
    e0 = [i for b in epoch_of(a) for i in b]
    e1 = [i for b in epoch_of(a) for i in b]  # the loader moved to epoch 1 by itself
    assert sorted(e0) == sorted(e1) == stored and e0 != stored and e0 != e1
    b = latent_loader(paths, **kw, seed=1, buffer_size=20)
    assert [i for x in epoch_of(b) for i in x] == e0  # same seed and epoch: same order
    b.set_epoch(1)
    assert [i for x in epoch_of(b) for i in x] == e1
    c = latent_loader(paths, **kw, seed=2, buffer_size=20)
    assert [i for x in epoch_of(c) for i in x] != e0
    assert [i for x in epoch_of(latent_loader(paths, **kw, shuffle=False)) for i in x] == stored
    # shards read side by side (lanes), then the buffer: the first batches are not one shard's ("class's")
    assert len({i // 25 for i in e0[:10]}) >= 3


def test_order_does_not_depend_on_the_number_of_workers(tmp_path):
    paths = write_latents(tmp_path, [9, 14, 5])
    runs = [epoch_of(latent_loader(paths, batch_size=3, num_workers=nw, normalize=False, sample=False,
                                   buffer_size=6, rank=1, world_size=2)) for nw in (0, 2, 3)]
    assert runs[0] == runs[1] == runs[2]


def test_resume_mid_epoch_gives_the_uninterrupted_batches(tmp_path):
    """A trainer saves loader.state_dict() with its checkpoint; a new process loads it and
    gets exactly the batches the uninterrupted run got (draws included), into the next epoch."""
    paths = write_latents(tmp_path, [10, 13, 7])
    kw = dict(batch_size=4, num_workers=2, normalize=False, seed=5, buffer_size=8, rank=0, world_size=2)

    def run(loader, n=None):
        out = []
        for batch in loader:
            out.append((batch["index"], batch["latent"]))
            if n is not None and len(out) == n:
                break
        return out

    full = latent_loader(paths, **kw)
    want = run(full) + run(full)  # two epochs (15 items each: 4 batches)
    first = latent_loader(paths, **kw)
    got = run(first, 3)
    state = first.state_dict()
    assert (state["epoch"], state["consumed"]) == (0, 12)
    resumed = latent_loader(paths, **kw)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    for epoch in range(resumed.epoch, 2):  # the README's training loop
        resumed.set_epoch(epoch)  # the resumed epoch keeps its position
        got += run(resumed)
    assert [i for i, _ in got] == [i for i, _ in want]
    for (_, x), (_, y) in zip(got, want):
        assert torch.equal(x, y)
    other = latent_loader(paths, **{**kw, "world_size": 3})
    with pytest.raises(ValueError, match="world_size: saved 2, now 3"):
        other.load_state_dict(state)


def test_memory_is_bounded_by_the_buffer(tmp_path):
    paths = write_latents(tmp_path, [40, 40, 40])
    ds = LatentDataset(paths, normalize=False, sample=False, buffer_size=10)
    assert sorted(it["index"] for it in ds) == list(range(120))
    assert 1 < ds.peak_held <= 11  # samples read ahead of their turn: those in the buffer
    ds = LatentDataset(paths, normalize=False, sample=False, shuffle=False)
    assert [it["index"] for it in ds] == list(range(120)) and ds.peak_held == 1


def test_flip_both_and_random_with_shuffling(tmp_path):
    paths = write_latents(tmp_path, [6, 6], flip=True)
    both = list(LatentDataset(paths, normalize=False, sample=False, flip="both", buffer_size=4))
    assert sorted((it["index"], it["flipped"]) for it in both) == [(i, f) for i in range(12) for f in (False, True)]
    for it in both:
        assert it["latent"][0, 0, 0] == (-1 if it["flipped"] else 1) * it["index"]


def test_shard_reader_long_names_and_corruption(tmp_path):
    """The loader's own tar reader: pax long names, and a clear error naming the file."""
    from latentae.latents import count_shard_latents, iter_shard_latents

    long_key = "class_" + "x" * 150 + "/img.v2"
    path = tmp_path / "s.tar"
    with open(path, "wb") as f:
        w = LatentTarWriter(f)
        for i, key in enumerate(["a", long_key, "b"]):
            w.add({"key": key, "index": i, "dtype": "fp16", "store": "mode"},
                  {"latent.npy": np.full((4, 2, 3), i, np.float16)})
        w.close()
    got = list(iter_shard_latents(path))
    assert [s.key for s in got] == ["a", long_key, "b"] and count_shard_latents(path) == 3
    assert torch.equal(got[1].mean, torch.full((4, 2, 3), 1.0))
    raw = path.read_bytes()
    npy = raw.index(b"\x93NUMPY")  # the first array's header
    path.write_bytes(raw[:npy + 20] + b"\xff" + raw[npy + 21:])
    with pytest.raises(LatentFormatError, match=r"s\.tar:a\.latent\.npy: not a readable \.npy array"):
        list(iter_shard_latents(path))
    header = raw.index(b"b.json")  # the last sample's first tar header
    path.write_bytes(raw[:header] + b"c" + raw[header + 1:])
    with pytest.raises(LatentFormatError, match=rf"s\.tar: not a readable tar at byte {header}: bad header checksum"):
        list(iter_shard_latents(path))
