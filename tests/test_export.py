"""Export / import round trips (diffusers folder, LDM single file) and bad weight files."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import diffusers
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import randomize_, tiny_model_config
from latentae import __version__
from latentae.io import WeightsError, load_vae, save_diffusers, save_ldm, save_vae_safetensors, weights_hash
from latentae.model import build_vae

ROOT = Path(__file__).resolve().parents[1]
X = torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1


def ours_out(vae, x=X):
    with torch.no_grad():
        post = vae.encode(x)
        return post.mean, vae.decode(post.mean)


def diffusers_out(vae, x=X):
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
        return mean, vae.decode(mean).sample


def assert_same(a, b, atol=1e-5):
    for u, v in zip(a, b):
        assert (u - v).abs().max().item() <= atol


@pytest.fixture(params=[(4, True), (16, False)], ids=["c4", "c16"])
def vae(request):
    c, quant = request.param
    return randomize_(build_vae(tiny_model_config(latent_channels=c, quant=quant)), seed=c).eval()


def test_diffusers_export_loads_in_diffusers_and_back(vae, tmp_path):
    out = save_diffusers(vae, tmp_path / "d", scaling_factor=0.3, shift_factor=0.1)
    ref = diffusers.AutoencoderKL.from_pretrained(out).eval()
    assert ref.config.scaling_factor == 0.3 and ref.config.shift_factor == 0.1
    assert ref.config.sample_size == vae.config.sample_size  # set deliberately, not diffusers' default
    assert_same(ours_out(vae), diffusers_out(ref))
    back = load_vae(out)
    assert back.config.scaling_factor == 0.3 and back.config.shift_factor == 0.1
    assert_same(ours_out(vae), ours_out(back), atol=1e-5)


def test_diffusers_saved_by_diffusers_loads_in_ours(vae, tmp_path):
    ref = diffusers.AutoencoderKL.from_pretrained(save_diffusers(vae, tmp_path / "d")).eval()
    ref.save_pretrained(tmp_path / "by-diffusers")
    back = load_vae(tmp_path / "by-diffusers")
    assert back.config.latent_channels == vae.config.latent_channels
    assert_same(diffusers_out(ref), ours_out(back))


@pytest.mark.parametrize("prefix", ["", "first_stage_model."])
def test_ldm_export_loads_in_diffusers_single_file_and_back(vae, tmp_path, prefix):
    f = save_ldm(vae, tmp_path / "vae.safetensors", prefix=prefix)
    with safe_open(str(f), "pt") as fh:
        keys = set(fh.keys())
    assert prefix + "encoder.down.0.block.0.norm1.weight" in keys
    assert prefix + "encoder.mid.attn_1.q.weight" in keys
    assert prefix + "decoder.up.0.block.0.conv1.weight" in keys
    if vae.config.use_quant_conv:
        assert prefix + "quant_conv.weight" in keys
    assert not any("down_blocks" in k for k in keys)
    # diffusers needs the architecture for non-SD-sized models: give it our diffusers config.
    cfg_dir = save_diffusers(vae, tmp_path / "cfg")
    ref = diffusers.AutoencoderKL.from_single_file(str(f), config=str(cfg_dir)).eval()
    assert_same(ours_out(vae), diffusers_out(ref))
    assert_same(ours_out(vae), ours_out(load_vae(f)))


def test_ldm_file_without_metadata_infers_architecture(vae, tmp_path):
    f = save_ldm(vae, tmp_path / "vae.safetensors")
    with safe_open(str(f), "pt") as fh:
        sd = {k: fh.get_tensor(k) for k in fh.keys()}
    save_file(sd, str(tmp_path / "bare.safetensors"))  # what other tools write: no config
    with pytest.warns(UserWarning, match="inferred the architecture"):
        back = load_vae(tmp_path / "bare.safetensors")
    assert back.config.block_out_channels == vae.config.block_out_channels
    assert back.config.use_quant_conv == vae.config.use_quant_conv
    assert_same(ours_out(vae), ours_out(back))


def test_sd_size_ldm_loads_in_diffusers_single_file(tmp_path):
    from latentae import load_config

    vae = build_vae(load_config(ROOT / "configs/sd-f8c4.yaml").model).eval()
    f = save_ldm(vae, tmp_path / "sd.safetensors", prefix="first_stage_model.")
    ref = diffusers.AutoencoderKL.from_single_file(str(f), config=str(save_diffusers(vae, tmp_path / "cfg")))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert_same(ours_out(vae, x), diffusers_out(ref.eval(), x))


def test_metadata_records_config_and_version(vae, tmp_path):
    for f in (
        save_vae_safetensors(vae, tmp_path / "v.safetensors"),
        save_ldm(vae, tmp_path / "l.safetensors"),
        save_diffusers(vae, tmp_path / "d") / "diffusion_pytorch_model.safetensors",
    ):
        with safe_open(str(f), "pt") as fh:
            meta = fh.metadata()
        assert meta["latentae.version"] == __version__
        assert json.loads(meta["latentae.model_config"])["latent_channels"] == vae.config.latent_channels


def test_training_checkpoint_layout_is_read(vae, tmp_path):
    run = tmp_path / "run"
    save_vae_safetensors(vae, run / "checkpoints/step-000000010/vae.safetensors")
    ema = randomize_(build_vae(vae.config), seed=99).eval()
    save_vae_safetensors(ema, run / "checkpoints/step-000000020/vae_ema.safetensors")
    save_vae_safetensors(vae, run / "checkpoints/step-000000020/vae.safetensors")
    (run / "checkpoints/step-000000030.tmp").mkdir()  # an interrupted write is ignored
    assert weights_hash(load_vae(run)) == weights_hash(ema)  # newest, EMA preferred
    assert weights_hash(load_vae(run, ema=False)) == weights_hash(vae)
    assert weights_hash(load_vae(run / "checkpoints/step-000000010")) == weights_hash(vae)


def test_weights_only_pickle_is_read(vae, tmp_path):
    torch.save({"state_dict": {"first_stage_model." + k: v for k, v in vae.state_dict().items()}}, tmp_path / "v.ckpt")
    back = load_vae(tmp_path / "v.ckpt", config=vae.config)
    assert weights_hash(back) == weights_hash(vae)


def test_malicious_pickle_is_refused_not_executed(tmp_path):
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    with open(tmp_path / "evil.ckpt", "wb") as fh:
        pickle.dump({"state_dict": Evil()}, fh)
    with pytest.raises(WeightsError, match=r"evil\.ckpt: refused to load"):
        load_vae(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_truncated_safetensors_names_file(vae, tmp_path):
    f = save_vae_safetensors(vae, tmp_path / "v.safetensors")
    data = f.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"cut\.safetensors: not a readable safetensors file"):
        load_vae(tmp_path / "cut.safetensors")


def test_wrong_architecture_names_file_key_and_shapes(tmp_path):
    small = build_vae(tiny_model_config(latent_channels=4))
    f = save_ldm(small, tmp_path / "c4.safetensors")
    with pytest.raises(WeightsError, match=r"c4\.safetensors: shape mismatch for 'encoder\.conv_out\.weight'.*\(32, 32, 3, 3\)"):
        load_vae(f, config=tiny_model_config(latent_channels=16))
    with pytest.raises(WeightsError, match=r"missing keys"):
        load_vae(f, config=tiny_model_config(latent_channels=4, quant=False))


def test_diffusers_folder_errors(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d/config.json").write_text("{not json")
    (tmp_path / "d/diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(WeightsError, match="invalid JSON"):
        load_vae(tmp_path / "d")
    with pytest.raises(WeightsError, match="no training checkpoint"):
        load_vae(tmp_path)
    with pytest.raises(FileNotFoundError, match="VAE not found"):
        load_vae(tmp_path / "missing")


def test_export_cli_roundtrip_and_errors(vae, tmp_path):
    src = save_diffusers(vae, tmp_path / "src")
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "tools/export.py"), *map(str, a)], capture_output=True, text=True)
    r = run(src, "--out", tmp_path / "v.safetensors", "--format", "ldm", "--ldm-prefix", "first_stage_model.")
    assert r.returncode == 0, r.stderr
    r = run(tmp_path / "v.safetensors", "--out", tmp_path / "d2", "--format", "diffusers", "--scaling-factor", "0.5",
            "--latents-mean", ",".join(["0.1"] * vae.config.latent_channels))
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "d2/config.json").read_text())
    assert cfg["scaling_factor"] == 0.5 and cfg["latents_mean"] == [0.1] * vae.config.latent_channels
    assert_same(ours_out(vae), diffusers_out(diffusers.AutoencoderKL.from_pretrained(tmp_path / "d2").eval()))
    r = run(tmp_path / "nope", "--out", tmp_path / "x", "--format", "diffusers")
    assert r.returncode == 2 and "VAE not found" in r.stderr
    r = run(src, "--out", tmp_path / "x", "--format", "diffusers", "--latents-mean", "1,2")
    assert r.returncode == 2 and "latents_mean has 2 values" in r.stderr
