"""Hugging Face hub ids in load_vae (latentae.hub): a hand-made local cache, offline, no network."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

import latentae
from latentae.hub import HubError, download_command, looks_like_repo_id
from latentae.io import load_vae, save_diffusers
from latentae.model import build_vae
from conftest import randomize_, tiny_model_config

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def hub_env(tmp_path, monkeypatch, no_network):
    """An empty hub cache in tmp, offline; returns the cache folder."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # HF_HOME/hub, huggingface_hub's rule
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def tiny_vae(seed: int):
    torch.manual_seed(seed)
    return randomize_(build_vae(tiny_model_config(sample_size=32 + seed)), seed)


def put_in_cache(cache: Path, repo: str, commit: str, vae, subfolder: str = "", refs=("main",)) -> Path:
    """The cache layout huggingface_hub writes: models--org--name/{refs/<ref>, snapshots/<commit>/...}
    (real files instead of symlinks into blobs/, which the reader does not need)."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    save_diffusers(vae, snap / subfolder if subfolder else snap)
    if subfolder:  # a pipeline repo: model_index.json at the root, components in folders
        (snap / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"]}))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return snap


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_hub_id_from_the_cache_offline_with_revision(hub_env):
    main_vae, old_vae = tiny_vae(0), tiny_vae(1)
    put_in_cache(hub_env, "org/vae-ft", COMMIT_A, main_vae, refs=("main",))
    put_in_cache(hub_env, "org/vae-ft", COMMIT_B, old_vae, refs=("v1",))
    assert same_weights(load_vae("org/vae-ft", fast=False), main_vae)
    assert load_vae("org/vae-ft", fast=False).config.sample_size == 32
    # a branch/tag through refs/, and a commit hash directly
    assert same_weights(load_vae("org/vae-ft", revision="v1", fast=False), old_vae)
    assert same_weights(load_vae("org/vae-ft", revision=COMMIT_B, fast=False), old_vae)
    with pytest.raises(HubError, match=r"org/vae-ft.*revision 'v2'.*not in the local Hugging Face cache"):
        load_vae("org/vae-ft", revision="v2")


def test_pipeline_repo_vae_subfolder_found_automatically_and_by_name(hub_env):
    vae = tiny_vae(2)
    put_in_cache(hub_env, "org/some-pipeline", COMMIT_A, vae, subfolder="vae")
    assert same_weights(load_vae("org/some-pipeline", fast=False), vae)
    assert same_weights(load_vae("org/some-pipeline", subfolder="vae", fast=False), vae)
    with pytest.raises(HubError, match="unet/"):
        load_vae("org/some-pipeline", subfolder="unet")


def test_not_cached_offline_is_one_error_naming_repo_cache_and_command(hub_env):
    with pytest.raises(FileNotFoundError) as e:
        load_vae("stabilityai/sd-vae-ft-mse")
    msg = str(e.value)
    assert "\n" not in msg
    assert "stabilityai/sd-vae-ft-mse" in msg and str(hub_env) in msg and "HF_HUB_OFFLINE" in msg
    # the fetch command names exactly the files load_vae would read (root or vae/)
    assert download_command("stabilityai/sd-vae-ft-mse", None, None) in msg
    assert "download stabilityai/sd-vae-ft-mse --include config.json diffusion_pytorch_model.safetensors" in msg
    cmd = download_command("org/p", "vae", "v1")
    assert cmd.endswith("download org/p --revision v1 --include vae/config.json vae/diffusion_pytorch_model.safetensors")


def test_cached_hub_id_needs_no_network_even_when_online(hub_env, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")  # online; the no_network fixture fails any connection
    vae = tiny_vae(3)
    put_in_cache(hub_env, "org/vae-ft", COMMIT_A, vae)
    assert same_weights(load_vae("org/vae-ft", fast=False), vae)


def test_a_local_folder_named_like_a_hub_id_wins(hub_env, tmp_path, monkeypatch):
    cached, local = tiny_vae(4), tiny_vae(5)
    put_in_cache(hub_env, "org/vae-ft", COMMIT_A, cached)
    save_diffusers(local, tmp_path / "work" / "org" / "vae-ft")
    monkeypatch.chdir(tmp_path / "work")
    assert same_weights(load_vae("org/vae-ft", fast=False), local)
    with pytest.raises(ValueError, match="revision.*local path"):
        load_vae("org/vae-ft", revision="main")
    monkeypatch.chdir(tmp_path)  # no such local folder here: the cached one
    assert same_weights(load_vae("org/vae-ft", fast=False), cached)


def test_what_counts_as_a_hub_id():
    assert looks_like_repo_id("stabilityai/sd-vae-ft-mse") and looks_like_repo_id("madebyollin/sdxl-vae-fp16-fix")
    for name in ("vae", "./org/name", "/abs/path", "runs/demo/run", "~/x", "org/../x", "org/vae.safetensors", "C:/x"):
        assert not looks_like_repo_id(name), name
    with pytest.raises(FileNotFoundError, match="VAE not found: runs/demo/run$"):
        load_vae("runs/demo/run")


def test_swap_vae_at_the_top_level():
    from latentae.pipelines import swap_vae

    assert latentae.swap_vae is swap_vae
    assert "swap_vae" in latentae.__all__ and "swap_vae" in dir(latentae)
    with pytest.raises(AttributeError):
        latentae.no_such_name
