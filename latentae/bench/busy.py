"""Training step time on a busy machine: idle vs one core kept busy, before vs after.

    latentae bench busy                          # the demo's training, 2 rounds, ~3 min on 2 cores
    latentae bench busy --steps 5 --rounds 1     # a quick check
    python tools/bench_busy.py ...               # the same, from a checkout

Trains the demo's recipe (`latentae demo`: tiny-f8c16, random 64 px crops of the bundled
photos, batch 8, one data worker; the first steps of its 800) in a fresh child process per
measurement, with another process keeping one core busy:

  idle        nothing else started by the benchmark (whatever else runs on the machine does)
  busy loop   `python -c "while True: pass"` (one core)
  torch job   a second torch process convolving in a loop on one thread (one core)

for each variant of the process setup (``--variants``; WAIT:THREADS, or the two names):

  before = default:torch    what the entry points did before: OpenMP's default spinning
                            wait, torch's default thread count (one per core)
  after  = passive:rule     what `latentae train` / `latentae demo` do now:
                            OMP_WAIT_POLICY=PASSIVE set before torch loads, and
                            latentae.runtime.torch_threads (room for the data worker)
  e.g. passive:2, default:1 other combinations, to see which part does what

Loads and variants are interleaved (per round: each load, and under it every variant),
so slow drift of the machine hits them alike. Printed: median seconds per step of each
cell, each cell divided by the idle median of the same variant (the slowdown a busy
core causes; the goal is <= 2x) and by the idle median of `before` (what a user sees).
The environment's OMP_WAIT_POLICY / OMP_NUM_THREADS are removed for the children.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from latentae.bench import child_env
from latentae.cli.common import Parser, fail, positive_int

LOADS = {
    "idle": None,
    "busy loop": "while True: pass",
    "torch job": (
        "import torch\n"
        "torch.set_num_threads(1)\n"
        "x, w = torch.randn(1, 32, 96, 96), torch.randn(32, 32, 3, 3)\n"
        "print('ready', flush=True)\n"
        "while True:\n"
        "    torch.nn.functional.conv2d(x, w, padding=1)\n"
    ),
}
NAMED = {"before": ("default", "torch"), "after": ("passive", "rule")}


def parse_variant(text: str) -> tuple[str, str]:
    if text in NAMED:
        return NAMED[text]
    wait, _, threads = text.partition(":")
    if wait not in ("default", "passive") or not (threads in ("torch", "rule") or threads.isdigit() and int(threads) > 0):
        raise argparse.ArgumentTypeError(f"a variant is before, after or WAIT:THREADS (WAIT default|passive, "
                                         f"THREADS torch|rule|N), got {text!r}")
    return wait, threads


def variant_arg(text: str) -> str:
    parse_variant(text)  # argparse reports a bad one as a usage error
    return text


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=__doc__)
    p.add_argument("--steps", type=positive_int, default=10, help="timed steps per measurement (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--rounds", type=positive_int, default=2, help="repetitions of the whole grid (default 2)")
    p.add_argument("--variants", nargs="+", type=variant_arg, default=["before", "after"], metavar="VARIANT",
                   help="process setups to compare (default: before after; see above)")
    p.add_argument("--loads", nargs="+", default=list(LOADS), choices=list(LOADS), metavar="LOAD",
                   help=f"which loads (default: all of {', '.join(LOADS)})")
    p.add_argument("--child", nargs=2, metavar=("WAIT", "THREADS"), help=argparse.SUPPRESS)  # internal
    p.add_argument("--data", help=argparse.SUPPRESS)  # internal: the photos folder
    return p


# ----------------------------------------------------------------------------- one measurement


def child(wait: str, threads: str, data: Path, steps: int, warmup: int) -> dict:
    """Runs in a fresh process: the process setup of the variant, then the demo's first steps."""
    from latentae import runtime

    if wait == "passive":
        runtime.prefer_passive_waiting()  # what the entry points call, before torch loads
    import torch

    from latentae.cli.demo import DEFAULT_CONFIG, demo_overrides
    from latentae.recipe import load_config
    from latentae.training.loop import Trainer

    cfg = load_config(DEFAULT_CONFIG, [*demo_overrides(data, 800), "train.num_val_images=0", "train.log_every=1000"])
    if threads == "rule":
        runtime.configure_threads(cfg.data.num_workers)  # what `latentae train` / `latentae demo` call
    elif threads != "torch":
        torch.set_num_threads(int(threads))
    with tempfile.TemporaryDirectory(prefix="bench_busy_") as out:
        trainer = Trainer(cfg, Path(out) / "run")
        trainer.batches = iter(trainer.parts.loader)
        for _ in range(warmup):
            trainer.one_step()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            trainer.one_step()
            times.append(time.perf_counter() - t0)
        return {"times": times, "threads": torch.get_num_threads(), "workers": cfg.data.num_workers,
                "wait": os.environ.get("OMP_WAIT_POLICY", "unset")}


