"""Preemption in one process: a stop signal at each moment of a run (real signals, sent by
the process to itself at chosen moments), the second signal, wall-clock checkpoints.

(SIGTERM mid-run resumed bit-identically through the real command line: tests/test_resume.py;
a signal to one of two processes: tests/test_cluster.py.)"""

from __future__ import annotations

import os
import signal

import pytest

from latentae.training import loop, state
from latentae.training.control import RunControl
from latentae.training.loop import Trainer, train
from crash_launcher import inject_in_step
from test_train import _cli, fresh_accelerate_state  # noqa: F401  (autouse: fresh Accelerate state, 1 thread)
from test_train_common import tiny_config, write_config

QUIET = ["train.checkpoint_every=100", "train.val_every=0", "train.num_val_images=1"]


def _signal_self(signum: int = signal.SIGUSR1) -> None:
    os.kill(os.getpid(), signum)  # the handler runs before the next Python instruction


def _in_step(monkeypatch, n: int, action) -> None:
    """``action()`` during optimizer step ``n`` (1-based), after its work, before its collective."""
    inject_in_step(n, action, patch=monkeypatch.setattr)


def _checkpoints(run) -> list[int]:
    root = run / "checkpoints"
    return sorted(int(p.name[5:]) for p in root.iterdir()) if root.is_dir() else []


def test_stop_signal_during_start_up_ends_before_the_first_step(tmp_path, monkeypatch):
    original = loop.set_up

    def set_up(*args, **kw):  # the notice comes while the run is still being built
        parts = original(*args, **kw)
        _signal_self()
        return parts

    monkeypatch.setattr(loop, "set_up", set_up)
    result = train(tiny_config(tmp_path, QUIET), tmp_path / "run")
    assert result.stopped == "SIGUSR1 received" and result.step == 0
    assert result.checkpoint is None and result.export_dir is None and _checkpoints(tmp_path / "run") == []
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # run() gave the signal back


@pytest.mark.parametrize("where", ["validation", "checkpoint"])
def test_stop_signal_during_validation_or_a_checkpoint_stops_right_after_it(tmp_path, monkeypatch, where):
    # Validation and a checkpoint at step 2. Without the stop riding on their barrier, the
    # run would train step 3 and stop there.
    if where == "validation":
        original = loop.validate

        def hook(*args, **kw):
            metrics = original(*args, **kw)
            _signal_self()
            return metrics

        monkeypatch.setattr(loop, "validate", hook)
    else:
        original = state.write_checkpoint

        def hook(output_dir, step, writers, manifest, **kw):
            first = next(iter(writers))
            writers = {**writers, first: lambda p, w=writers[first]: (w(p), _signal_self())}  # mid-write
            return original(output_dir, step, writers, manifest, **kw)

        monkeypatch.setattr(state, "write_checkpoint", hook)
    cfg = tiny_config(tmp_path, ["train.val_every=2", "train.checkpoint_every=2", "train.num_val_images=1"])
    result = train(cfg, tmp_path / "run")
    assert result.stopped == "SIGUSR1 received" and result.step == 2 and _checkpoints(tmp_path / "run") == [2]
    assert result.export_dir is None


def test_repeated_signal_is_one_stop_a_later_second_ends_at_once(tmp_path, monkeypatch):
    # Twice at once (e.g. the scheduler's SIGTERM and the launcher forwarding it): one stop.
    _in_step(monkeypatch, 2, lambda: (_signal_self(signal.SIGTERM), _signal_self(signal.SIGTERM)))
    config = write_config(tmp_path, tiny_config(tmp_path).data.path)
    args = ["--config", str(config), "--output-dir", str(tmp_path / "run"), *QUIET]
    main = _cli()
    assert main(args) == 0 and _checkpoints(tmp_path / "run") == [2]
    # A second one later than RunControl.FORCE_AFTER_S: ends at once, no checkpoint, 128 + 15.
    monkeypatch.setattr(RunControl, "FORCE_AFTER_S", 0.0)
    _in_step(monkeypatch, 3, lambda: (_signal_self(signal.SIGTERM), _signal_self(signal.SIGTERM)))
    assert main([*args, "--resume", "latest"]) == 128 + signal.SIGTERM
    assert _checkpoints(tmp_path / "run") == [2]


def test_checkpoint_every_minutes_follows_the_wall_clock(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, [*QUIET, "train.max_steps=7", "train.checkpoint_every_minutes=2.5"])
    t = Trainer(cfg, tmp_path / "run")
    now = [1000.0]
    t.control.clock = lambda: now[0]
    original = loop.train_step

    def train_step(*args, **kw):
        now[0] += 60.0  # every step takes a minute
        return original(*args, **kw)

    monkeypatch.setattr(loop, "train_step", train_step)
    result = t.run()
    # 2.5 min after the start: step 3; 2.5 min after that checkpoint: step 6; the final one: 7.
    assert result.step == 7 and _checkpoints(tmp_path / "run") == [3, 6, 7]
