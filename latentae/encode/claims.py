"""Claims: which process is encoding which part, so that every part is written once.

Before it reads a part's input, a process creates ``DIR/claims/part-NNNNNN.claim`` with
``O_CREAT | O_EXCL`` (atomic, also on NFS >= 3): whoever creates it encodes the part, the
others pass it by. The claim holds its owner (machine, pid, process start time, and a
token unique to one ``encode_dataset`` call) and is removed once the part is done or
discarded. While it encodes, the owner refreshes the claim's mtime every
``claim_timeout / 10`` seconds (a heartbeat thread).

A claim is *stale*, and another process takes it over, when:

1. its owner is on this machine (same host name, boot id and pid namespace) and that
   process is gone (no such pid, a zombie, or a pid reused by a process that started at
   another time) -- at once, e.g. right after a SIGKILL; or it names this very process
   with the token of a run that has ended (an earlier call that did not clean up);
2. its owner is on another machine and its mtime is older than ``claim_timeout`` seconds.
   "Now" is the filesystem's clock (the mtime of a file we touch), so clock skew between
   machines does not matter.

Take-over happens under a break lock (``part-N.break``, ``O_EXCL``, held for microseconds):
the contender that gets it checks that the claim is still the one it judged stale, removes
it and claims as usual; the others pass the part by, so exactly one of them gets it.

Claims avoid duplicate work; they are not what makes the output exact. Every part has
fixed file names, each writer writes under names unique to it (its token) and publishes
by atomic rename, and a part's json is written last. So even if a claim were taken from
a live process (one frozen for longer than ``claim_timeout``), both would publish the
same complete files, and the owner finds its claim gone before publishing and discards
its copy.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CLAIMS = "claims"
# Tokens of the runs alive in this process: a claim naming this process with a token not
# in here was left by an earlier run (rule 1). Forked workers inherit it.
_LIVE_TOKENS: set[str] = set()


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def machine_id() -> str:
    """Host name + boot id + pid namespace (Linux): equal iff pids mean the same processes."""
    parts = [socket.gethostname(), _read(Path("/proc/sys/kernel/random/boot_id")) or ""]
    try:
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        parts.append("")
    return "/".join(parts)


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process, from /proc (Linux)."""
    s = _read(Path(f"/proc/{pid}/stat"))
    if not s:
        return None
    fields = s[s.rfind(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    return fields[0], int(fields[19])


def process_alive(pid: int, started: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, belongs to someone else
    stat = _proc_stat(pid)
    if stat is None:
        return True  # no /proc here: the pid exists, which is all we can tell
    state, start = stat
    return state != "Z" and (started is None or start == started)


@dataclass(frozen=True)
class Owner:
    machine: str
    pid: int
    started: int | None
    token: str

    @classmethod
    def current(cls) -> "Owner":
        stat = _proc_stat(os.getpid())
        owner = cls(machine_id(), os.getpid(), stat[1] if stat else None, uuid.uuid4().hex[:12])
        _LIVE_TOKENS.add(owner.token)
        return owner

    def describe(self) -> str:
        return f"pid {self.pid} on {self.machine.split('/')[0]}"


class Claims:
    """The claims of one output folder, as seen by ``owner`` (see the module docstring)."""

    def __init__(self, out: Path, owner: Owner, timeout: float):
        self.dir = Path(out) / CLAIMS
        self.owner, self.timeout = owner, timeout
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None
        self._clock: tuple[float, float] | None = None  # (monotonic, filesystem time) of the last look

    def __getstate__(self):  # sent to decoding workers: settings, not the heartbeat
        return {"dir": self.dir, "owner": self.owner, "timeout": self.timeout}

    def __setstate__(self, state):
        self.__init__(state["dir"].parent, state["owner"], state["timeout"])

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.claim"

    # -- claiming

    def try_claim(self, name: str) -> bool:
        """Claim part ``name``; False if another live process holds it (or is taking it over)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._create(name):
            return True
        held = self.holder(name)
        if held is None:  # released meanwhile
            return self._create(name)
        if not self.is_stale(name, held)[0]:
            return False
        return self._take_over(name, held.get("token"))

    def _create(self, name: str) -> bool:
        try:
            fd = os.open(self.path(name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self.owner), f)
        with self._lock:
            self._held.add(name)
        return True

    def holder(self, name: str) -> dict[str, Any] | None:
        """The claim's content (``{}`` if unreadable: just created, or truncated), None if there is none."""
        text = _read(self.path(name))
        if text is None:
            return None if not self.path(name).exists() else {}
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return {}

    def is_stale(self, name: str, held: dict[str, Any]) -> tuple[bool, str]:
        """(stale?, why) of the claim ``held`` on part ``name``."""
        me = self.owner
        if held.get("machine") == me.machine and held.get("pid") == me.pid and held.get("started") == me.started:
            return held.get("token") not in _LIVE_TOKENS, "left by an earlier run in this process"
        if held.get("machine") == me.machine and isinstance(held.get("pid"), int):
            alive = process_alive(held["pid"], held.get("started"))
            return not alive, f"pid {held['pid']} on this machine is {'alive' if alive else 'gone'}"
        try:
            age = self.fs_now() - self.path(name).stat().st_mtime
        except FileNotFoundError:
            return False, "released meanwhile"
        return age > self.timeout, f"refreshed {age:.0f}s ago (timeout {self.timeout:g}s)"

    def claimable(self, name: str) -> bool:
        """Nobody holds part ``name``, or its holder's claim is stale."""
        held = self.holder(name)
        return held is None or self.is_stale(name, held)[0]

    def _take_over(self, name: str, token: str | None) -> bool:
        """Replace the stale claim with ours, one contender at a time: under a break lock
        (``O_EXCL``, held for microseconds), check that the claim is still the one judged
        stale, remove it, and claim as usual."""
        lock = self.dir / f"{name}.break"
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            self._clear_stale_lock(lock)
            return False  # another process is taking it over
        try:
            held = self.holder(name)
            if held is not None and held.get("token") == token:
                self.path(name).unlink(missing_ok=True)
            return self._create(name)
        finally:
            lock.unlink(missing_ok=True)

    def _clear_stale_lock(self, lock: Path) -> None:
        # A break lock older than 10 s (by the filesystem's clock) was left by a process that
        # died within those microseconds; remove it so that the claim can be taken over later.
        try:
            if self.fs_now() - lock.stat().st_mtime > 10:
                lock.unlink(missing_ok=True)
        except FileNotFoundError:
            pass

    def fs_now(self) -> float:
        """The filesystem's current time: the mtime of a file we touch, at most once a
        second (in between, that time plus the local clock's advance)."""
        now = time.monotonic()
        if self._clock is None or now - self._clock[0] > 1.0:
            clock = self.dir / f".clock-{self.owner.token}-{os.getpid()}"
            clock.touch()
            os.utime(clock)
            self._clock = (now, clock.stat().st_mtime)
        return self._clock[1] + (now - self._clock[0])

    # -- holding

    def is_mine(self, name: str) -> bool:
        held = self.holder(name)
        return bool(held) and held.get("token") == self.owner.token

    def release(self, name: str) -> None:
        with self._lock:
            self._held.discard(name)
        if self.is_mine(name):
            self.path(name).unlink(missing_ok=True)

    def adopt(self, name: str) -> None:
        """Refresh a claim made on our behalf (by a decoding worker) from now on."""
        with self._lock:
            self._held.add(name)

    def release_all(self) -> None:
        """Remove every claim with our token (also those a worker made and we never saw)."""
        with self._lock:
            self._held.clear()
        if not self.dir.is_dir():
            return
        for p in self.dir.glob("*.claim"):
            if p.stem and self.is_mine(p.stem):
                p.unlink(missing_ok=True)
        for p in self.dir.glob(f".clock-{self.owner.token}-*"):
            p.unlink(missing_ok=True)

    def close(self) -> None:
        """The run is over: stop the heartbeat, release every claim, retire the token."""
        self.stop_heartbeat()
        self.release_all()
        _LIVE_TOKENS.discard(self.owner.token)

    def others(self) -> dict[str, str]:
        """Part name -> owner, of the claims held by other processes."""
        out = {}
        for p in self.dir.glob("*.claim") if self.dir.is_dir() else ():
            held = self.holder(p.stem)
            if held and held.get("token") != self.owner.token:
                out[p.stem] = f"pid {held.get('pid')} on {str(held.get('machine', '?')).split('/')[0]}"
        return out

    def start_heartbeat(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="latentae-claims-heartbeat", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join()
            self._stop = self._thread = None

    def _beat(self) -> None:
        while not self._stop.wait(self.timeout / 10):
            with self._lock:
                names = list(self._held)
            for name in names:
                if self.is_mine(name):
                    try:
                        os.utime(self.path(name))
                    except OSError:
                        pass  # released meanwhile