def _start_load(name: str) -> subprocess.Popen | None:
    code = LOADS[name]
    if code is None:
        return None
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env)
    if "torch" in code:
        proc.stdout.readline()  # "ready": imported and running
    time.sleep(0.5)
    return proc


def _measure(wait: str, threads: str, data: Path, args) -> dict:
    env = child_env({k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")})
    env["PYTHONWARNINGS"] = "ignore"
    cmd = [sys.executable, "-m", "latentae.bench.busy", "--child", wait, threads, "--data", str(data),
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement {wait}:{threads} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the grid


def run(args) -> int:
    from latentae.cli.demo import write_sample_photos

    variants = [(v, parse_variant(v)) for v in args.variants]
    loads = [name for name in LOADS if name in args.loads]
    if "idle" not in loads:
        loads.insert(0, "idle")  # the reference of every ratio
    with tempfile.TemporaryDirectory(prefix="bench_busy_data_") as tmp:
        data = Path(tmp) / "photos"
        write_sample_photos(data)
        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; demo recipe, "
              f"{args.steps} timed steps after {args.warmup}, {args.rounds} round(s)", flush=True)
        results: dict[tuple[str, str], list[float]] = {}
        setup: dict[str, str] = {}
        for r in range(args.rounds):
            for load in loads:
                proc = _start_load(load)
                try:
                    for name, (wait, threads) in variants:
                        res = _measure(wait, threads, data, args)
                        med = statistics.median(res["times"])
                        results.setdefault((load, name), []).append(med)
                        setup[name] = f"OMP_WAIT_POLICY={res['wait']}, {res['threads']} torch thread(s), {res['workers']} worker(s)"
                        print(f"round {r + 1}  {load:<10} {name:<14} {med:7.3f} s/step", flush=True)
                finally:
                    if proc is not None:
                        proc.kill()
                        proc.wait()
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    for name, _ in variants:
        print(f"  {name:<14} {setup[name]}")
    med = {k: statistics.median(v) for k, v in results.items()}
    ref = variants[0][0]
    head = f"{'load':<10} " + " ".join(f"{name:>14}" for name, _ in variants)
    print("\nmedian seconds per step")
    print(head)
    for load in loads:
        print(f"{load:<10} " + " ".join(f"{med[(load, name)]:14.3f}" for name, _ in variants))
    print("\nslowdown vs the same variant idle (goal <= 2x)")
    print(head)
    for load in loads:
        print(f"{load:<10} " + " ".join(f"{med[(load, name)] / med[('idle', name)]:13.2f}x" for name, _ in variants))
    print(f"\nvs {ref} idle (what a user sees)")
    print(head)
    for load in loads:
        print(f"{load:<10} " + " ".join(f"{med[(load, name)] / med[('idle', ref)]:13.2f}x" for name, _ in variants))
    return 0


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.child:
        wait, threads = args.child
        res = child(wait, threads, Path(args.data), args.steps, args.warmup)
        print(json.dumps(res), flush=True)
        os._exit(0)  # data workers and trackers: no orderly teardown needed for a measurement
    try:
        return run(args)
    except RuntimeError as e:
        return fail(e, 1)


if __name__ == "__main__":
    sys.exit(main(prog="python -m latentae.bench.busy"))
