"""latentae's fast inference path vs diffusers.AutoencoderKL (eager), same weights, same inputs.

  latentae bench inference                                    # full: f8c4+f8c16, 256+512 px, batch 1+4
  latentae bench inference --arch f8c4 --size 256 --batch 1   # quick (~1 min on 2 cores)
  latentae bench inference --device cuda --size 1024 --batch 1 --bf16 --fp16 --compile --compile-dtype bfloat16 \
      --channels-last-ab                                   # the GPU table (tools/gpu_check.py runs this)

For each architecture (SD-size: widths 128/256/512/512, 2 resnets per level, mid attention;
f8c4 with the 1x1 quant convs, f8c16 without), operation, size and batch it prints:
  * images/s of ours and of diffusers, timed round-robin in this one process (so that load
    from other processes hits both alike), medians of --repeats, and their ratio;
  * max |ours - diffusers| of the outputs (decode: images; encode: posterior mean and std);
  * GFLOP per image of the plain algorithm (2 x multiply-adds, counted by torch's
    FlopCounterMode), achieved GFLOP/s = that / time, and the percentage of a measured
    big-3x3-conv ceiling of this machine. Ours can pass 100 %: the sub-pixel upsampler
    does 2.25x less work than the plain algorithm that the count assumes;
  * peak extra resident memory of a call, measured in a fresh child process per
    configuration (kernel high-water mark reset before the call; --no-memory skips
    it): the second call, and for ours also the first, which builds the derived-weight
    caches (Winograd and sub-pixel kernels, ~1.3x the weights, kept); with
    --device cuda, torch's peak GPU allocation during the call instead.
Variants (each timed round-robin against diffusers fp32 eager, and the half-precision ones
also against diffusers eager in the same dtype): --bf16 / --fp16 (ours computing in that
dtype from fp32 weights), --compile (ours under torch.compile, --compile-dtype), and
--channels-last-ab (ours in the other memory layout than the device default: NCHW on CPU,
NHWC on CUDA). Every row records the dtype that
actually ran (latentae.precision.precision_record), including parts moved to fp32 after
an fp16 overflow.
Weights are random (PyTorch default init, same as diffusers), seeded.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


import torch

from latentae.bench import child_env
from latentae.cli.common import Parser

from latentae.benchmarking import PeakRSS, conv_flops, conv_peak_gflops, interleaved_medians
from latentae.fast import FastConfig, optimize_for_inference, use_channels_last
from latentae.io import diffusers_config
from latentae.model import ModelConfig, build_vae
from latentae.precision import DTYPES, precision_record

ARCHS = {
    "f8c4": ModelConfig(latent_channels=4, use_quant_conv=True, use_post_quant_conv=True),
    "f8c16": ModelConfig(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False),
    # CPU-sized (configs/tiny-f8c4.yaml): for smoke runs of this script, not for numbers.
    "tiny-f8c4": ModelConfig(latent_channels=4, block_out_channels=(16, 32, 64, 64), layers_per_block=1,
                             norm_num_groups=8),
}


def diffusers_vae(cfg: ModelConfig):
    from diffusers import AutoencoderKL

    kw = {k: v for k, v in diffusers_config(cfg).items() if not k.startswith("_")}
    return AutoencoderKL(**kw).eval()


def models(arch: str, fast: FastConfig, seed: int = 0, which=("ours", "diffusers")):
    """(ours, diffusers) with identical weights; either may be None if not asked for."""
    torch.manual_seed(seed)
    cfg = ARCHS[arch]
    d = diffusers_vae(cfg) if "diffusers" in which else None
    ours = None
    if "ours" in which:
        ours = build_vae(cfg).eval()
        if d is not None:
            ours.load_state_dict(d.state_dict())
        optimize_for_inference(ours, fast)
    return ours, d


def inputs(arch: str, op: str, size: int, batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if op == "decode":
        c = ARCHS[arch].latent_channels
        return torch.randn(batch, c, size // 8, size // 8, generator=g)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


def call(model, op: str, x: torch.Tensor, impl: str) -> torch.Tensor:
    """One encode/decode; returns the output(s) as one tensor (encode: mean and std stacked).
    The input is cast to the model's weight dtype (diffusers in half precision needs that)."""
    x = x.to(next(model.parameters()).dtype)
    out = _call(model, op, x, impl)
    if x.is_cuda:
        torch.cuda.synchronize()  # time the work, not the launch
    return out


