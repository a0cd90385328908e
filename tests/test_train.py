"""End-to-end training on synthetic images with a tiny config (in-process, CPU)."""

from __future__ import annotations

import importlib.util
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentae.config import replace
from latentae.io import load_vae, save_diffusers, save_ldm
from latentae.losses import VAELoss
from latentae.model import build_vae
from latentae.recipe import load_config
from latentae.training.errors import NonFiniteError, StartupError
from latentae.training.loop import Trainer, train
from latentae.training.models import initial_vae

from test_train_common import TRAIN_PY, make_images, read_weights, subprocess_env, tiny_config, write_config


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    # Accelerate keeps process-wide singletons; each run here is a new "program".
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    # One thread: these models are far too small to gain from more, and on a busy
    # machine OpenMP threads spinning against each other cost 10x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # A Trainer handles its stop signals from construction until run() returns; tests that
    # build one without running it must not leave pytest deaf to SIGTERM.
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, h in handlers.items():
        signal.signal(s, h)
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.use_deterministic_algorithms(False)


def _randomized_vae(model_cfg, seed=1):
    torch.manual_seed(seed)
    vae = build_vae(model_cfg)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae


def _scalar_tags(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return set(acc.Tags()["scalars"]), set(acc.Tags()["images"]), acc


def test_run_writes_checkpoints_logs_samples_config_and_export(tmp_path):
    cfg = tiny_config(tmp_path, ["train.keep_last=2"])
    out = tmp_path / "run"
    torch.manual_seed(cfg.train.seed)
    init = build_vae(cfg.model).state_dict()  # the trainer seeds the same way

    result = train(cfg, out)

    assert result.step == 6 and result.checkpoint == out / "checkpoints" / "step-000000006"
    # keep_last=2: steps 2 and 4 were written, 2 was rotated away.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000000004", "step-000000006"]
    ckpt = result.checkpoint
    expected = {"vae.safetensors", "vae_ema.safetensors", "discriminator.safetensors", "loss.safetensors",
                "optimizer.pt", "rank-0.pt", "config.yaml", "trainer.json"}  # fmt: skip
    assert {p.name for p in ckpt.iterdir()} == expected
    meta = json.loads((ckpt / "trainer.json").read_text())
    assert meta["step"] == 6 and meta["world_size"] == 1 and len(meta["rank_fingerprints"]) == 1
    rank = torch.load(ckpt / "rank-0.pt", weights_only=True)
    assert rank["loader"]["kind"] == "folder" and {"python", "numpy", "torch"} <= set(rank["rng"])

    # Training changed the weights; the EMA lags behind them.
    vae_w, ema_w = read_weights(ckpt), read_weights(ckpt, "vae_ema.safetensors")
    assert not torch.equal(vae_w["decoder.conv_out.weight"], init["decoder.conv_out.weight"])
    assert not torch.equal(vae_w["decoder.conv_out.weight"], ema_w["decoder.conv_out.weight"])

    # The resolved config round-trips.
    assert load_config(out / "config.yaml") == cfg
    assert load_config(ckpt / "config.yaml") == cfg

    # Validation: grids on disk (2 rows of input | reconstruction | error, 32 px crops shown 8x: 256 px) and numbers.
    from PIL import Image

    for name in ("val-step-000000003.png", "val_ema-step-000000003.png", "val-step-000000006.png"):
        assert Image.open(out / "samples" / name).size == (3 * 256, 2 * 256)
    assert math.isfinite(result.metrics["val/psnr"]) and -1 <= result.metrics["val_ema/ssim"] <= 1

    # TensorBoard: every loss term, LR, grad norms, throughput, validation, images.
    scalars, images, events = _scalar_tags(out / "logs" / "train")
    for tag in ("loss/total", "loss/rec", "loss/lpips", "loss/kl", "loss/g", "loss/d_weight", "train/lr",
                "train/grad_norm", "disc/d_loss", "disc/grad_norm", "perf/img_per_s", "val/psnr", "val/ssim",
                "val_ema/psnr", "data/skipped_samples"):  # fmt: skip
        assert tag in scalars, tag
    assert "val/input_vs_reconstruction" in images
    assert [e.step for e in events.Scalars("loss/total")] == [1, 2, 3, 4, 5, 6]
    assert events.Scalars("loss/g")[0].value == 0.0 and events.Scalars("loss/d_weight")[-1].value > 0

    # Export = the EMA weights, as a diffusers folder diffusers itself loads.
    from diffusers import AutoencoderKL as DiffusersVAE

    ref = DiffusersVAE.from_pretrained(result.export_dir).state_dict()
    assert all(torch.equal(ref[k], ema_w[k]) for k in ema_w)
    from_run = load_vae(out, fast=False).state_dict()  # a run dir: newest checkpoint, EMA weights
    assert torch.equal(from_run["encoder.conv_in.weight"], ema_w["encoder.conv_in.weight"])

    # Resuming a finished run changes nothing; starting over into the same folder is refused.
    again = train(cfg, out, resume="latest")
    assert again.step == 6
    assert torch.equal(read_weights(ckpt)["decoder.conv_out.weight"], vae_w["decoder.conv_out.weight"])
    with pytest.raises(StartupError, match="already holds checkpoints .*--resume latest"):
        Trainer(cfg, out)


def _nan_at(step_to_break: int, key: str = "kl"):
    original = VAELoss.generator_loss

    def generator_loss(self, *args, step, **kw):
        loss, logs = original(self, *args, step=step, **kw)
        if step == step_to_break:
            logs = {**logs, key: torch.tensor(float("nan"))}
            loss = loss * float("nan")
        return loss, logs

    return generator_loss


def test_nonfinite_loss_stops_with_step_and_term_and_keeps_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path)
    monkeypatch.setattr(VAELoss, "generator_loss", _nan_at(3))
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError) as e:
        train(cfg, out)
    msg = str(e.value)
    assert "non-finite loss at step 3" in msg and "'kl'" in msg and "step-000000002" in msg
    ckpts = [p.name for p in (out / "checkpoints").iterdir()]
    assert ckpts == ["step-000000002"]  # nothing written after the failure, no temp dirs
    for name in ("vae.safetensors", "vae_ema.safetensors", "discriminator.safetensors"):
        assert all(torch.isfinite(t).all() for t in read_weights(out / "checkpoints" / ckpts[0], name).values())


