"""Faults while encoding (latentae.encode): injected into the model's call and the writer.

Only a sample's own problems are skipped; a device error (sticky or transient), a broken
VAE or a failing disk stops the job, discards what is open, writes no manifest, and a plain
re-run then encodes exactly what is missing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import latentae.io
from latentae.encode import EncodeFault, InputShardError
from latentae.latents import MANIFEST, read_manifest
from test_encode import (  # noqa: F401
    leftovers,
    load_tool,
    make_images,
    one_torch_thread,
    read_all,
    run_encode,
    save_tiny_vae,
    vae_file,
    write_input_shards,
)

N = 24  # images of 32x32; shard_size 4 -> 6 parts; batch_size 2 -> 2 model calls per part
KW = dict(size=32, shard_size=4, batch_size=2, dtype="fp32")


def inject(monkeypatch, fault):
    """Every VAE loaded from now on calls ``fault(x, encode)`` instead of ``encode(x)``;
    returns the list of batch sizes the model was called with."""
    real_load = latentae.io.load_vae
    calls: list[int] = []

    def load(*a, **kw):
        vae = real_load(*a, **kw)
        plain = vae.encode

        def encode(x):
            calls.append(x.shape[0])
            return fault(x, plain, len(calls))

        vae.encode = encode
        return vae

    monkeypatch.setattr(latentae.io, "load_vae", load)
    return calls


@pytest.fixture
def data(tmp_path):
    make_images(tmp_path / "data", N, size=(32, 32))
    return tmp_path / "data"


@pytest.fixture
def reference(tmp_path_factory, vae_file, data):
    """The latents of a run without faults, by key."""
    out = tmp_path_factory.mktemp("ref") / "out"
    run_encode(vae_file[0], data, out, **KW)
    return {s.key: s for s in read_all(out)}


def parts_done(out) -> int:
    return len(list(out.glob("part-??????.json")))


def assert_clean_and_unfinished(out) -> None:
    assert not (out / MANIFEST).exists()
    assert not leftovers(out), leftovers(out)
    done = {p.stem for p in out.glob("part-??????.json")}
    assert {t.name[:11] for t in out.glob("part-*.tar")} <= done  # no tar of an unfinished part


def assert_exactly_once(out, reference) -> None:
    samples = read_all(out)
    assert sorted(s.key for s in samples) == sorted(reference)  # every input once
    for s in samples:
        torch.testing.assert_close(s.mean, reference[s.key].mean, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("writer", ["inline", "thread"])
def test_sticky_device_fault_stops_the_job_and_rerun_encodes_the_rest(tmp_path, vae_file, data, reference,
                                                                        monkeypatch, writer):
    """A CUDA error that poisons the context: every call from the 5th on fails. The old
    code skipped every remaining input and published a manifest (16 of 24 lost)."""

    def sticky(x, encode, n):
        if n >= 5:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return encode(x)

    calls = inject(monkeypatch, sticky)
    out = tmp_path / "out"
    with pytest.raises(EncodeFault, match=r"part-000002: the VAE failed .*illegal memory access.*Re-run") as e:
        run_encode(vae_file[0], data, out, writer=writer, **KW)
    assert len(calls) == 5  # stopped at the first failure: no per-image retries of a device fault
    assert "part-000002" in str(e.value).split("Stopped:")[1]  # named among the discarded parts
    assert_clean_and_unfinished(out)
    done = parts_done(out)
    # calls 1-4 finished parts 0 and 1; a writer thread may not have published the last one yet
    assert done == 2 if writer == "inline" else 1 <= done <= 2

    monkeypatch.undo()
    r = run_encode(vae_file[0], data, out, writer=writer, **KW)
    assert (r.parts_done_before, r.parts_written) == (done, 6 - done)
    assert read_manifest(out)["num_encoded"] == N
    assert_exactly_once(out, reference)


def test_transient_fault_stops_the_job_through_the_cli(tmp_path, vae_file, data, reference, monkeypatch, capsys):
    """An error that goes away by itself is still not a sample's fault: the CLI stops with
    exit status 1 and a message naming the part; the same command then finishes the job."""

    def transient(x, encode, n):
        if n == 3:
            raise RuntimeError("CUDA error: unspecified launch failure")
        return encode(x)

    inject(monkeypatch, transient)
    out = tmp_path / "out"
    argv = ["--vae", str(vae_file[0]), "--data", str(data), "--out", str(out), "--size", "32", "--shard-size", "4",
            "--batch-size", "2", "--dtype", "fp32", "--num-workers", "0", "--no-progress"]
    main = load_tool("encode").main
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: part-000001: the VAE failed") and "unspecified launch failure" in err
    assert "1 of 6 parts are done" in err
    assert_clean_and_unfinished(out)
    assert main(argv) == 0  # the fault is gone: same command
    assert "1 of 6 parts were already done" in capsys.readouterr().out
    assert_exactly_once(out, reference)


def test_out_of_memory_on_a_batch_retries_it_smaller(tmp_path, vae_file, data, reference, monkeypatch):
    def oom_once(x, encode, n):
        if n == 1 and x.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return encode(x)

    calls = inject(monkeypatch, oom_once)
    r = run_encode(vae_file[0], data, tmp_path / "out", **{**KW, "batch_size": 4})
    assert r.num_encoded == N and r.num_skipped == 0
    assert calls[:3] == [4, 2, 2]  # the batch in halves
    assert max(calls[3:]) == 2  # and later batches of that size start at the size that fitted
    assert_exactly_once(tmp_path / "out", reference)


def test_an_image_too_large_alone_is_skipped_with_that_reason(tmp_path, vae_file, data, monkeypatch):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(data / "img0005.png")  # the "huge" one

    def oom_on_black(x, encode, n):
        if (x.flatten(1) == -1).all(1).any():
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return encode(x)

    inject(monkeypatch, oom_on_black)
    run_encode(vae_file[0], data, tmp_path / "out", flip=True, **KW)
    m = read_manifest(tmp_path / "out")
    assert (m["num_encoded"], m["num_skipped"]) == (N - 1, 1)
    assert m["skipped"][0]["key"] == "img0005"
    assert m["skipped"][0]["reason"].startswith("does not fit in memory even alone (OutOfMemoryError: CUDA out of")


def test_a_vae_that_gives_nan_for_everything_is_a_fault(tmp_path, vae_file, data, monkeypatch):
    """A non-finite latent is skipped as the sample's problem; a run of them is the VAE's."""

    def nan(x, encode, n):
        post = encode(x)
        post.mean.fill_(float("nan"))
        return post

    inject(monkeypatch, nan)
    with pytest.raises(EncodeFault, match="non-finite latents for 16 inputs in a row"):
        run_encode(vae_file[0], data, tmp_path / "out", **KW)
    assert_clean_and_unfinished(tmp_path / "out")
    # the parts published with the run's inputs skipped as non-finite are removed again: nothing was the inputs' fault
    assert parts_done(tmp_path / "out") == 0
    monkeypatch.undo()
    assert run_encode(vae_file[0], data, tmp_path / "out", **KW).num_encoded == N


def test_a_wrong_setup_error_stops_at_once(tmp_path, vae_file, data, monkeypatch):
    """Any unexpected error from the model (here a dtype mismatch) stops the job at its first call."""

    def wrong(x, encode, n):
        raise RuntimeError("Input type (c10::BFloat16) and bias type (float) should be the same")

    calls = inject(monkeypatch, wrong)
    with pytest.raises(EncodeFault, match=r"part-000000: the VAE failed on a batch of 2 images of 32x32"):
        run_encode(vae_file[0], data, tmp_path / "out", **KW)
    assert len(calls) == 1 and parts_done(tmp_path / "out") == 0
    assert_clean_and_unfinished(tmp_path / "out")


def test_writer_thread_error_stops_the_job(tmp_path, vae_file, data, reference, monkeypatch):
    """A full disk on the writer thread reaches the loop, which stops and discards open parts."""
    from latentae.latents.format import LatentTarWriter

    real_add, n = LatentTarWriter.add, [0]

    def add(self, meta, arrays):
        n[0] += 1
        if n[0] == 11:
            raise OSError(28, "No space left on device")
        return real_add(self, meta, arrays)

    monkeypatch.setattr(LatentTarWriter, "add", add)
    out = tmp_path / "out"
    with pytest.raises(EncodeFault, match=r"writing latents failed \(OSError: \[Errno 28\] No space left"):
        run_encode(vae_file[0], data, out, writer="thread", **KW)
    assert_clean_and_unfinished(out)
    assert parts_done(out) == 2  # 10 latents written: parts 0 and 1 published before the failure
    monkeypatch.undo()
    r = run_encode(vae_file[0], data, out, **KW)
    assert r.parts_written == 4
    assert_exactly_once(out, reference)


def test_an_input_shard_cut_short_is_left_to_a_rerun(tmp_path, vae_file):
    """A shard that breaks off (or whose pipe: command fails) may be a transient network
    error: its part is not marked done, the other parts are, and the job says so. If the
    shard is broken for good, --partial-shards keep keeps what was read and lists the error."""
    urls = write_input_shards(tmp_path / "in", 3, 4)
    raw = open(urls[1], "rb").read()
    open(urls[1], "wb").write(raw[: len(raw) * 2 // 3])
    pattern = str(tmp_path / "in" / "in-{000..002}.tar")
    out = tmp_path / "out"
    with pytest.raises(InputShardError, match=r"1 input shards could not be read .*\n  part-000001: .*in-001.tar"):
        run_encode(vae_file[0], pattern, out, size=32, shard_size=4)
    assert (out / "part-000000.json").exists() and (out / "part-000002.json").exists()
    assert_clean_and_unfinished(out)
    r = run_encode(vae_file[0], pattern, out, size=32, shard_size=4, partial_shards="keep")
    assert r.parts_written == 1
    m = read_manifest(out)
    assert m["input_errors"][0]["part"] == "part-000001" and "in-001.tar" in m["input_errors"][0]["error"]
    assert 0 < m["parts"][1]["num_encoded"] < 4 and m["num_encoded"] == 8 + m["parts"][1]["num_encoded"]


def test_sizes_a_vae_refuses_are_the_samples_problem(tmp_path):
    """A VAE configured not to pad (odd_size='error') gets only the sizes it takes, in 'keep'
    mode; the others are skipped with the reason. In 'resize' mode a --size it cannot take
    is a usage error before anything runs."""
    vae_path, _ = save_tiny_vae(tmp_path / "strict.safetensors", odd_size="error")
    make_images(tmp_path / "data", 2, size=(32, 24))
    Image.fromarray(np.zeros((30, 32, 3), np.uint8)).save(tmp_path / "data" / "odd.png")
    run_encode(vae_path, tmp_path / "data", tmp_path / "out", preprocess="keep")
    m = read_manifest(tmp_path / "out")
    assert m["num_encoded"] == 2 and m["skipped"][0]["key"] == "odd"
    assert "size 32x30 is not a multiple of 4" in m["skipped"][0]["reason"]
    with pytest.raises(ValueError, match="--size 30 is not a multiple of the VAE's downsampling factor 4"):
        run_encode(vae_path, tmp_path / "data", tmp_path / "out2", size=30)
