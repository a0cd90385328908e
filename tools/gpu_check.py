#!/usr/bin/env python
"""The GPU check: the GPU-relevant tests and tools/bench.py on one CUDA GPU, one table at the end.

  python tools/gpu_check.py                  # on a CUDA machine: < 8 min, writes gpu_check/ (log, JSON)
  python tools/gpu_check.py --cpu-smoke      # the same steps on the CPU, tiny model, 64 px: checks this script

Steps, each in its own process with its own timeout (a step that fails or times out is
reported and the next one runs; the whole run stops starting steps at --budget seconds):
  env         torch / CUDA / GPU, compute capability, what bf16 does there
  bench-f8c4  tools/bench.py, SD-size f8c4 at 1024 px, batch 1: ours fp32, bf16, fp16,
              without channels-last, each beside diffusers.AutoencoderKL eager (fp32, and in
              the same dtype for bf16/fp16); outputs compared; peak GPU memory per call
  bench-f8c16 the same for SD3/FLUX-size f8c16
  tests       pytest tests/test_devices.py tests/test_precision.py (on the GPU when there is one)
  compile     tools/bench.py --compile: ours under torch.compile (inductor, bf16), f8c4 1024 px;
              the first call includes compiling
Everything a step prints goes to OUT/gpu_check.log; bench rows to OUT/bench-*.json. The
table at the end is built from whatever finished.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def steps(args) -> list[tuple[str, list[str], int]]:
    """(name, command, timeout s), in order of importance."""
    out = args.out
    if args.cpu_smoke:
        dev, archs, size, reps = "cpu", ["tiny-f8c4"], "64", "1"
        extra = ["--compile-backend", "eager", "--no-memory"]
    else:
        dev, archs, size, reps, extra = "cuda", ["f8c4", "f8c16"], "1024", "5", []
    bench = [PY, str(ROOT / "tools" / "bench.py"), "--device", dev, "--size", size, "--batch", "1", "--repeats", reps]
    env_code = (
        "import torch, platform; from latentae.precision import cuda_capability, resolve_compute_dtype as r\n"
        "print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda)\n"
        "d = torch.device('cuda' if torch.cuda.is_available() else 'cpu'); cap = cuda_capability(d)\n"
        "print('device', torch.cuda.get_device_name(d) if cap else 'cpu', 'capability', cap)\n"
        "try: print('bf16 compute on this device:', r(torch.float32, d.type, 'bfloat16', cuda_capability=cap))\n"
        "except ValueError as e: print('bf16 compute refused:', e)\n"
    )
    out_steps = [("env", [PY, "-c", env_code], 60)]
    for arch in archs:
        out_steps.append((f"bench-{arch}", bench + ["--arch", arch, "--bf16", "--fp16", "--channels-last-ab",
                                                   "--json", str(out / f"bench-{arch}.json")] + extra, 150))
    tests = [str(ROOT / "tests" / "test_devices.py"), str(ROOT / "tests" / "test_precision.py")]
    out_steps.append(("tests", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], 120))
    out_steps.append(("compile", bench + ["--arch", archs[0], "--compile", "--compile-dtype", "bfloat16",
                                         "--no-memory", "--json", str(out / "bench-compile.json")] + extra, 200))
    return out_steps


def run_step(name: str, cmd: list[str], timeout: float, log) -> dict:
    """Run one step, its output into the log (and a tail kept); never raises."""
    log.write(f"\n===== {name}: {' '.join(cmd)} (timeout {timeout:.0f}s)\n")
    log.flush()
    t0 = time.time()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=timeout)
        text, status = p.stdout, ("ok" if p.returncode == 0 else f"failed (exit {p.returncode})")
    except subprocess.TimeoutExpired as e:
        text = (e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout) or ""
        status = f"timeout ({timeout:.0f}s)"
    except OSError as e:
        text, status = str(e), "failed to start"
    log.write(text)
    log.write(f"===== {name}: {status} in {time.time() - t0:.0f}s\n")
    log.flush()
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return {"step": name, "status": status, "seconds": time.time() - t0, "last": lines[-1] if lines else ""}


def bench_table(out: Path, names: list[str]) -> list[str]:
    """One line per bench row from the steps' bench-*.json files that exist."""
    head = (f"{'arch':9} {'op':6} {'variant':14} {'ran in':9} {'img/s':>8} {'x diff32':>8} {'x same':>7} "
            f"{'max|d|':>8} {'MB o/d':>11} {'1st s':>6}  fp32 parts")
    lines = [head, "-" * len(head)]
    for path in [out / f"{n}.json" for n in names if (out / f"{n}.json").exists()]:
        try:
            rows = json.loads(path.read_text())["rows"]
        except (OSError, ValueError, KeyError) as e:
            lines.append(f"{path.name}: unreadable ({e})")
            continue
        for r in rows:
            main = r.get("variant", "ours") == "ours"
            ips = r["ours_ips"] if main else r["ips"]
            same = r.get("speedup_same_dtype")
            mem = f"{r['ours_peak_mb']:.0f}/{r['diffusers_peak_mb']:.0f}" if main else ""
            first = f"{r['first_call_s']:.1f}" if "first_call_s" in r else "-"
            prec = r.get("precision", {})
            lines.append(
                f"{r['arch']:9} {r['op']:6} {r.get('variant', 'ours'):14} {prec.get('compute_dtype', '?'):9} "
                f"{ips:8.2f} {r['speedup']:7.2f}x {(f'{same:.2f}x' if same else '-'):>7} {r['max_abs_diff']:8.1e} "
                f"{mem:>11} {first:>6}  {','.join(prec.get('upcast_to_float32', []))}"
            )
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "gpu_check", help="folder for the log and JSON (created)")
    p.add_argument("--cpu-smoke", action="store_true", help="run every step on the CPU with a tiny model")
    p.add_argument("--budget", type=float, default=450, help="seconds: no step starts after this (default 7.5 min)")
    p.add_argument("--steps", nargs="+", default=None,
                   help="only these steps (env, bench-f8c4, bench-f8c16 - bench-tiny-f8c4 with --cpu-smoke -, tests, compile)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("bench-*.json"):
        old.unlink()  # a table only from this run
    start, results = time.time(), []
    plan = [s for s in steps(args) if args.steps is None or s[0] in args.steps]
    unknown = set(args.steps or ()) - {name for name, _, _ in steps(args)}
    if unknown:
        p.error(f"unknown steps {sorted(unknown)}; the steps are {[name for name, _, _ in steps(args)]}")
    with open(args.out / "gpu_check.log", "w") as log:
        for name, cmd, timeout in plan:
            left = args.budget - (time.time() - start)
            if left < 20:
                results.append({"step": name, "status": "skipped (budget)", "seconds": 0.0, "last": ""})
                continue
            r = run_step(name, cmd, min(timeout, left), log)
            results.append(r)
            print(f"[{time.time() - start:5.0f}s] {name}: {r['status']} ({r['seconds']:.0f}s) {r['last'][:100]}",
                  flush=True)
        table = [f"{'step':16} {'status':22} {'s':>5}  last line"]
        table += [f"{r['step']:16} {r['status']:22} {r['seconds']:5.0f}  {r['last'][:90]}" for r in results]
        table += [""] + bench_table(args.out, [name.replace("compile", "bench-compile") for name, _, _ in plan])
        note = ("x diff32: speed vs diffusers eager fp32; x same: vs diffusers eager in the same dtype; max|d|: vs "
                "diffusers fp32 output; MB o/d: peak memory of a call, ours/diffusers; 1st s: first call (compile)")
        text = "\n".join(table + ["", note, f"total {time.time() - start:.0f}s; log: {args.out / 'gpu_check.log'}"])
        log.write("\n" + text + "\n")
    print("\n" + text)
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
