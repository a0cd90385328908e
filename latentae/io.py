"""Reading and writing VAE weights: our safetensors, diffusers folders, LDM single files.

Formats
-------
* latentae safetensors  (``vae.safetensors`` in a training checkpoint): diffusers key
  names, fp32, the ModelConfig as JSON in the safetensors metadata.
* diffusers folder: ``config.json`` + ``diffusion_pytorch_model.safetensors``, loadable by
  ``diffusers.AutoencoderKL.from_pretrained``.
* LDM single file: one ``.safetensors`` with the original CompVis key names
  (``encoder.down.0.block.0.norm1.weight`` ...): without a prefix it is the standalone VAE
  file ComfyUI / A1111 load and ``AutoencoderKL.from_single_file`` reads; under
  ``first_stage_model.`` only as part of a full checkpoint (read either way).
* ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin`` pickles: read with ``torch.load(weights_only=True)``
  only. A pickle that needs arbitrary code to unpickle is refused, never executed.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from latentae.config import ConfigError, from_dict, to_dict
from latentae.model import AutoencoderKL, ModelConfig

from latentae import __version__

CONFIG_KEY = "latentae.model_config"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit the architecture; names the file."""


# --------------------------------------------------------------------------- key maps
# diffusers name fragments <-> CompVis (LDM) fragments. The decoder's up blocks are
# numbered in reverse in LDM (up.0 is the highest resolution), hence the index flip.

_RESNET = [("conv_shortcut", "nin_shortcut")]
_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def diffusers_to_ldm(sd: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        n = k
        n = re.sub(r"^(encoder)\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"\1.down.\2.block.\3.", n)
        n = re.sub(r"^(encoder)\.down_blocks\.(\d+)\.downsamplers\.0\.", r"\1.down.\2.downsample.", n)
        n = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
            lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.block.{m[2]}.",
            n,
        )
        n = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.",
            n,
        )
        n = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", n)
        if ".mid_block.attentions.0." in n:
            n = n.replace(".mid_block.attentions.0.", ".mid.attn_1.")
            for a, b in _ATTN:
                n = n.replace(f".attn_1.{a}.", f".attn_1.{b}.")
            if v.ndim == 2:  # LDM's attention uses 1x1 convs where diffusers uses linears
                v = v[:, :, None, None]
        n = n.replace(".conv_norm_out.", ".norm_out.")
        for a, b in _RESNET:
            n = n.replace(f".{a}.", f".{b}.")
        out[n] = v
    return out


