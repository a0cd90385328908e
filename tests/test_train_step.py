"""The GPU-ready training step, checked on CPU: precision, loss scaling, optimizer and
clipping implementations, host syncs, compile, gradient checkpointing, validation in fp32,
and the per-step stop/checkpoint agreement."""

from __future__ import annotations

import json
import types

import pytest
import torch
from torch import nn

from latentae.ema import EMA
from latentae.optim import build_optimizer
from latentae.training import policy
from latentae.training.host_syncs import HostSyncCounter
from latentae.training.loop import Trainer, train
from latentae.training.step import optimizer_step
from test_train import fresh_accelerate_state  # noqa: F401  (autouse: fresh Accelerate state, 1 thread)
from test_train_common import read_weights, tiny_config

GAN_NOW = ["loss.disc_start=0", "loss.disc_train_start=0"]  # the whole step from step 0


def _trainer(tmp_path, overrides=(), name="run") -> Trainer:
    t = Trainer(tiny_config(tmp_path, list(overrides)), tmp_path / name)
    t.batches = iter(t.parts.loader)
    return t


def _steps(t: Trainer, n: int) -> list:
    return [t.one_step() for _ in range(n)]


# --------------------------------------------------------------------------- policy (no GPU needed)


def test_device_and_precision_policy():
    assert policy.optimizer_impl("cuda") == "fused" == policy.optimizer_impl("cpu")
    assert policy.optimizer_impl("mps") == "foreach"
    assert policy.backend_flags(False) == {"cudnn_benchmark": True, "cudnn_deterministic": False,
                                           "deterministic_algorithms": False}  # fmt: skip
    assert policy.backend_flags(True)["cudnn_benchmark"] is False
    assert policy.autocast_dtype("fp32") is None and policy.autocast_dtype("bf16") is torch.bfloat16
    assert policy.needs_loss_scaler("fp16") and not policy.needs_loss_scaler("bf16")
    assert "no bf16 support" in policy.precision_problem("bf16", "cuda", bf16_supported=False)
    assert policy.precision_problem("fp16", "cpu") is None and "slower" in policy.precision_notice("fp16", "cpu")


def test_trainer_applies_backend_flags_and_effective_lr(tmp_path, caplog):
    with caplog.at_level("INFO", logger="latentae.train"):
        t = _trainer(tmp_path, ["train.scale_lr=true", "train.grad_accum_steps=3", "train.deterministic=false"])
    assert torch.backends.cudnn.benchmark is True
    # lr 1e-3 (tiny config) x 1 process x 2 batch x 3 accumulation
    assert t.parts.vae_opt.param_groups[0]["lr"] == pytest.approx(6e-3)
    assert t.parts.disc_opt.param_groups[0]["lr"] == pytest.approx(6e-3)
    assert t.parts.vae_opt.defaults["fused"] and t.parts.disc_opt.defaults["fused"]
    said = "VAE 6.00e-03 = 1.00e-03 (train.lr) x 1 processes x 2 batch x 3"
    assert any(said in r.getMessage() for r in caplog.records)
    _steps(t, 1)
    path = t.save_checkpoint()
    assert json.loads((path / "trainer.json").read_text())["effective_lr"] == pytest.approx({"vae": 6e-3, "disc": 6e-3})
    t.acc.end_training()
    det = _trainer(tmp_path, ["train.deterministic=true"], name="det")
    assert torch.backends.cudnn.benchmark is False and torch.are_deterministic_algorithms_enabled()
    det.acc.end_training()


# --------------------------------------------------------------------------- optimizer and clipping


