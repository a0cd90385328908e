"""What a run will do, worked out from the config alone: checks and the effective numbers.

Nothing here reads data, builds a model or touches a device, so ``train.py --dry-run``
answers in a second on a login node, for any number of processes.
"""

from __future__ import annotations

from latentae.recipe import Config, dump_config
from latentae.training.config import effective_lrs
from latentae.training.errors import StartupError


def check_config(cfg: Config) -> None:
    """Cross-section checks the per-section validation cannot do; raises StartupError."""
    if not cfg.data.path:
        raise StartupError("data.path is empty: set it in the config or pass data.path=DIR_OR_SHARDS")
    if cfg.loss.uses_gan and cfg.data.resolution < cfg.discriminator.min_size:
        raise StartupError(
            f"data.resolution={cfg.data.resolution} is too small for the discriminator "
            f"(n_layers={cfg.discriminator.n_layers} needs >= {cfg.discriminator.min_size} px): lower "
            "discriminator.n_layers or raise data.resolution"
        )
    latent = cfg.data.resolution // cfg.model.downsample_factor
    too_big = [f for f in cfg.loss.scale_equivariance_scales if f > latent]
    if cfg.loss.scale_equivariance_weight > 0 and too_big:
        raise StartupError(
            f"loss.scale_equivariance_scales {too_big} exceed the latent size of a training crop "
            f"(data.resolution={cfg.data.resolution} / {cfg.model.downsample_factor} = {latent} latent pixels): "
            "use smaller factors or raise data.resolution"
        )


def describe(cfg: Config, processes: int) -> str:
    """The dry-run report: the resolved config, then the numbers that depend on the process count."""
    tc = cfg.train
    lrs = effective_lrs(tc, processes)
    batch = processes * tc.batch_size * tc.grad_accum_steps
    lines = [
        "# resolved config",
        dump_config(cfg).rstrip(),
        "",
        f"# with {processes} process(es)",
        f"global batch: {batch} images per optimizer step "
        f"({processes} processes x {tc.batch_size} batch x {tc.grad_accum_steps} accumulation)",
        f"learning rates: {lrs.explanation}",
        f"peak learning rates: vae {lrs.vae:.6g}, discriminator {lrs.disc:.6g}",
        f"images seen by train.max_steps={tc.max_steps}: {batch * tc.max_steps}",
    ]
    return "\n".join(lines) + "\n"


__all__ = ["check_config", "describe"]