def test_nonfinite_gradient_stops_with_a_clear_error(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, ["train.checkpoint_every=1"])
    original = VAELoss.generator_loss

    def generator_loss(self, inputs, reconstructions, *args, step, **kw):
        loss, logs = original(self, inputs, reconstructions, *args, step=step, **kw)
        if step == 1:
            # Finite forward (sqrt(0) = 0), NaN backward (0 * d sqrt/dx at 0 = 0 * inf).
            loss = loss + 0.0 * torch.sqrt(reconstructions.sum() * 0.0)
        return loss, logs

    monkeypatch.setattr(VAELoss, "generator_loss", generator_loss)
    with pytest.raises(NonFiniteError, match=r"non-finite VAE gradient norm at step 1"):
        train(cfg, tmp_path / "run")
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-000000001"]


def test_decoder_only_finetune_from_ldm_file_keeps_latents(tmp_path):
    base = tiny_config(tmp_path)
    source = _randomized_vae(base.model)
    ldm_file = save_ldm(source, tmp_path / "start.safetensors", prefix="first_stage_model.")
    cfg = tiny_config(
        tmp_path,
        [f"train.init_from={ldm_file}", "train.finetune=decoder", "train.max_steps=3", "train.checkpoint_every=3"],
    )
    trainer = Trainer(cfg, tmp_path / "run")
    vae = trainer.parts.vae_raw
    trained = {id(p) for g in trainer.parts.vae_opt.param_groups for p in g["params"]}
    decoder_side = {id(p) for m in (vae.decoder, vae.post_quant_conv) for p in m.parameters()}
    assert trained == decoder_side  # encoder + quant_conv: not in the optimizer
    assert not any(p.requires_grad for m in (vae.encoder, vae.quant_conv) for p in m.parameters())
    result = trainer.run()

    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    for weights in ("vae.safetensors", "vae_ema.safetensors"):
        tuned = build_vae(cfg.model)
        tuned.load_state_dict(load_file(str(result.checkpoint / weights)))
        with torch.no_grad():
            a, b = source.encode(x), tuned.encode(x)
        assert torch.equal(a.mean, b.mean) and torch.equal(a.logvar, b.logvar), weights
    assert not torch.equal(tuned.decoder.conv_out.weight, source.decoder.conv_out.weight)


