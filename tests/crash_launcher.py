"""Run train/train.py with a SIGKILL injected at a chosen moment (for the crash tests).

    python tests/crash_launcher.py --kill-after-step 5 -- --config c.yaml --output-dir out ...
    python tests/crash_launcher.py --kill-in-checkpoint 4 -- --config c.yaml --output-dir out ...

--kill-after-step N      right after optimizer step N is done (agreed by all ranks), before
                         anything else happens at that step (no log, no checkpoint)
--kill-in-checkpoint N   halfway through writing the files of checkpoint step N: some files
                         are written, the manifest is not, nothing is renamed into place

The kill is injected here, by monkeypatching the real trainer in this process before
calling the real entry point; the library has no kill switch a production run could trip.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kill-after-step", type=int)
    p.add_argument("--kill-in-checkpoint", type=int)
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then train/train.py's arguments")
    args = p.parse_args(argv)
    rest = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if args.kill_after_step is not None:
        inject_kill_after_step(args.kill_after_step)
    if args.kill_in_checkpoint is not None:
        inject_kill_in_checkpoint(args.kill_in_checkpoint)
    spec = importlib.util.spec_from_file_location("latentae_train_cli", REPO / "train" / "train.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli.main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
