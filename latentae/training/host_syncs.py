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
Not counted: waits inside library kernels or collectives, blocking host-to-device
copies, allocator retries. ``.cpu()`` of a CPU tensor is free and not counted, so on a
CPU-only machine a bare ``.cpu()`` of a would-be device tensor goes unseen (a
following ``.numpy()`` / ``.tolist()`` is seen).

    with HostSyncCounter() as syncs:
        trainer.one_step()
    syncs.count, syncs.by_kind      # 1, {"tolist": 1}
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_READS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "equal", "nonzero"}


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