def _call(model, op: str, x: torch.Tensor, impl: str) -> torch.Tensor:
    if impl == "diffusers":
        if op == "decode":
            return model.decode(x).sample
        dist = model.encode(x).latent_dist
        return torch.stack([dist.mean, dist.std])
    if op == "decode":
        return model.decode(x)
    post = model.encode(x)
    return torch.stack([post.mean, post.std])


def fast_config(args, **over) -> FastConfig:
    kw = dict(
        channels_last=False if args.no_channels_last else None,  # None: the library's device default
        channels_last_max_width=args.channels_last_max_width,
        subpixel_upsample=not args.no_subpixel,
        compute_dtype=None if args.compute_dtype == "model" else args.compute_dtype,
    )
    kw.update(over)
    return FastConfig(**kw)


def child_memory(args) -> None:
    """In a fresh process: peak extra RSS of ONE call (after model and input exist)."""
    arch, op, size, batch, impl = args.child_memory
    size, batch = int(size), int(batch)
    ours, d = models(arch, fast_config(args), which=(impl,))
    model = ours if impl == "ours" else d
    x = inputs(arch, op, size, batch)
    with torch.no_grad(), PeakRSS() as first:
        call(model, op, x, impl)
    with torch.no_grad(), PeakRSS() as steady:
        call(model, op, x, impl)
    print(json.dumps({"first": first.peak_bytes, "steady": steady.peak_bytes, "exact": first.exact}))


def peak_memory(args, arch, op, size, batch, impl) -> tuple[float, float, bool]:
    """(steady, first) peak extra MiB of a call in a fresh process: the first call also
    builds ours' derived-weight caches (Winograd / sub-pixel kernels), kept afterwards."""
    cmd = [sys.executable, "-m", "latentae.bench.inference", "--child-memory", arch, op, str(size), str(batch), impl]
    cmd += ["--threads", str(torch.get_num_threads())]
    if args.no_channels_last:
        cmd.append("--no-channels-last")
    if args.no_subpixel:
        cmd.append("--no-subpixel")
    if args.channels_last_max_width is not None:
        cmd += ["--channels-last-max-width", str(args.channels_last_max_width)]
    cmd += ["--compute-dtype", args.compute_dtype]
    env = child_env()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory child failed: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["steady"] / 2**20, r["first"] / 2**20, r["exact"]


