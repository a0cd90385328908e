"""Count the places where host code waits for the device (a "host sync").

On a GPU, Python queues kernels and moves on; reading a *value* back makes it wait
until everything queued so far has run. One such wait per optimizer step is cheap,
one per logged scalar per micro-batch is not. This counter finds them on any device,
CPU included: it counts the *calls* that would wait on a GPU.

Counted (while the context is active, in this thread):
    Tensor.item, .tolist, .numpy, bool()/int()/float()/index() of a tensor (also an
    ``if tensor:``, ``'%f' % tensor``), torch.equal, Tensor.nonzero / torch.nonzero
    (data-dependent output shape), .cpu() / .to("cpu") of a tensor that is *not* on the
    CPU already, and torch.cuda.synchronize / Stream.synchronize / Event.synchronize.
On a CPU-only machine every tensor is a host tensor, so reads are counted as if the
code ran on a GPU, except reads made by code that only ever handles host tensors: the
data pipeline (``torch.utils.data``, ``latentae.data``, ``latentae.imageio``) and the
optimizers' step counters (``torch.optim``'s ``_get_value``: torch keeps them on the
CPU on every device, precisely so that reading them costs no sync).
Not counted: waits inside library kernels or collectives, blocking host-to-device
copies, allocator retries. ``.cpu()`` of a CPU tensor is free and not counted, so on a
CPU-only machine a bare ``.cpu()`` of a would-be device tensor goes unseen (a
following ``.numpy()`` / ``.tolist()`` is seen).

    with HostSyncCounter() as syncs:
        trainer.one_step()
    syncs.count, syncs.by_kind      # 1, {"tolist": 1}
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_READS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "equal", "nonzero"}


# Code that handles host tensors only (see the module docstring): its reads are no syncs.
HOST_SIDE_FILES = ("/torch/utils/data/", "/latentae/data/", "/latentae/imageio.py")


def _host_side_caller(depth: int = 4) -> bool:
    frame = sys._getframe(2)  # 0: this function, 1: __torch_function__, 2: the caller of the tensor method
    for _ in range(depth):
        if frame is None:
            return False
        name = frame.f_code.co_filename.replace("\\", "/")
        if any(h in name for h in HOST_SIDE_FILES):
            return True
        if frame.f_code.co_name == "_get_value" and name.endswith("/torch/optim/optimizer.py"):
            return True
        frame = frame.f_back
    return False


def _is_to_host(name: str, args: tuple, kwargs: dict) -> bool:
    if name not in ("cpu", "to") or not args or not isinstance(args[0], torch.Tensor):
        return False
    src = args[0]
    if src.device.type == "cpu":
        return False
    if name == "cpu":
        return True
    targets = list(args[1:]) + [kwargs.get("device")]
    return any(
        (isinstance(t, str) and t.startswith("cpu")) or (isinstance(t, torch.device) and t.type == "cpu")
        for t in targets
    )


class HostSyncCounter(TorchFunctionMode):
    """Context manager counting host syncs (see the module docstring); nests with other modes."""

    def __init__(self):
        super().__init__()
        self.by_kind: Counter[str] = Counter()
        self._patched: list[tuple[Any, str, Any]] = []

    @property
    def count(self) -> int:
        return sum(self.by_kind.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _READS or _is_to_host(name, args, kwargs):
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if first is None or first.device.type != "cpu" or not _host_side_caller():
                self.by_kind[name.strip("_")] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        # Device-wide waits are not tensor functions: wrap them for the duration.
        targets = [(torch.cuda, "synchronize")]
        if hasattr(torch.cuda, "Stream"):
            targets += [(torch.cuda.Stream, "synchronize"), (torch.cuda.Event, "synchronize")]
        for owner, attr in targets:
            original = getattr(owner, attr)
            self._patched.append((owner, attr, original))
            setattr(owner, attr, self._counting(original, f"{getattr(owner, '__name__', 'cuda')}.{attr}"))
        return super().__enter__()

    def __exit__(self, *exc):
        for owner, attr, original in reversed(self._patched):
            setattr(owner, attr, original)
        self._patched.clear()
        return super().__exit__(*exc)

    def _counting(self, fn, kind: str):
        def wrapper(*args, **kwargs):
            self.by_kind[kind] += 1
            return fn(*args, **kwargs)

        return wrapper


__all__ = ["HostSyncCounter"]
