"""Strict configs: every error names what is wrong and where."""

import dataclasses
from pathlib import Path

import pytest

from latentae import load_config
from latentae.config import ConfigError
from latentae.model import ModelConfig, build_vae

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("name", ["sd-f8c4", "sd-f8c16", "tiny-f8c4", "tiny-f8c16"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.model.downsample_factor == 8
    assert cfg.model.latent_channels == (16 if name.endswith("c16") else 4)
    assert cfg.model.use_quant_conv == name.endswith("c4")


def test_sd_configs_match_published_architecture():
    m4 = load_config(CONFIGS / "sd-f8c4.yaml").model
    m16 = load_config(CONFIGS / "sd-f8c16.yaml").model
    for m in (m4, m16):
        assert m.block_out_channels == (128, 256, 512, 512) and m.layers_per_block == 2
    assert m4.use_quant_conv and not m16.use_quant_conv
    assert m16.shift_factor is not None


def test_tiny_config_builds_and_runs():
    import torch

    vae = build_vae(load_config(CONFIGS / "tiny-f8c16.yaml").model)
    rec, post = vae(torch.zeros(1, 3, 64, 64))
    assert rec.shape == (1, 3, 64, 64) and post.mean.shape == (1, 16, 8, 8)


def test_unknown_key_suggests_closest(tmp_path):
    p = write(tmp_path, "model:\n  latent_chanels: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "latent_chanels" in msg and "'model'" in msg and "did you mean 'latent_channels'" in msg


def test_unknown_section_suggests_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'modle' in the top level \(did you mean 'model'\?\)"):
        load_config(write(tmp_path, "modle:\n  latent_channels: 4\n"))


@pytest.mark.parametrize(
    "line, key, expected",
    [
        ("latent_channels: four", "model.latent_channels", "expected int, got 'four'"),
        ("latent_channels: 4.5", "model.latent_channels", "expected int, got 4.5"),
        ("mid_block_attention: 1", "model.mid_block_attention", "expected bool, got 1"),
        ("block_out_channels: 128", "model.block_out_channels", "expected list of int, got 128"),
        ("block_out_channels: [128, x]", "model.block_out_channels[1]", "expected int, got 'x'"),
        ("scaling_factor: fast", "model.scaling_factor", "expected float, got 'fast'"),
        ("shift_factor: [1]", "model.shift_factor", "expected float or null"),
    ],
)
def test_wrong_type_names_key_type_and_value(tmp_path, line, key, expected):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, f"model:\n  {line}\n"))
    assert key in str(e.value) and expected in str(e.value)


def test_section_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="model: expected a section"):
        load_config(write(tmp_path, "model: 3\n"))


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=str(missing)):
        load_config(missing)


def test_invalid_yaml_names_file(tmp_path):
    p = write(tmp_path, "model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(p)


def test_semantic_check_groups(tmp_path):
    with pytest.raises(ConfigError, match="divide by norm_num_groups=32, got 48"):
        load_config(write(tmp_path, "model:\n  block_out_channels: [48, 64]\n"))


def test_yaml_float_without_dot_is_accepted(tmp_path):
    cfg = load_config(write(tmp_path, "model:\n  scaling_factor: 1e-1\n"))
    assert cfg.model.scaling_factor == pytest.approx(0.1)


def test_overrides():
    cfg = load_config(CONFIGS / "tiny-f8c4.yaml", ["model.latent_channels=16", "model.shift_factor=0.5"])
    assert cfg.model.latent_channels == 16 and cfg.model.shift_factor == 0.5
    with pytest.raises(ConfigError, match="did you mean 'latent_channels'"):
        load_config(CONFIGS / "tiny-f8c4.yaml", ["model.latent_channel=16"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(CONFIGS / "tiny-f8c4.yaml", ["model.latent_channels"])
    with pytest.raises(ConfigError, match="expected int, got 'x'"):
        load_config(CONFIGS / "tiny-f8c4.yaml", ["model.latent_channels=x"])


def test_configs_are_frozen():
    cfg = ModelConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.latent_channels = 16  # type: ignore[misc]
