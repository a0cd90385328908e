"""The training loop: ``train(cfg, output_dir)`` = ``Trainer(...).run()``.

    Trainer(cfg, out, resume=)      check the config, install the stop signals, start
                                    Accelerate and the ranks' channel (ranks.Ranks); rank 0
                                    resolves --resume (state.resolve_start) and the data
                                    (setup.share_data), every rank checks it sees the same;
                                    build everything (setup.set_up)
    run():
        a stop asked for during start-up ends the run here, before the first step
        while step < max_steps:
            one_step()              step.train_step, then control.agree: the step's one
                                    collective and one host sync; a non-finite loss or
                                    gradient stops the run here, before anything is saved
            log / validate / checkpoint as scheduled or as agreed. A stop request (a
                                    signal on any rank) is agreed at the end of the step,
                                    or at the barrier after validation or a checkpoint:
                                    checkpoint this step, then end (exit 0)
        validate, final checkpoint, export (evaluate.py)

An exception on any rank ends every rank (``Ranks.fail``): the failed rank's message is
what the others end with. Barriers go through ``Ranks.barrier`` (failure-aware, no
collective timeout).

Output folder::

    OUTPUT/config.yaml        the resolved config of the latest start
    OUTPUT/checkpoints/       step-XXXXXXXXX/ (see latentae.training.state)
    OUTPUT/data/files.bin     an image folder's file list, made once by rank 0 (setup.share_data)
    OUTPUT/logs/train/        TensorBoard (loss terms, LR, grad norms, img/s, PSNR/SSIM, grids)
    OUTPUT/samples/           validation grids (input | reconstruction | error, >= 256 px each) as PNG
    OUTPUT/export/            final diffusers folder (EMA weights unless train.export_ema=false)
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from latentae import runtime
from latentae.recipe import Config, dump_config
from latentae.training.control import RunControl, StepReport, agree
from latentae.training.errors import NonFiniteError, StartupError, on_every_rank
from latentae.training.evaluate import export, validate
from latentae.training.plan import check_config
from latentae.training.ranks import Ranks
from latentae.training.setup import Parts, set_up, share_data
from latentae.training.state import open_start, resolve_start, save_checkpoint, start_view_problem
from latentae.training.step import GRADIENT_NORMS, nonfinite_problem, train_step

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
    """Holds the run's state; ``run()`` trains to ``train.max_steps``. See the module docstring.

    The stop signals (``train.stop_signals``) are handled from construction on (a notice
    during start-up is kept) until ``run()`` returns.
    """

    def __init__(self, cfg: Config, output_dir: str | Path, *, resume: str | None = None):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.cfg, self.tc, self.out = cfg, cfg.train, Path(output_dir)
        check_config(cfg)
        self.control = RunControl(checkpoint_every_minutes=self.tc.checkpoint_every_minutes)
        signals = self.control.install_signal_handlers(self.tc.stop_signals)
        try:
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
            self.ranks = Ranks.start(self.rank, self.world)
        except BaseException:
            self.control.restore_signal_handlers()
            raise
        try:
            self._start(resume, signals)
        except BaseException as e:
            err = self.ranks.fail(e)
            self.ranks.stop_watching()
            self.control.restore_signal_handlers()
            raise err

    def _start(self, resume: str | None, signals: list[str]) -> None:
        acc, cfg = self.acc, self.cfg
        # Rank 0 decides where the run starts and which files it trains on; then every rank
        # checks that it sees the very same checkpoint and data (a node with a stale or
        # node-local copy of the folder would silently train something else).
        checkpoint = resolve_start(self.out, resume, self.ranks)
        data = share_data(cfg.data, self.out, self.ranks)
        mine = "\n".join(f"{p} (on {self.ranks.host})" for p in (start_view_problem(checkpoint), data.problem) if p)
        problems = self.ranks.problems("start-up view", mine or None)
        if problems:
            raise on_every_rank(StartupError(
                "the ranks do not see the same run folder and data (both must be on filesystems every node sees, "
                "with the same content): " + "; ".join(f"rank {r} {p}" for r, ps in problems for p in ps.split("\n"))
            ))  # fmt: skip
        start_path = Path(checkpoint["path"]) if checkpoint["path"] else None
        self.start = open_start(start_path, cfg, rank=self.rank, world_size=self.world) if start_path else None
        self.parts: Parts = set_up(cfg, acc, self.start, file_list=data.file_list, shard_urls=data.shard_urls)
        self.step = self.start.step if self.start else 0
        self.stop_agreed = False  # some rank asked to stop, and every rank knows it at this point
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
            log.info("CPU: %s", runtime.describe(torch.get_num_threads(), cfg.data.num_workers))
            log.info("stop signals: %s (checkpoint at the end of the current step, then exit 0)",
                     ", ".join(signals) or "none")  # fmt: skip
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
        if problem:  # seen by every rank through the all-reduce
            raise on_every_rank(NonFiniteError(
                f"{problem}. Training stopped and nothing was saved from this state; the newest checkpoint "
                f"({self.last_checkpoint or 'none yet'}) is unaffected. "
                "Try a lower train.lr, train.clip_grad_norm, or train.mixed_precision=fp32."
            ))  # fmt: skip
        self.stop_agreed = self.stop_agreed or report.stop
        if fp16:  # the scalers skipped this step's update of the optimizer(s) whose gradients overflowed
            self.amp_skips += sum(not math.isfinite(report.values.get(k, 0.0)) for k in GRADIENT_NORMS)
        self.step += 1
        return report

    # -- checkpoints, validation, export ------------------------------------------------------

    def _sync(self, name: str) -> None:
        """Wait for every rank (failure-aware); learn whether any rank asked to stop meanwhile."""
        if self.ranks.barrier(name, stop=self.control.stop_requested):
            self.stop_agreed = True

    def save_checkpoint(self) -> Path:
        """Checkpoint the current step (a collective: every rank calls it at the same step)."""
        self.last_checkpoint = save_checkpoint(
            self.parts, step=self.step, output_dir=self.out, cfg=self.cfg, skipped_samples=self.skipped_total,
        )  # fmt: skip
        self._sync(f"checkpoint {self.step}")  # rank 0 has written it (or failed: then every rank ends)
        self.control.checkpoint_done()
        return self.last_checkpoint

    def validate(self) -> dict[str, float]:
        """Validation on rank 0 (a collective: the others wait for it)."""
        metrics = validate(self.parts, step=self.step, output_dir=self.out, batch_size=self.tc.batch_size)
        self._sync(f"validation {self.step}")
        if metrics:
            self.last_metrics = metrics
        return metrics

    def export(self) -> Path | None:
        """The final export on rank 0 (a collective: the others wait for it)."""
        path = export(self.parts, step=self.step, output_dir=self.out, use_ema=self.tc.export_ema)
        self._sync("export")
        return path

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
        failed = True
        try:
            result = self._loop()
            failed = False
        except BaseException as e:
            raise self.ranks.fail(e)  # tells the other ranks; or: another rank failed first
        finally:
            self.ranks.stop_watching()
            self.control.restore_signal_handlers()
            self.batches = None
            if failed:  # flush the logs; no destroy_process_group (NCCL may wait on the failed peer)
                for tracker in self.acc.trackers:
                    tracker.finish()
        self.ranks.close()  # rank 0 leaves last: it may host the ranks' store
        self.acc.end_training()
        return result

    def _stop_reason(self) -> str:
        return self.control.stop_reason or "a stop request on another rank"

    def _loop(self) -> TrainResult:
        from tqdm.auto import tqdm

        acc, tc = self.acc, self.tc
        stopped, export_dir = None, None
        # A stop asked for during start-up (on any rank) ends the run before its first step:
        # nothing was trained since the checkpoint it started from, so nothing is written.
        self._sync("start")
        if self.stop_agreed:
            stopped = self._stop_reason()
            if acc.is_main_process:
                log.info("stopping before the first step (%s): nothing to save", stopped)
            return TrainResult(self.out, self.step, self.last_checkpoint, None, {}, stopped)
        self.control.checkpoint_done()  # train.checkpoint_every_minutes counts from here
        bar = tqdm(total=tc.max_steps, initial=self.step, disable=not acc.is_main_process, dynamic_ncols=True,
                   desc="train")  # fmt: skip
        self.batches = iter(self.parts.loader)
        sums: dict[str, float] = {}
        count, images, busy = 0, 0, 0.0  # busy: seconds inside steps (img/s excludes checkpoints and validation)
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
                last = self.step == tc.max_steps
                # A stop agreed at this step (through agree(), or at the barrier after this
                # step's validation or checkpoint): this step is checkpointed, then the run ends.
                if not self.stop_agreed and tc.val_every and self.step % tc.val_every == 0 and not last:
                    self.validate()
                if self.stop_agreed or report.checkpoint or self.step % tc.checkpoint_every == 0 or last:
                    self.save_checkpoint()
                if self.stop_agreed:
                    stopped = self._stop_reason()
                    if acc.is_main_process:
                        log.info("stopped at step %d (%s): checkpoint %s", self.step, stopped, self.last_checkpoint)
                    break
            bar.close()
            if stopped is None:
                self.validate()
                if self.last_checkpoint is None or not self.last_checkpoint.name.endswith(f"{self.step:09d}"):
                    self.save_checkpoint()  # a resumed, already finished run still gets its final checkpoint
                if self.stop_agreed:  # during the final validation or checkpoint: the export is left to the rerun
                    stopped = self._stop_reason()
                else:
                    export_dir = self.export()
        finally:
            bar.close()
        return TrainResult(self.out, self.step, self.last_checkpoint, export_dir, dict(self.last_metrics), stopped)


__all__ = ["TrainResult", "Trainer", "train"]