def ldm_to_diffusers(sd: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        n = k
        n = re.sub(r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2.", n)
        n = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", n)
        n = re.sub(
            r"^decoder\.up\.(\d+)\.block\.(\d+)\.",
            lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.resnets.{m[2]}.",
            n,
        )
        n = re.sub(
            r"^decoder\.up\.(\d+)\.upsample\.",
            lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.upsamplers.0.",
            n,
        )
        n = re.sub(r"\.mid\.block_(\d+)\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}.", n)
        if ".mid.attn_1." in n:
            n = n.replace(".mid.attn_1.", ".mid_block.attentions.0.")
            for a, b in _ATTN:
                n = n.replace(f".attentions.0.{b}.", f".attentions.0.{a}.")
            if v.ndim == 4:
                v = v[:, :, 0, 0]
        n = n.replace(".norm_out.", ".conv_norm_out.")
        n = n.replace(".nin_shortcut.", ".conv_shortcut.")
        out[n] = v
    return out


# --------------------------------------------------------------------------- helpers


def _state_dict(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in vae.state_dict().items()}


def _metadata(cfg: ModelConfig) -> dict[str, str]:
    return {CONFIG_KEY: json.dumps(to_dict(cfg)), "latentae.version": __version__, "format": "pt"}


def weights_hash(vae: AutoencoderKL) -> str:
    """sha256 of the fp32 weights in key order: the identity of a VAE (for manifests)."""
    h = hashlib.sha256()
    for k, v in sorted(_state_dict(vae).items()):
        h.update(k.encode())
        h.update(v.numpy().tobytes())
    return h.hexdigest()


def with_factors(cfg: ModelConfig, **factors: Any) -> ModelConfig:
    """A copy of ``cfg`` with scaling/shift factors (or latents mean/std) replaced; None = keep."""
    changes = {k: v for k, v in factors.items() if v is not None}
    if not changes:
        return cfg
    data = to_dict(cfg)
    data.update({k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in changes.items()})
    return from_dict(ModelConfig, data, "model")


def diffusers_config(cfg: ModelConfig) -> dict[str, Any]:
    n = len(cfg.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.30.0",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "act_fn": "silu",
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_num_groups,
        "sample_size": cfg.sample_size,
        "scaling_factor": cfg.scaling_factor,
        "shift_factor": cfg.shift_factor,
        "latents_mean": list(cfg.latents_mean) if cfg.latents_mean is not None else None,
        "latents_std": list(cfg.latents_std) if cfg.latents_std is not None else None,
        "force_upcast": True,
        "use_quant_conv": cfg.use_quant_conv,
        "use_post_quant_conv": cfg.use_post_quant_conv,
        "mid_block_add_attention": cfg.mid_block_attention,
    }


def config_from_diffusers(d: dict[str, Any], where: str) -> ModelConfig:
    if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise WeightsError(f"{where}: _class_name is {d.get('_class_name')!r}, expected 'AutoencoderKL'")
    for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        bad = [t for t in d.get(key, [want]) if t != want]
        if bad:
            raise WeightsError(f"{where}: {key} contains {bad[0]!r}; only {want!r} is supported")
    if d.get("act_fn", "silu") != "silu":
        raise WeightsError(f"{where}: act_fn {d['act_fn']!r} is not supported (expected 'silu')")
    raw = {
        "latent_channels": d.get("latent_channels", 4),
        "block_out_channels": d.get("block_out_channels", [64]),
        "layers_per_block": d.get("layers_per_block", 1),
        "norm_num_groups": d.get("norm_num_groups", 32),
        "mid_block_attention": d.get("mid_block_add_attention", True),
        "use_quant_conv": d.get("use_quant_conv", True),
        "use_post_quant_conv": d.get("use_post_quant_conv", True),
        "in_channels": d.get("in_channels", 3),
        "out_channels": d.get("out_channels", 3),
        "sample_size": d.get("sample_size", 32),
        "scaling_factor": d.get("scaling_factor", 0.18215),
        "shift_factor": d.get("shift_factor"),
        "latents_mean": d.get("latents_mean"),
        "latents_std": d.get("latents_std"),
    }
    if isinstance(raw["sample_size"], (list, tuple)):
        raw["sample_size"] = int(raw["sample_size"][0])
    try:
        return from_dict(ModelConfig, raw, "model")
    except ConfigError as e:
        raise WeightsError(f"{where}: {e}") from e


def infer_config(sd: dict[str, torch.Tensor], where: str) -> ModelConfig:
    """Architecture from diffusers-named weights alone (LDM files carry no config)."""
    try:
        levels = sorted({int(m[1]) for k in sd if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
        widths = [sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in levels]
        per = len({m[1] for k in sd if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))})
        latent = sd["decoder.conv_in.weight"].shape[1]
    except KeyError as e:
        raise WeightsError(f"{where}: not a KL autoencoder state dict (missing {e})") from e
    quant = "quant_conv.weight" in sd
    groups = 32 if all(w % 32 == 0 for w in widths) else 8
    cfg = dict(
        latent_channels=latent,
        block_out_channels=widths,
        layers_per_block=per,
        norm_num_groups=groups,
        mid_block_attention="encoder.mid_block.attentions.0.to_q.weight" in sd,
        use_quant_conv=quant,
        use_post_quant_conv="post_quant_conv.weight" in sd,
        # Guesses: LDM files do not record these. SD 1.x defaults for 4 channels,
        # SD3's for 16; pass config= (or --config) when you know better.
        sample_size=512 if latent == 4 else 1024,
        scaling_factor=0.18215 if latent == 4 else 1.5305,
        shift_factor=None if latent == 4 else 0.0609,
    )
    warnings.warn(
        f"{where}: no model config stored; inferred the architecture from the weights and guessed "
        f"sample_size={cfg['sample_size']}, scaling_factor={cfg['scaling_factor']}, shift_factor={cfg['shift_factor']}",
        stacklevel=3,
    )
    return from_dict(ModelConfig, cfg, "model")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError and friends: we never fall back to a full unpickle
        raise WeightsError(
            f"{path}: refused to load: it is not a plain tensor checkpoint loadable with weights_only=True "
            f"(it may contain arbitrary code; convert it to safetensors in a trusted environment). Detail: {e}"
        ) from e
    for key in ("state_dict", "model", "vae"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a dict of tensors (a state_dict), got {type(obj).__name__}")
    return obj


def _strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("first_stage_model.", "vae.", "model."):
        sub = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        if any(k.startswith("encoder.") for k in sub):
            return sub
    return sd


def _to_diffusers_names(sd: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    sd = _strip_prefix(sd)
    if any(k.startswith("encoder.down.") for k in sd):
        levels = len({m[1] for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
        sd = ldm_to_diffusers(sd, levels)
    # Skip training-only tensors that some LDM checkpoints carry alongside the VAE.
    return {k: v for k, v in sd.items() if not k.startswith("loss.")}


def vae_from_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> AutoencoderKL:
    vae = AutoencoderKL(cfg)
    want = vae.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    if missing or unexpected:
        raise WeightsError(
            f"{where}: weights do not match the architecture "
            f"(latent_channels={cfg.latent_channels}, block_out_channels={list(cfg.block_out_channels)}): "
            f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}"
        )
    for k, v in want.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise WeightsError(
                f"{where}: shape mismatch for '{k}': architecture expects {tuple(v.shape)}, file has {tuple(sd[k].shape)}"
            )
    vae.load_state_dict({k: v.float() for k, v in sd.items()})
    return vae


# --------------------------------------------------------------------------- public API


def save_vae_safetensors(vae: AutoencoderKL, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Our native file: diffusers key names, fp32, the config in metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_state_dict(vae), str(path), metadata={**_metadata(vae.config), **(metadata or {})})
    return path


def save_diffusers(vae: AutoencoderKL, out_dir: str | Path, **factors: Any) -> Path:
    """Write a folder ``diffusers.AutoencoderKL.from_pretrained`` loads.

    ``factors``: scaling_factor, shift_factor, latents_mean, latents_std (None = keep the model's).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = with_factors(vae.config, **factors)
    (out / "config.json").write_text(json.dumps(diffusers_config(cfg), indent=2) + "\n")
    save_file(_state_dict(vae), str(out / DIFFUSERS_WEIGHTS), metadata=_metadata(cfg))
    return out


def save_ldm(vae: AutoencoderKL, path: str | Path, prefix: str = "", **factors: Any) -> Path:
    """One ``.safetensors`` with CompVis key names. No prefix (the default) for a standalone VAE
    file (ComfyUI, A1111); ``prefix='first_stage_model.'`` only to merge into a full checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = with_factors(vae.config, **factors)
    sd = diffusers_to_ldm(_state_dict(vae), len(cfg.block_out_channels))
    save_file({prefix + k: v.contiguous() for k, v in sd.items()}, str(path), metadata=_metadata(cfg))
    return path


def find_checkpoint_weights(path: Path, ema: bool = True) -> Path | None:
    """A training checkpoint dir or run dir -> its VAE weights file (EMA preferred), else None."""
    names = ("vae_ema.safetensors", "vae.safetensors") if ema else ("vae.safetensors",)
    for name in names:
        if (path / name).is_file():
            return path / name
    ckdir = path / "checkpoints"
    if ckdir.is_dir():
        steps = sorted((p for p in ckdir.iterdir() if re.fullmatch(r"step-\d+", p.name)), key=lambda p: int(p.name[5:]))
        for p in reversed(steps):  # newest complete checkpoint
            found = find_checkpoint_weights(p, ema)
            if found:
                return found
    return None


def load_vae(
    path: str | Path,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config: ModelConfig | None = None,
    ema: bool = True,
    fast: bool = True,
    compute_dtype: str | torch.dtype | None = None,
    compile: bool = False,
) -> AutoencoderKL:
    """Load a VAE from any supported format (see module docstring), in eval mode.

    ``path`` may also be a Hugging Face hub id (``"stabilityai/sd-vae-ft-mse"``), with
    ``subfolder`` (default: the root, else ``vae/`` of a pipeline repo) and ``revision``:
    the local cache first, then the hub unless ``HF_HUB_OFFLINE`` (``latentae.hub``). An
    existing local path always wins over a hub id of the same name.

    ``path``: a diffusers folder (or a pipeline folder with ``vae/``), a training run or
    checkpoint folder (EMA weights unless ``ema=False``), a ``.safetensors`` file (ours,
    diffusers-named or LDM-named), or a ``.ckpt``/``.pt`` read with ``weights_only``.
    ``config`` overrides the stored / inferred architecture. ``fast`` turns on the
    exact inference fast paths (``latentae.fast``) where available.

    Precision (``latentae.precision``): the weights are stored in ``dtype`` and the model
    computes in ``dtype`` too, unless ``compute_dtype`` ("float32", "bfloat16", "float16")
    asks for another one (e.g. fp32 weights, bf16 compute). ``compile=True`` runs the fast
    path under ``torch.compile`` (inductor; the first call compiles, for minutes on CPU).
    Both need ``fast=True``.
    """
    from latentae.hub import local_or_hub  # lazy: huggingface_hub only for hub ids

    p = local_or_hub(path, subfolder=subfolder, revision=revision)
    if p.is_dir():
        if (p / "vae" / "config.json").is_file():
            p = p / "vae"
        if (p / "config.json").is_file():
            weights = p / DIFFUSERS_WEIGHTS
            if not weights.is_file():
                raise WeightsError(f"{p}: diffusers folder without {DIFFUSERS_WEIGHTS}")
            try:
                dcfg = json.loads((p / "config.json").read_text())
            except json.JSONDecodeError as e:
                raise WeightsError(f"{p / 'config.json'}: invalid JSON: {e}") from e
            sd, _ = _read_safetensors(weights)
            cfg = config or config_from_diffusers(dcfg, str(p / "config.json"))
            vae = vae_from_state_dict(_to_diffusers_names(sd, str(weights)), cfg, str(weights))
            return _finish(vae, device, dtype, fast, compute_dtype, compile)
        found = find_checkpoint_weights(p, ema)
        if found is None:
            raise WeightsError(
                f"{p}: not a diffusers folder (no config.json) and no training checkpoint "
                "(no vae.safetensors / checkpoints/step-*/) inside"
            )
        p = found
    if p.suffix == ".safetensors":
        sd, meta = _read_safetensors(p)
    elif p.suffix in PICKLE_SUFFIXES:
        sd, meta = _read_pickle(p), {}
    else:
        raise WeightsError(f"{p}: unknown weights format '{p.suffix}' (expected .safetensors or {PICKLE_SUFFIXES})")
    sd = _to_diffusers_names(sd, str(p))
    if config is None and CONFIG_KEY in meta:
        try:
            config = from_dict(ModelConfig, json.loads(meta[CONFIG_KEY]), "model")
        except (ConfigError, json.JSONDecodeError) as e:
            raise WeightsError(f"{p}: stored model config is invalid: {e}") from e
    cfg = config or infer_config(sd, str(p))
    return _finish(vae_from_state_dict(sd, cfg, str(p)), device, dtype, fast, compute_dtype, compile)


def _finish(vae: AutoencoderKL, device, dtype, fast: bool, compute_dtype, compile: bool) -> AutoencoderKL:
    if not fast and (compute_dtype is not None or compile):
        raise ValueError("compute_dtype and compile need the fast inference path (fast=True)")
    vae = vae.to(device=device, dtype=dtype).eval()
    if fast:
        from latentae.fast import optimize_for_inference  # lazy: keeps `import latentae.io` light

        vae = optimize_for_inference(vae, compute_dtype=compute_dtype, compile=compile)
        vae.inference.compute_dtype(vae)  # an unsupported dtype on this device fails here, not mid-job
    return vae