def test_fused_foreach_and_loop_adam_agree_and_batched_clipping_matches():
    torch.manual_seed(0)
    shapes = [(8, 4, 3, 3), (8,), (16, 8), (1,)]
    results = {}
    for impl in ("for_loop", "foreach", "fused"):
        gens = [torch.Generator().manual_seed(i) for i in range(len(shapes))]
        params = [nn.Parameter(torch.randn(s, generator=g)) for s, g in zip(shapes, gens)]
        opt = build_optimizer(params, kind="adamw", lr=1e-2, betas=(0.5, 0.9), weight_decay=0.01, impl=impl)
        for step in range(3):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))
            opt.step()
        results[impl] = [p.detach().clone() for p in params]
    for impl in ("foreach", "fused"):
        for a, b in zip(results["for_loop"], results[impl]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(results["foreach"][0], torch.randn(shapes[0], generator=torch.Generator().manual_seed(0)))

    # optimizer_step's batched norm + clip == torch's per-tensor clip_grad_norm_.
    grads = [torch.randn(s, generator=torch.Generator().manual_seed(7 + i)) * 10 for i, s in enumerate(shapes)]
    a = [nn.Parameter(torch.zeros(s)) for s in shapes]
    b = [nn.Parameter(torch.zeros(s)) for s in shapes]
    for p, q, g in zip(a, b, grads):
        p.grad, q.grad = g.clone(), g.clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(a, 1.5, foreach=False)
    opt = torch.optim.SGD(b, lr=0.0)
    norm = optimizer_step(opt, torch.amp.GradScaler("cpu", enabled=False), max_norm=1.5)
    torch.testing.assert_close(norm, ref_norm)
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("impl", ["foreach", "fused"])  # fused: the skip happens inside the kernel
def test_fp16_scaler_per_optimizer_skips_only_the_overflowing_step(impl):
    torch.manual_seed(0)
    net_a, net_b = nn.Linear(4, 3), nn.Linear(4, 3)
    kw = dict(kind="adam", lr=0.1, betas=(0.5, 0.9), weight_decay=0.0, impl=impl)
    opt_a, opt_b = build_optimizer(net_a.parameters(), **kw), build_optimizer(net_b.parameters(), **kw)
    sc_a, sc_b = torch.amp.GradScaler("cpu", init_scale=1024.0), torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(5, 4)
    with torch.autocast("cpu", dtype=torch.float16):
        loss_a, loss_b = net_a(x).float().pow(2).mean(), net_b(x).float().pow(2).mean()
    sc_a.scale(loss_a).backward()
    sc_b.scale(loss_b).backward()
    torch.testing.assert_close(net_b.weight.grad / 1024.0, torch.autograd.grad(net_b(x).pow(2).mean(), net_b.weight)[0],
                               rtol=2e-2, atol=1e-3)  # fmt: skip  (the loss was scaled, fp16 forward)
    net_a.weight.grad[0, 0] = float("inf")  # injected overflow in optimizer A only
    before_a = [p.detach().clone() for p in net_a.parameters()]
    before_b = [p.detach().clone() for p in net_b.parameters()]
    norm_a = optimizer_step(opt_a, sc_a, max_norm=1.0)
    norm_b = optimizer_step(opt_b, sc_b, max_norm=1.0)
    assert not torch.isfinite(norm_a) and torch.isfinite(norm_b)
    assert all(torch.equal(p, q) for p, q in zip(net_a.parameters(), before_a))  # A's step skipped
    assert not any(torch.equal(p, q) for p, q in zip(net_b.parameters(), before_b))  # B stepped
    assert sc_a.get_scale() == 512.0 and sc_b.get_scale() == 1024.0  # only A's scale halved
    assert opt_a.state == {} or all(s["step"] == 0 for s in opt_a.state.values())


def test_fp16_training_on_cpu_keeps_two_scalers_and_resumes_them(tmp_path):
    t = _trainer(tmp_path, ["train.mixed_precision=fp16", "train.max_steps=3", *GAN_NOW])
    assert t.parts.vae_scaler is not t.parts.disc_scaler and t.parts.vae_scaler.is_enabled()
    reports = _steps(t, 3)
    # sum_mean losses are large: the VAE's scaler backs off from 65536 on overflowing steps,
    # the discriminator's (small loss) does not; each moved on its own.
    vae_scales = [r.values["amp/scale"] for r in reports]
    disc_scales = [r.values["amp/disc_scale"] for r in reports]
    assert vae_scales[-1] < 65536.0 and disc_scales == [65536.0] * 3
    assert t.amp_skips == sum(1 for a, b in zip([65536.0] + vae_scales, vae_scales) if b < a)
    path = t.save_checkpoint()
    t.acc.end_training()
    rank = torch.load(path / "rank-0.pt", weights_only=True)
    assert rank["scalers"]["vae"]["scale"] == vae_scales[-1] and rank["scalers"]["disc"]["scale"] == 65536.0
    assert all(v.dtype == torch.float32 for v in read_weights(path).values())
    resumed = Trainer(tiny_config(tmp_path, ["train.mixed_precision=fp16", "train.max_steps=3", *GAN_NOW]),
                      tmp_path / "run", resume="latest")  # fmt: skip
    assert resumed.parts.vae_scaler.get_scale() == vae_scales[-1] and resumed.step == 3
    resumed.acc.end_training()


# --------------------------------------------------------------------------- host syncs


def test_host_sync_counter_counts_reads():
    t = torch.ones(3)
    with HostSyncCounter() as syncs:
        t.sum().item()
        t.tolist()
        if t.sum() > 0:
            pass
        float(t[0])
        torch.equal(t, t)
        _ = t.sum() * 2  # device work only: not a sync
    assert syncs.by_kind == {"item": 1, "tolist": 1, "bool": 1, "float": 1, "equal": 1}
    with HostSyncCounter() as syncs:
        with pytest.raises(Exception):
            torch.cuda.synchronize()  # no GPU here; the call is still counted
    assert syncs.count == 1 and "cuda.synchronize" in next(iter(syncs.by_kind))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_one_host_sync_per_optimizer_step(tmp_path, precision):
    # The whole step: 2 micro-batches, GAN + discriminator, clipping, EMA, learned logvar,
    # mixed precision (fp16: two loss scalers, whose inf checks fused Adam takes on the device).
    t = _trainer(tmp_path, [*GAN_NOW, "train.grad_accum_steps=2", "train.clip_grad_norm=1.0",
                            "loss.learn_logvar=true", f"train.mixed_precision={precision}"])  # fmt: skip
    for _ in range(3):
        with HostSyncCounter() as syncs:
            report = t.one_step()
        assert syncs.by_kind == {"tolist": 1}, syncs.by_kind  # control.agree's one read
        assert {"total", "kl", "grad_norm", "disc/d_loss", "disc/grad_norm"} <= set(report.values)
    t.acc.end_training()


# --------------------------------------------------------------------------- validation precision


def test_validation_and_ema_run_in_fp32_outside_autocast_under_bf16_training(tmp_path):
    t = _trainer(tmp_path, ["train.mixed_precision=bf16"])
    seen: list[tuple[str, torch.dtype]] = []
    phase = ["train"]

    def hook(name):
        return lambda module, inputs, output: seen.append((phase[0], name, output.dtype))

    for name, model in (("vae", t.parts.vae_raw), ("ema", t.parts.ema.model)):
        model.decoder.conv_out.register_forward_hook(hook(name))
        model.encoder.down_blocks[0].resnets[0].conv1.register_forward_hook(hook(name))
    _steps(t, 1)
    assert {(n, d) for p, n, d in seen if p == "train"} == {("vae", torch.bfloat16)}  # autocast really is on
    phase[0] = "val"
    metrics = t.validate()
    val = [(n, d) for p, n, d in seen if p == "val"]
    assert {n for n, _ in val} == {"vae", "ema"} and {d for _, d in val} == {torch.float32}
    assert set(metrics) >= {"val/psnr", "val_ema/psnr"}
    # Nothing patched onto the trained module's or the EMA's forward (Accelerate's
    # mixed precision would install an autocast wrapper there).
    for model in (t.parts.vae_raw, t.parts.ema.model):
        assert all("forward" not in vars(m) for m in model.modules())
    t.acc.end_training()


def test_ema_copy_drops_forward_wrappers():
    from accelerate.utils import convert_outputs_to_fp32

    model = nn.Sequential(nn.Linear(4, 4))
    autocast_bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    model.forward = types.MethodType(convert_outputs_to_fp32(autocast_bf16(model.forward.__func__)), model)
    model.compile()  # lazy: sets the compiled call implementation, compiles nothing yet
    ema = EMA(model, decay=0.9)
    seen = []
    ema.model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    ema.model(torch.randn(2, 4))
    assert seen == [torch.float32]
    assert "forward" not in vars(ema.model) and ema.model._compiled_call_impl is None
    assert model._compiled_call_impl is not None  # the source keeps its own wrappers


# --------------------------------------------------------------------------- compile and gradient checkpointing


def _two_steps(tmp_path, name, overrides):
    t = _trainer(tmp_path, [*GAN_NOW, "train.grad_accum_steps=2", *overrides], name=name)
    losses = [r.values["total"] for r in _steps(t, 2)]
    weights = {k: v.detach().clone() for k, v in t.parts.vae_raw.state_dict().items()}
    disc = {k: v.detach().clone() for k, v in t.parts.disc_raw.state_dict().items()}
    t.acc.end_training()
    return losses, weights, disc


def _assert_same_run(a, b, tol):
    assert a[0] == pytest.approx(b[0], rel=tol)
    for x, y in ((a[1], b[1]), (a[2], b[2])):
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=tol, atol=tol, msg=k)