def test_init_from_diffusers_folder_and_architecture_checks(tmp_path):
    cfg = tiny_config(tmp_path)
    source = _randomized_vae(cfg.model)
    folder = save_diffusers(source, tmp_path / "start")
    cfg = replace(cfg, train=replace(cfg.train, init_from=str(folder)))
    loaded = initial_vae(cfg)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), source.state_dict().values()))
    other = replace(cfg, model=replace(cfg.model, latent_channels=8))
    with pytest.raises(StartupError, match=r"latent_channels: config 8 vs file 4"):
        initial_vae(other)
    # norm_num_groups changes no shape; the stored diffusers config still catches it.
    groups = replace(cfg, model=replace(cfg.model, norm_num_groups=8))
    with pytest.raises(StartupError, match=r"norm_num_groups: config 8 vs file 4"):
        initial_vae(groups)
    missing = replace(cfg, train=replace(cfg.train, init_from=str(tmp_path / "nope")))
    with pytest.raises(StartupError, match=r"train.init_from: VAE not found"):
        initial_vae(missing)


def test_bf16_autocast_keeps_fp32_master_weights(tmp_path):
    cfg = tiny_config(tmp_path, ["train.mixed_precision=bf16", "train.max_steps=3", "train.checkpoint_every=3"])
    result = train(cfg, tmp_path / "run")
    weights = read_weights(result.checkpoint)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())
    opt = torch.load(result.checkpoint / "optimizer.pt", weights_only=True)
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt["vae"]["state"].values())


# --------------------------------------------------------------------------- command line


def _cli():
    spec = importlib.util.spec_from_file_location("latentae_train_cli", TRAIN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_startup_failures_are_one_clean_line_before_step_0(tmp_path, capsys, monkeypatch):
    main = _cli()
    config = write_config(tmp_path, tmp_path / "missing")
    out = tmp_path / "run"

    assert main(["--config", str(config), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data:") and str(tmp_path / "missing") in err and "Traceback" not in err

    (tmp_path / "empty").mkdir()
    assert main(["--config", str(config), "--output-dir", str(out), f"data.path={tmp_path / 'empty'}"]) == 2
    assert "no image" in capsys.readouterr().err.lower()

    # LPIPS backbone not on disk: the message names the file and the offline switch; nothing downloads.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    data = make_images(tmp_path / "data", 6)
    args = ["--config", str(config), "--output-dir", str(out), f"data.path={data}", "loss.lpips_pretrained=true"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "alexnet-owt" in err and "loss.lpips_pretrained=false" in err and "Traceback" not in err
    assert not (out / "checkpoints").exists()

    assert main(["--config", str(config), "--output-dir", str(out), "train.batch_sise=2"]) == 2
    assert "unknown key 'batch_sise' in section 'train' (did you mean 'batch_size'?)" in capsys.readouterr().err


def test_cli_help_and_bad_key_in_a_real_process(tmp_path):
    env = subprocess_env()
    help_ = subprocess.run([sys.executable, str(TRAIN_PY), "--help"], capture_output=True, text=True, env=env)
    assert help_.returncode == 0 and "--resume latest|PATH" in help_.stdout and "data.path" in help_.stdout
    config = write_config(tmp_path, tmp_path / "data")
    bad = subprocess.run(
        [sys.executable, str(TRAIN_PY), "--config", str(config), "--output-dir", str(tmp_path / "o"), "train.lrr=1"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert bad.returncode == 2 and "did you mean 'lr'" in bad.stderr and "Traceback" not in bad.stderr


def test_bad_images_are_skipped_logged_by_name_and_counted(tmp_path, caplog):
    cfg = tiny_config(tmp_path, ["train.max_steps=2", "train.checkpoint_every=2", "train.num_val_images=1"], n_images=4)
    (tmp_path / "data" / "img90_truncated.png").write_bytes((tmp_path / "data" / "img00.png").read_bytes()[:60])
    (tmp_path / "data" / "img91_text.png").write_text("not an image")
    with caplog.at_level("WARNING", logger="latentae.train"):
        result = train(cfg, tmp_path / "run")
    assert result.step == 2
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped bad sample")]
    named = {Path(m.split()[3].rstrip(":")).name for m in skipped}  # "skipped bad sample PATH: reason"
    assert len(skipped) == 2 and named == {"img90_truncated.png", "img91_text.png"}
    meta = json.loads((result.checkpoint / "trainer.json").read_text())
    scalars, _, events = _scalar_tags(tmp_path / "run" / "logs" / "train")
    assert meta["skipped_samples"] == len(skipped) == events.Scalars("data/skipped_samples")[-1].value