def cuda_peak_memory(model, op, x, impl) -> tuple[float, bool]:
    """GPU: peak allocated by torch during one call, above what was allocated before (MiB)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        call(model, op, x, impl)
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    return peak, peak, True


def variant_models(args, arch: str, d, dev) -> dict:
    """name -> (ours variant, diffusers in the variant's half dtype or None), same weights as ``d``."""

    def ours(**over):
        m = models(arch, fast_config(args, **over), which=("ours",))[0]
        m.load_state_dict(d.state_dict())
        return m.to(dev)

    def diffusers_in(dtype):
        h = diffusers_vae(ARCHS[arch])
        h.load_state_dict(d.state_dict())
        return h.to(dev, dtype)

    out = {}
    for flag, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
        if getattr(args, flag):
            out[f"ours-{flag}"] = (ours(compute_dtype=dtype), diffusers_in(DTYPES[dtype]))
    if args.compile:
        dt = None if args.compile_dtype == "float32" else args.compile_dtype
        out["ours-compiled"] = (ours(compute_dtype=dt, compile_backend=args.compile_backend),
                                diffusers_in(DTYPES[args.compile_dtype]) if dt else None)
    if args.channels_last_ab:  # the other memory layout than this device's default
        nhwc = not use_channels_last(None, dev.type)
        out["ours-nhwc" if nhwc else "ours-nchw"] = (ours(channels_last=nhwc), None)
    return out


def time_variant(args, name: str, m, half_d, d, op: str, x: torch.Tensor, ref: torch.Tensor, batch: int) -> dict:
    """A variant timed round-robin with diffusers fp32 (and diffusers in its dtype, if given)."""
    with torch.no_grad():
        t0 = time.perf_counter()
        v = call(m, op, x, "ours")  # first call: includes compiling / finding fp16 overflows
        first = time.perf_counter() - t0
        contenders = {name: lambda: call(m, op, x, "ours"), "diffusers": lambda: call(d, op, x, "diffusers")}
        if half_d is not None:
            call(half_d, op, x, "diffusers")
            contenders["diffusers-same-dtype"] = lambda: call(half_d, op, x, "diffusers")
        t = interleaved_medians(contenders, args.repeats)
    rec = precision_record(m)
    row = dict(variant=name, ips=batch / t[name], speedup=t["diffusers"] / t[name], dtype=rec["compute_dtype"],
               max_abs_diff=(v.float() - ref.float()).abs().max().item(), first_call_s=first, precision=rec)
    if half_d is not None:
        row["speedup_same_dtype"] = t["diffusers-same-dtype"] / t[name]
        row["diffusers_same_dtype_ips"] = batch / t["diffusers-same-dtype"]
    return row


def load_average() -> str:
    try:
        return "%.1f %.1f %.1f" % os.getloadavg()
    except OSError:
        return "?"


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = Parser(prog=prog, description=__doc__)
    p.add_argument("--arch", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--op", nargs="+", default=["decode", "encode"], choices=["decode", "encode"])
    p.add_argument("--size", nargs="+", type=int, default=[256, 512], help="image side, px (multiple of 8)")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    p.add_argument("--repeats", type=int, default=5, help="timed calls per contender (after one warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (GPU memory: torch's peak allocation)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-call peak memory children")
    p.add_argument("--bf16", action="store_true", help="also time ours with compute_dtype=bfloat16 (+ diffusers bf16)")
    p.add_argument("--fp16", action="store_true", help="also time ours with compute_dtype=float16 (+ diffusers fp16)")
    p.add_argument("--compile", action="store_true", help="also time ours under torch.compile")
    p.add_argument("--compile-dtype", default="float32", choices=list(DTYPES), help="compute dtype of --compile")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend ('eager' for smoke runs)")
    p.add_argument("--channels-last-ab", action="store_true",
                   help="also time ours in the other memory layout (CPU default NHWC, CUDA default NCHW)")
    p.add_argument("--no-channels-last", action="store_true", help="fast path without NHWC (for A/B)")
    p.add_argument("--channels-last-max-width", type=int, default=None, help="NHWC only up to this width")
    p.add_argument("--no-subpixel", action="store_true", help="fast path without the sub-pixel upsampler")
    p.add_argument("--compute-dtype", default="model", choices=["model", "float32", "bfloat16", "float16"],
                   help="ours' compute dtype (model: the weights' dtype, fp32)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--child-memory", nargs=5, metavar=("ARCH", "OP", "SIZE", "BATCH", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_memory:
        child_memory(args)
        return 0
    for s in args.size:
        if s % 8:
            p.error(f"--size {s} is not a multiple of 8")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load_average()}, {args.device}")
    dev = torch.device(args.device)
    peak0 = conv_peak_gflops(device=args.device)
    print(f"conv ceiling (3x3, 512->512 ch, 64x64, best of NCHW/NHWC): {peak0:.0f} GFLOP/s")
    fast = fast_config(args)
    print(f"ours: {fast}")
    rows = []
    hdr = (
        f"{'arch':6} {'op':6} {'px':>4} {'b':>2} | {'ours/s':>7} {'diff/s':>7} {'ratio':>6} | {'max|d|':>8} | "
        f"{'GFLOP':>6} {'ours GF/s':>9} {'diff GF/s':>9} {'%ceil o/d':>10} | {'MB ours 2nd/1st':>15} {'MB diff':>8}"
    )
    print(hdr + "\n" + "-" * len(hdr))

    def dump(peak1=None):  # after every row: a run cut short (a timeout) keeps what it measured
        if args.json:
            args.json.write_text(json.dumps({"conv_ceiling_gflops": [peak0, peak1], "rows": rows}, indent=1))

    for arch in args.arch:
        ours, d = (m.to(dev) for m in models(arch, fast))
        variants = variant_models(args, arch, d, dev)
        for op in args.op:
            flops = conv_flops(ours, op, 256)  # per image at 256 px; scales with area
            for size in args.size:
                gflop = flops * (size / 256) ** 2 / 1e9
                for batch in args.batch:
                    x = inputs(arch, op, size, batch).to(dev)
                    with torch.no_grad():
                        a, b = call(ours, op, x, "ours"), call(d, op, x, "diffusers")  # warm-up + outputs
                        diff = (a - b).abs().max().item()
                        contenders = {
                            "ours": lambda: call(ours, op, x, "ours"),
                            "diffusers": lambda: call(d, op, x, "diffusers"),
                        }
                        t = interleaved_medians(contenders, args.repeats)
                    mem = {"ours": (float("nan"),) * 2 + (True,), "diffusers": (float("nan"),) * 2 + (True,)}
                    if not args.no_memory and dev.type == "cuda":
                        mem = {k: cuda_peak_memory(m, op, x, k) for k, m in (("ours", ours), ("diffusers", d))}
                    elif not args.no_memory:
                        mem = {k: peak_memory(args, arch, op, size, batch, k) for k in mem}
                    ips = {k: batch / v for k, v in t.items()}
                    gfs = {k: gflop * batch / v for k, v in t.items()}
                    row = dict(
                        arch=arch, op=op, size=size, batch=batch, ours_ips=ips["ours"], diffusers_ips=ips["diffusers"],
                        speedup=t["diffusers"] / t["ours"], max_abs_diff=diff, gflop_per_image=gflop,
                        ours_gflops=gfs["ours"], diffusers_gflops=gfs["diffusers"], conv_ceiling_gflops=peak0,
                        ours_peak_mb=mem["ours"][0], diffusers_peak_mb=mem["diffusers"][0],
                        ours_first_call_peak_mb=mem["ours"][1], diffusers_first_call_peak_mb=mem["diffusers"][1],
                        memory_exact=mem["ours"][2] and mem["diffusers"][2], load=load_average(),
                        variant="ours", precision=precision_record(ours),
                    )
                    rows.append(row)
                    dump()
                    print(
                        f"{arch:6} {op:6} {size:4} {batch:2} | {ips['ours']:7.3f} {ips['diffusers']:7.3f} "
                        f"{row['speedup']:5.2f}x | {diff:8.1e} | "
                        f"{gflop:6.0f} {gfs['ours']:9.0f} {gfs['diffusers']:9.0f} "
                        f"{100 * gfs['ours'] / peak0:4.0f}/{100 * gfs['diffusers'] / peak0:<4.0f}% | "
                        f"{mem['ours'][0]:6.0f}/{mem['ours'][1]:<6.0f} {mem['diffusers'][0]:8.0f}",
                        flush=True,
                    )
                    for name, (m, half_d) in variants.items():
                        row = time_variant(args, name, m, half_d, d, op, x, b, batch)
                        row.update(arch=arch, op=op, size=size, batch=batch)
                        rows.append(row)
                        dump()
                        print(
                            f"  {name:14} {arch} {op} {size}px b{batch}: {row['ips']:.3f} img/s, "
                            f"{row['speedup']:.2f}x diffusers fp32"
                            + (f", {row['speedup_same_dtype']:.2f}x diffusers {row['dtype']}"
                               if row.get("speedup_same_dtype") else "")
                            + f" (same run), max|d| vs diffusers fp32 {row['max_abs_diff']:.1e}, "
                            f"first call {row['first_call_s']:.1f}s, ran in {row['precision']['compute_dtype']}"
                            + (f" (fp32: {', '.join(row['precision']['upcast_to_float32'])})"
                               if row["precision"]["upcast_to_float32"] else ""),
                            flush=True,
                        )
        del ours, d, variants
    peak1 = conv_peak_gflops(device=args.device)
    print(f"conv ceiling again at the end: {peak1:.0f} GFLOP/s; load average {load_average()}")
    if not args.no_memory:
        print("memory: peak extra RSS of a call in a fresh process (ours: 2nd call / 1st call, which also builds the "
              "derived-weight caches that stay; diffusers: 2nd call)" +
              ("" if all(r.get("memory_exact", True) for r in rows) else " (LOWER BOUND: hwm reset refused)"))
    dump(peak1)
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m latentae.bench.inference"))