def test_gradient_checkpointing_recomputes_blocks_and_changes_nothing(tmp_path):
    plain = _two_steps(tmp_path, "plain", [])
    calls = []
    from latentae.model import ResnetBlock

    original = ResnetBlock.forward

    def counting(self, x):
        calls.append(torch.is_grad_enabled())
        return original(self, x)

    ResnetBlock.forward = counting
    try:
        ckpt = _two_steps(tmp_path, "ckpt", ["train.gradient_checkpointing=true"])
        n_with = len(calls)
        calls.clear()
        _two_steps(tmp_path, "plain2", [])
        n_without = len(calls)
    finally:
        ResnetBlock.forward = original
    assert n_with > n_without  # the blocks really ran again during backward
    _assert_same_run(plain, ckpt, 1e-6)


def test_compile_gives_the_same_steps(tmp_path, monkeypatch):
    # Inductor's C++ code generation takes minutes on 2 cores; aot_eager runs the same
    # capture (dynamo graphs, graph breaks, AOT autograd), which is where compile can
    # change what the step computes. tools/bench_train.py train.compile=true runs inductor.
    monkeypatch.setattr(policy, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    plain = _two_steps(tmp_path, "plain", [])
    compiled = _two_steps(tmp_path, "compiled", ["train.compile=true"])
    torch._dynamo.reset()
    _assert_same_run(plain, compiled, 1e-5)


# --------------------------------------------------------------------------- stop / checkpoint requests


def test_stop_and_checkpoint_requests_take_effect_at_the_agreed_step(tmp_path, monkeypatch):
    original = Trainer.one_step

    def one_step(self):
        if self.step == 1:
            self.control.request_checkpoint("test: off-schedule checkpoint")
        if self.step == 2:
            self.control.request_stop("test: preempted")
        return original(self)

    monkeypatch.setattr(Trainer, "one_step", one_step)
    cfg = tiny_config(tmp_path, ["train.checkpoint_every=100", "train.val_every=0"])
    result = train(cfg, tmp_path / "run")
    assert result.step == 3 and result.stopped == "test: preempted" and result.export_dir is None
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-000000002", "step-000000003"]  # requested at steps 1 and 2, written when they ended
    assert not (tmp_path / "run" / "export").exists()
    again = train(cfg, tmp_path / "run", resume="latest")  # and the run goes on from there
    assert again.step == 6 and again.stopped is None
