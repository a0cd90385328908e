"""The training loop: ``train(cfg, output_dir)`` = ``Trainer(...).run()``.

    Trainer(cfg, out, resume=)      check the config, start Accelerate, resolve --resume
                                    (state.resolve_start), build everything (setup.set_up)
    run():
        while step < max_steps:
            one_step()              step.train_step, then control.agree: the step's one
                                    collective and one host sync; a non-finite loss or
                                    gradient stops the run here, before anything is saved
            log / validate / checkpoint as scheduled or as agreed (a stop request:
                                    checkpoint, then end)
        validate, final checkpoint, export (evaluate.py)

Output folder::

    OUTPUT/config.yaml        the resolved config of the latest start
    OUTPUT/checkpoints/       step-XXXXXXXXX/ (see latentae.training.state)
    OUTPUT/logs/train/        TensorBoard (loss terms, LR, grad norms, img/s, PSNR/SSIM, grids)
    OUTPUT/samples/           validation grids (input | reconstruction) as PNG
    OUTPUT/export/            final diffusers folder (EMA weights unless train.export_ema=false)
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from latentae.recipe import Config, dump_config
from latentae.training.control import RunControl, StepReport, agree
from latentae.training.errors import NonFiniteError
from latentae.training.evaluate import export, validate
from latentae.training.plan import check_config
from latentae.training.setup import Parts, set_up
from latentae.training.state import open_start, resolve_start, save_checkpoint
from latentae.training.step import nonfinite_problem, train_step

log = logging.getLogger("latentae.train")


@dataclass
class TrainResult:
    output_dir: Path
    step: int  # optimizer steps done
    checkpoint: Path | None  # the newest checkpoint
    export_dir: Path | None  # None when the run was stopped early (RunControl.request_stop)
    metrics: dict[str, float]  # the last validation's numbers ({} when there was none)
    stopped: str | None = None  # why the run ended before max_steps (a stop request), else None


def train(cfg: Config, output_dir: str | Path, *, resume: str | None = None) -> TrainResult:
    """Train (or resume, ``resume="latest"`` or a checkpoint path) into ``output_dir``."""
    return Trainer(cfg, output_dir, resume=resume).run()


class Trainer:
    """Holds the run's state; ``run()`` trains to ``train.max_steps``. See the module docstring."""

    def __init__(self, cfg: Config, output_dir: str | Path, *, resume: str | None = None):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.cfg, self.tc, self.out = cfg, cfg.train, Path(output_dir)
        check_config(cfg)
        # Accelerate starts the processes' group, picks the device and wraps DDP. Its own
        # mixed precision stays off: autocast and the loss scalers are ours (setup.py),
        # so it never patches a module's forward.
        self.acc = acc = Accelerator(
            mixed_precision="no",
            cpu=not torch.cuda.is_available(),
            log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")),
        )
        self.rank, self.world = acc.process_index, acc.num_processes
        start_path = resolve_start(self.out, resume, acc)
        self.start = open_start(start_path, cfg, rank=self.rank, world_size=self.world) if start_path else None
        self.parts: Parts = set_up(cfg, acc, self.start)
        self.step = self.start.step if self.start else 0
        self.control = RunControl()
        self.skipped_total = int(self.start.manifest.get("skipped_samples", 0)) if self.start else 0
        self.amp_skips = 0
        self.last_metrics: dict[str, float] = {}
        self.last_checkpoint = start_path
        self.batches = None  # the loader's iterator while run() is going
        self._write_config()
        # purge_step: TensorBoard drops events a killed run logged after the checkpoint we resume from.
        tb_kwargs = {"purge_step": self.step + 1} if self.step > 0 else {}
        acc.init_trackers("train", init_kwargs={"tensorboard": tb_kwargs})
        lrs = self.parts.lrs
        if acc.is_main_process:
            log.info("learning rates: %s", lrs.explanation)
        acc.log({"train/lr_peak": lrs.vae, "disc/lr_peak": lrs.disc}, step=self.step)

    def _write_config(self) -> None:
        if self.acc.is_main_process:
            tmp = self.out / "config.yaml.tmp"
            tmp.write_text(dump_config(self.cfg))
            tmp.replace(self.out / "config.yaml")

    # -- one step -------------------------------------------------------------------------

    def one_step(self) -> StepReport:
        """Train one optimizer step and agree on it across processes (one collective, one host sync).

        Raises NonFiniteError (on every rank at once) when a loss term or gradient norm of
        this step is not finite; the caller then saves nothing.
        """
        out = train_step(self.parts, self.cfg, self.step, self.batches)
        for name, reason in out.skipped:
            log.warning("skipped bad sample %s: %s", name, reason)
        self.skipped_total += len(out.skipped)
        report = agree(self.acc, out, self.control, step=self.step)
        fp16 = self.tc.mixed_precision == "fp16"
        problem = nonfinite_problem(report.values, self.step, fp16=fp16)
        if problem:
            raise NonFiniteError(
                f"{problem}. Training stopped and nothing was saved from this state; the newest checkpoint "
                f"({self.last_checkpoint or 'none yet'}) is unaffected. "
                "Try a lower train.lr, train.clip_grad_norm, or train.mixed_precision=fp32."
            )
        if fp16:  # the scalers skipped this step's update of the optimizer(s) whose gradients overflowed
            self.amp_skips += sum(not math.isfinite(report.values.get(k, 0.0)) for k in ("grad_norm", "disc/grad_norm"))
        self.step += 1
        return report

    # -- checkpoints, validation, export ------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Checkpoint the current step (a collective: every rank calls it at the same step)."""
        self.last_checkpoint = save_checkpoint(
            self.parts, step=self.step, output_dir=self.out, cfg=self.cfg, config_yaml=dump_config(self.cfg),
            loader_state=self.parts.loader.state_dict(), skipped_samples=self.skipped_total,
        )  # fmt: skip
        return self.last_checkpoint

    def validate(self) -> dict[str, float]:
        metrics = validate(self.parts, step=self.step, output_dir=self.out, batch_size=self.tc.batch_size)
        if metrics:
            self.last_metrics = metrics
        return metrics

    # -- logging ----------------------------------------------------------------------------

    def _log(self, sums: dict[str, float], count: int, images: int, seconds: float) -> dict[str, float]:
        """Means over the last ``count`` steps (already averaged over processes by agree())."""
        out = {}
        for k, v in sorted(sums.items()):
            v = v / count
            if k in ("lr", "grad_norm"):
                out[f"train/{k}"] = v
            elif k.startswith(("disc/", "amp/")):
                out[k] = v
            else:
                out[f"loss/{k}"] = v
        out["perf/img_per_s"] = images / max(seconds, 1e-9)
        out["data/skipped_samples"] = float(self.skipped_total)
        if self.tc.mixed_precision == "fp16":
            out["amp/skipped_steps"] = float(self.amp_skips)
        self.acc.log(out, step=self.step)
        return out

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> TrainResult:
        from tqdm.auto import tqdm

        acc, tc = self.acc, self.tc
        bar = tqdm(total=tc.max_steps, initial=self.step, disable=not acc.is_main_process, dynamic_ncols=True,
                   desc="train")  # fmt: skip
        self.batches = iter(self.parts.loader)
        sums: dict[str, float] = {}
        count, images, busy = 0, 0, 0.0  # busy: seconds inside steps (img/s excludes checkpoints and validation)
        stopped, export_dir = None, None
        try:
            if acc.is_main_process and self.step == 0:
                log.info("training to step %d into %s", tc.max_steps, self.out)
            while self.step < tc.max_steps:
                t0 = time.perf_counter()
                report = self.one_step()
                busy += time.perf_counter() - t0
                for k, v in report.values.items():
                    sums[k] = sums.get(k, 0.0) + v
                sums["lr"] = sums.get("lr", 0.0) + report.lr
                if report.disc_lr is not None:
                    sums["disc/lr"] = sums.get("disc/lr", 0.0) + report.disc_lr
                count, images = count + 1, images + report.images
                bar.update(1)
                if self.step % tc.log_every == 0 or self.step == tc.max_steps:
                    out = self._log(sums, count, images, busy)
                    psnr = {"psnr": f"{self.last_metrics['val/psnr']:.2f}"} if "val/psnr" in self.last_metrics else {}
                    bar.set_postfix(loss=f"{out['loss/total']:.4f}", rec=f"{out['loss/rec']:.4f}",
                                    kl=f"{out['loss/kl']:.1f}", img_s=f"{out['perf/img_per_s']:.1f}",
                                    **psnr)  # fmt: skip
                    sums, count, images, busy = {}, 0, 0, 0.0
                if report.stop:  # agreed by all ranks at this step: checkpoint, then end
                    stopped = self.control.stop_reason or "a stop request from another process"
                    if acc.is_main_process:
                        log.info("stopping at step %d: %s", self.step, stopped)
                    self.save_checkpoint()
                    break
                last = self.step == tc.max_steps
                if tc.val_every and self.step % tc.val_every == 0 and not last:
                    self.validate()
                if self.step % tc.checkpoint_every == 0 or last or report.checkpoint:
                    self.save_checkpoint()
                    self.control.checkpoint_done()
            bar.close()
            if stopped is None:
                self.validate()
                if self.last_checkpoint is None or not self.last_checkpoint.name.endswith(f"{self.step:09d}"):
                    self.save_checkpoint()  # a resumed, already finished run still gets its final checkpoint
                export_dir = export(self.parts, step=self.step, output_dir=self.out, use_ema=tc.export_ema)
        finally:
            bar.close()
            self.batches = None
            acc.end_training()
        return TrainResult(self.out, self.step, self.last_checkpoint, export_dir, dict(self.last_metrics), stopped)


__all__ = ["TrainResult", "Trainer", "train"]
