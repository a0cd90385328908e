"""Measuring helpers for the benchmarks (``tools/bench*.py``), not used by the library itself.

* ``conv_flops``: multiply-adds x 2 of the plain forward (torch's FlopCounterMode on a meta twin);
* ``PeakRSS``: peak extra resident memory of a block of code (Linux), in a fresh process;
* ``interleaved_medians``: round-robin timing of contenders, robust to a loaded machine;
* ``conv_peak_gflops``: a measured 3x3-conv ceiling of the machine.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from latentae.model import AutoencoderKL


def conv_flops(vae: AutoencoderKL, what: Literal["encode", "decode"], size: int) -> float:
    """Multiply-adds x 2 of the plain forward for one ``size`` x ``size`` image (for GFLOP/s)."""
    from torch.utils.flop_counter import FlopCounterMode

    f = vae.config.downsample_factor
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        meta = torch.device("meta")
        if what == "decode":
            z = torch.zeros(1, vae.config.latent_channels, math.ceil(size / f), math.ceil(size / f), device=meta)
            _meta_forward(vae, "decode", z)
        else:
            _meta_forward(vae, "encode", torch.zeros(1, vae.config.in_channels, size, size, device=meta))
    return float(counter.get_total_flops())


def _meta_forward(vae: AutoencoderKL, what: str, x: torch.Tensor) -> None:
    """Run the plain forward of a meta-device twin (no memory, no time)."""
    with torch.device("meta"):
        twin = AutoencoderKL(vae.config)
    getattr(twin, what)(x)


# CPU memory: tracemalloc does not see torch's allocations, so we read the kernel's
# resident-set high-water mark.


class PeakRSS:
    """Peak extra resident memory (bytes) of the code inside ``with``, Linux only.

    Three witnesses, the largest wins (each one can only under-report):
    1. the kernel's high-water mark: reset on entry (``/proc/self/clear_refs`` = 5),
       ``VmHWM`` - ``VmRSS``(entry) on exit; ``exact`` says the reset was accepted;
    2. ``ru_maxrss`` growth, which only sees a peak above the process's earlier ones
       (so: run it in a fresh process, as the benchmarks do);
    3. ``VmRSS`` polled every ``poll_s`` by a thread, for sandboxes that refuse (1).
    Memory the allocator kept from earlier calls is reused unseen by all three.
    ``reset=False`` skips (1), to test the fallbacks. ``where=True``: ``self.where`` is the
    entering thread's stack (innermost frames of this package) at the highest polled RSS,
    to find which layer holds the peak.
    """

    def __init__(self, reset: bool = True, poll_s: float = 0.001, where: bool = False):
        self.reset, self.poll_s, self.want_where = reset, poll_s, where
        self.where = ""

    def __enter__(self):
        import threading

        self.exact = False
        if self.reset:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.exact = True
            except OSError:
                pass
        self.start = _status_kb("VmRSS") * 1024
        if self.exact:  # a reset that was accepted but ignored would report an old peak
            self.exact = _status_kb("VmHWM") * 1024 <= self.start + (16 << 20)
        self.start_max = _maxrss_bytes()
        self.peak_bytes = self.peak_total_bytes = 0
        self._polled, self._stop = self.start, threading.Event()
        self._caller = threading.get_ident()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        import sys
        import traceback

        while not self._stop.wait(self.poll_s):
            try:
                rss = _status_kb("VmRSS") * 1024
            except OSError:
                return
            if rss > self._polled:
                self._polled = rss
                frame = sys._current_frames().get(self._caller) if self.want_where else None
                if frame is not None:
                    stack = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_stack(frame)
                             if "latentae" in f.filename]
                    self.where = " < ".join(reversed(stack[-4:]))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        polled = max(self._polled, _status_kb("VmRSS") * 1024)
        maxrss = _maxrss_bytes()  # counts only if it grew inside the block
        total = max(polled, maxrss if maxrss > self.start_max else 0)
        if self.exact:
            hwm = _status_kb("VmHWM") * 1024
            total = max(total, hwm if hwm >= self.start else 0)
        self.peak_total_bytes = total
        self.peak_bytes = max(0, total - self.start)
        return False


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _maxrss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each fn, run round-robin (rotating the order each round) so
    that load from other processes hits every contender alike."""
    import statistics
    import time

    names, times = list(fns), {k: [] for k in fns}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def conv_peak_gflops(channels: int = 512, size: int = 64, repeats: int = 5, device: str = "cpu") -> float:
    """Achieved GFLOP/s of one big 3x3 conv (the best of NCHW and NHWC): the machine's practical ceiling."""
    x = torch.randn(1, channels, size, size, device=device)
    w = torch.randn(channels, channels, 3, 3, device=device) / (3 * channels**0.5)
    xl = x.contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def run(inp):
        def f():
            F.conv2d(inp, w, padding=1)
            sync()

        return f

    with torch.no_grad():
        run(x)(), run(xl)()  # primitive creation
        t = interleaved_medians({"nchw": run(x), "nhwc": run(xl)}, repeats)
    return 2 * size * size * 9 * channels * channels / min(t.values()) / 1e9


__all__ = ["conv_flops", "PeakRSS", "interleaved_medians", "conv_peak_gflops"]
