"""Run train/train.py with a fault injected at a chosen moment (for the crash, preemption and
multi-process tests).

    python tests/crash_launcher.py --kill-after-step 5 -- --config c.yaml --output-dir out ...
    python -m torch.distributed.run --nproc_per_node 2 tests/crash_launcher.py --only-rank 1 \\
        --signal-in-step 3 -- --config c.yaml --output-dir out ...

--kill-after-step N       SIGKILL right after optimizer step N is done (agreed by all ranks), before
                          anything else happens at that step (no log, no checkpoint)
--kill-in-checkpoint N    SIGKILL halfway through writing the files of checkpoint step N: some files
                          are written, the manifest is not, nothing is renamed into place
--signal-in-step N[:SIG]  send SIG (default SIGTERM) to this process during optimizer step N
                          (1-based: after its forward/backward, before its collective)
--raise-in-step N         raise RuntimeError during optimizer step N
--raise-in WHAT           raise RuntimeError in validation / export / checkpoint (rank 0's work)
--stale-checkpoint-view N this rank reads checkpoint step N's trainer.json for any checkpoint (a
                          node with a stale copy of the run folder)
--stale-file-list         this rank's view of the stored file list lacks its last file
--only-rank R             inject only in the process with RANK=R (default: every process)

Everything is injected here, by monkeypatching the real trainer in this process before
calling the real entry point; the library has no test switch a production run could trip.
Each injection prints "injected: ... at <unix time>" to stderr when it fires.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _note(what: str) -> None:
    print(f"injected: {what} at {time.time():.3f}", file=sys.stderr, flush=True)


def _die(*_args) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def inject_kill_after_step(n: int) -> None:
    from latentae.training import loop

    original = loop.Trainer.one_step

    def one_step(self):
        report = original(self)
        if self.step == n:
            _die()
        return report

    loop.Trainer.one_step = one_step


def inject_kill_in_checkpoint(n: int) -> None:
    from latentae.training import state

    original = state.write_checkpoint

    def write_checkpoint(output_dir, step, writers, manifest, **kw):
        if step == n:
            names = list(writers)
            cut = max(len(names) // 2, 1)  # the first files get written, then the process dies
            writers = {name: (_die if i == cut else writers[name]) for i, name in enumerate(names)}
        return original(output_dir, step, writers, manifest, **kw)

    state.write_checkpoint = write_checkpoint


def inject_in_step(n: int, action, patch=setattr) -> None:
    """``action()`` inside optimizer step ``n`` (1-based), after the step's work, before agree().
    ``patch``: how ``loop.train_step`` is replaced (a test passes ``monkeypatch.setattr``)."""
    from latentae.training import loop

    original = loop.train_step

    def train_step(parts, cfg, step, batches):
        out = original(parts, cfg, step, batches)
        if step + 1 == n:
            action()
        return out

    patch(loop, "train_step", train_step)


def inject_signal_in_step(spec: str) -> None:
    n, _, name = spec.partition(":")
    signum = getattr(signal, name or "SIGTERM")

    def send():
        _note(f"{signal.Signals(signum).name} in step {n}")
        os.kill(os.getpid(), signum)

    inject_in_step(int(n), send)


def inject_raise_in_step(n: int) -> None:
    def fail():
        _note(f"failure in step {n}")
        raise RuntimeError(f"injected failure in step {n} on rank {os.environ.get('RANK', '0')}")

    inject_in_step(n, fail)


def inject_raise_in(what: str) -> None:
    from latentae.training import loop, state

    module, name = {"validation": (loop, "validate"), "export": (loop, "export"),
                    "checkpoint": (state, "write_checkpoint")}[what]  # fmt: skip

    def fail(*args, **kw):
        _note(f"failure in {what}")
        raise RuntimeError(f"injected failure in {what}")

    setattr(module, name, fail)


def inject_stale_checkpoint_view(step: int) -> None:
    from latentae.training import state

    original = state.manifest_digest

    def manifest_digest(path):
        return original(Path(path).parent / f"step-{step:09d}")

    state.manifest_digest = manifest_digest


def inject_stale_file_list() -> None:
    import numpy as np

    from latentae.data.filelist import FileList

    original = FileList.open.__func__

    def open_(cls, path, *, verify=True):
        fl = original(cls, path, verify=verify)
        offsets = np.asarray(fl.offsets)[:-1]  # the last file is missing from this node's copy
        return FileList(offsets, np.asarray(fl.blob)[: int(offsets[-1])], root=fl.root)

    FileList.open = classmethod(open_)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kill-after-step", type=int)
    p.add_argument("--kill-in-checkpoint", type=int)
    p.add_argument("--signal-in-step", metavar="N[:SIG]")
    p.add_argument("--raise-in-step", type=int)
    p.add_argument("--raise-in", choices=("validation", "export", "checkpoint"))
    p.add_argument("--stale-checkpoint-view", type=int, metavar="STEP")
    p.add_argument("--stale-file-list", action="store_true")
    p.add_argument("--only-rank", type=int)
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then train/train.py's arguments")
    args = p.parse_args(argv)
    rest = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if args.only_rank is None or args.only_rank == int(os.environ.get("RANK", "0")):
        if args.kill_after_step is not None:
            inject_kill_after_step(args.kill_after_step)
        if args.kill_in_checkpoint is not None:
            inject_kill_in_checkpoint(args.kill_in_checkpoint)
        if args.signal_in_step is not None:
            inject_signal_in_step(args.signal_in_step)
        if args.raise_in_step is not None:
            inject_raise_in_step(args.raise_in_step)
        if args.raise_in is not None:
            inject_raise_in(args.raise_in)
        if args.stale_checkpoint_view is not None:
            inject_stale_checkpoint_view(args.stale_checkpoint_view)
        if args.stale_file_list:
            inject_stale_file_list()
    spec = importlib.util.spec_from_file_location("latentae_train_cli", REPO / "train" / "train.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli.main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
