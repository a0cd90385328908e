"""What the processes of a run tell each other outside the training step.

The training step has its one collective (``control.agree``). Everything else ranks do
together goes through the key-value store of the process group (the TCPStore that
torchrun, ``accelerate launch`` or ``env://`` start next to rank 0 or in the launcher),
never through a blocking collective, so that a rank that fails can tell the others
and the others can listen while they wait:

    barrier(name, stop=)   every rank waits for all of them. It also ORs each rank's
                           pending stop request, so a signal that arrives during a
                           checkpoint or validation takes effect right after it. No
                           collective timeout (validation may take as long as it takes);
                           raises PeerFailedError as soon as another rank has failed.
    share(name, value)     rank 0's value on every rank (start-up: the checkpoint, the data)
    problems(name, p)      every rank's problem (or None) on every rank: checks that must
                           fail on all ranks at once, each rank's reason in the message
    fail(exc)              a rank that raises reports its message, waits until every other
                           rank has read it (at most ``linger_s``: rank 0 may host the
                           store, which ends with it) and gets back the exception to raise;
                           a rank that ends because another failed gets PeerFailedError
    close()                the end of a run: rank 0 leaves last (it may host the store)

A watcher thread on every rank beats a heartbeat and looks for failure reports every
``poll_s`` seconds; rank 0's also reports a rank whose heartbeat stopped for
``dead_after_s`` (killed, out of memory: it could not report itself). A rank learns of
a failure at its next barrier, or when its collective breaks (gloo: at once, when the
failed rank's process exits). A rank stuck in a collective that never returns (NCCL
waits for a dead peer until its timeout) or busy in a long computation is ended by its
watcher after ``grace_s`` with the failed rank's message and exit status 1.

Every rank calls barrier/share/problems in the same order (like collectives): the
store keys are numbered by call.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
from typing import Any, Callable, Iterator

from latentae.training.errors import PeerFailedError, StartupError

log = logging.getLogger("latentae.train")


class Ranks:
    """The processes of one run (see the module docstring). ``Ranks.start`` makes one."""

    def __init__(
        self,
        rank: int,
        world: int,
        store: Any = None,
        *,
        poll_s: float = 0.5,
        grace_s: float = 15.0,
        linger_s: float = 10.0,
        dead_after_s: float = 120.0,
        note_every_s: float = 300.0,
        exit: Callable[[int], None] = os._exit,
    ):
        if world > 1 and store is None:
            raise ValueError("several ranks need the process group's store")
        self.rank, self.world, self.store = rank, world, store
        self.poll_s, self.grace_s, self.linger_s = poll_s, grace_s, linger_s
        self.dead_after_s, self.note_every_s, self._exit = dead_after_s, note_every_s, exit
        self.host = socket.gethostname()
        self._seq = 0
        self._lock = threading.Lock()
        self._peer: tuple[int | None, str] | None = None  # (rank, message) of a failed rank, once known
        self._acked = False  # this rank has counted itself in fail/seen (as the reporter or a reader)
        self._ending = False  # the main thread is ending (fail() or close()): the watcher leaves it alone
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def start(cls, rank: int, world: int, *, namespace: str | None = None, **kw) -> "Ranks":
        """Ranks over the default process group's store (one process: no store, no thread).

        ``namespace`` separates several Ranks on one store (default: one per torchrun attempt).
        """
        if world == 1:
            return cls(rank, 1, **kw)
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _get_default_store

        try:
            base = _get_default_store()
        except Exception as e:  # a process group without a store (not started by init_process_group)
            raise StartupError(f"{world} processes, but the process group has no key-value store: {e}") from e
        # torchrun keeps its store across restarts of the workers (--max-restarts): a
        # namespace per attempt, so reports of the failed attempt are not read again.
        if namespace is None:
            namespace = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        prefix = f"latentae/{namespace}/"
        self = cls(rank, world, dist.PrefixStore(prefix, base), **kw)
        self.store.set(f"host/{rank}", self.host)
        self.store.add(f"beat/{rank}", 1)
        self.barrier("start")  # every heartbeat key exists before rank 0's watcher reads them
        # A client of its own for the watcher thread (a store object is not shared across threads).
        watcher_store = dist.PrefixStore(prefix, base.clone())
        self._thread = threading.Thread(target=self._watch, args=(watcher_store,), name="latentae-ranks", daemon=True)
        self._thread.start()
        return self

    # -- together ---------------------------------------------------------------------------

    def _key(self, what: str) -> str:
        self._seq += 1
        return f"{self._seq}-{what}"

    def barrier(self, name: str, *, stop: bool = False) -> bool:
        """Wait for every rank; True when any rank passed ``stop=True``."""
        if self.world == 1:
            return stop
        key = self._key(f"barrier-{name}")
        with self._store_errors():
            if stop:  # before arriving: once all arrived, every stop flag is in
                self.store.add(f"{key}/stop", 1)
            if int(self.store.add(f"{key}/n", 1)) >= self.world:
                self.store.set(f"{key}/done", b"1")
            else:
                self._wait(f"{key}/done", f"barrier '{name}'", f"{key}/n")
            return int(self.store.add(f"{key}/stop", 0)) > 0

    def share(self, name: str, value: Any = None) -> Any:
        """Rank 0's ``value`` (JSON-able) on every rank."""
        if self.world == 1:
            return value
        key = self._key(f"share-{name}")
        with self._store_errors():
            if self.rank == 0:
                self.store.set(key, json.dumps(value))
                return value
            self._wait(key, f"rank 0's '{name}'")
            return json.loads(self.store.get(key))

    def problems(self, name: str, problem: str | None) -> list[tuple[int, str]]:
        """Every rank's problem, [(rank, problem)] sorted by rank, the same list on every rank."""
        if self.world == 1:
            return [(self.rank, problem)] if problem else []
        key = self._key(f"problems-{name}")
        with self._store_errors():
            if problem is not None:
                i = int(self.store.add(f"{key}/count", 1))
                self.store.set(f"{key}/{i}", json.dumps([self.rank, problem]))
        self.barrier(name)  # every rank's entry is written before it arrives
        with self._store_errors():
            n = int(self.store.add(f"{key}/count", 0))
            found = [json.loads(self.store.get(f"{key}/{i}")) for i in range(1, n + 1)]
        return sorted((int(r), str(p)) for r, p in found)

    def _wait(self, key: str, what: str, count_key: str | None = None) -> None:
        """Until ``key`` exists; raises PeerFailedError when another rank failed meanwhile."""
        delay, t0 = 0.001, time.monotonic()
        next_note = t0 + self.note_every_s
        while not self.store.check([key]):
            self._raise_if_peer_failed()
            time.sleep(delay)
            delay = min(delay * 2, 0.25)  # quick for short waits, light on the store for long ones
            if time.monotonic() > next_note:
                arrived = f", {int(self.store.add(count_key, 0))} of {self.world} ranks there" if count_key else ""
                log.warning("rank %d: still waiting for %s after %.0f s%s", self.rank, what,
                            time.monotonic() - t0, arrived)  # fmt: skip
                next_note += self.note_every_s
        self._raise_if_peer_failed()

    def _raise_if_peer_failed(self) -> None:
        if self._peer is not None:
            raise PeerFailedError(*self._peer)

    @contextlib.contextmanager
    def _store_errors(self) -> Iterator[None]:
        from torch.distributed import DistError

        try:
            yield
        except DistError as e:  # the store is unreachable: its host has ended
            raise self._store_lost(e) from e

    def _store_lost(self, e: BaseException) -> PeerFailedError:
        if self._peer is not None:
            return PeerFailedError(*self._peer)
        return PeerFailedError(
            None, f"lost the connection to the run's key-value store ({type(e).__name__}: {e}): the process that "
            "hosts it (rank 0, or the launcher) has ended; see its log"
        )  # fmt: skip

    # -- failures ---------------------------------------------------------------------------

    def fail(self, exc: BaseException) -> BaseException:
        """The exception this rank should end with, after telling the others (see the module docstring).

        ``exc`` itself, when this rank failed on its own (reported first, then up to
        ``linger_s`` waiting until every rank has read it); a PeerFailedError naming the
        rank that failed first, when this rank's error came after (e.g. its collective
        broke because that rank's process ended). Errors every rank raises together
        (``errors.on_every_rank``) are nobody's news.
        """
        self._ending = True
        if self.world == 1 or getattr(exc, "on_every_rank", False) or isinstance(exc, PeerFailedError):
            return exc
        try:
            peer = self._peer or self._read_failure(self.store)
            if peer is not None and peer[0] != self.rank:
                self._ack(self.store)
                err = PeerFailedError(*peer)
                err.__cause__ = exc
                return err
            message = f"{type(exc).__name__}: {exc} (on {self.host})"
            self.store.set(f"fail/{self.rank}", message)
            self.store.compare_set("fail/first", "", str(self.rank))
            self._ack(self.store)
            deadline = time.monotonic() + self.linger_s
            while int(self.store.add("fail/seen", 0)) < self.world and time.monotonic() < deadline:
                time.sleep(0.02)
        except Exception as e:  # the store is gone too: nothing more to tell
            log.debug("could not report the failure to the other ranks: %s", e)
        return exc

    def _read_failure(self, store: Any) -> tuple[int, str] | None:
        if not store.check(["fail/first"]):
            return None
        r = int(store.get("fail/first"))
        return r, store.get(f"fail/{r}").decode()  # the message is set before fail/first

    def _ack(self, store: Any) -> None:
        with self._lock:
            if self._acked:
                return
            self._acked = True
        store.add("fail/seen", 1)

    # -- the watcher thread -------------------------------------------------------------------

    def _watch(self, store: Any) -> None:
        beats: dict[int, tuple[bytes, float]] = {}
        while not self._stop.wait(self.poll_s):
            try:
                store.add(f"beat/{self.rank}", 1)
                if self._acked:  # this rank reported its own failure: its main thread is ending
                    continue
                peer = self._read_failure(store)
                if peer is None and self.rank == 0:
                    peer = self._find_dead(store, beats)
                if peer is not None:  # (this rank itself only when rank 0 found it unresponsive)
                    self._learn(peer, store)
                    break
            except Exception as e:
                if self._stop.is_set():
                    return
                self._learn((None, str(self._store_lost(e).message)), None)
                break
        self._end_if_stuck()

    def _find_dead(self, store: Any, beats: dict[int, tuple[bytes, float]]) -> tuple[int, str] | None:
        values = store.multi_get([f"beat/{r}" for r in range(self.world)])
        now = time.monotonic()
        for r, v in enumerate(values):
            if r == self.rank:
                continue
            last = beats.get(r)
            if last is None or last[0] != v:
                beats[r] = (v, now)
            elif now - last[1] > self.dead_after_s:
                host = store.get(f"host/{r}").decode()
                message = (f"stopped responding: no heartbeat for {now - last[1]:.0f} s (killed? out of memory? "
                           f"see its log on {host})")  # fmt: skip
                store.set(f"fail/{r}", message)
                store.compare_set("fail/first", "", str(r))
                return self._read_failure(store)
        return None

    def _learn(self, peer: tuple[int | None, str], store: Any) -> None:
        with self._lock:
            if self._peer is None:
                self._peer = peer
        if store is not None:
            self._ack(store)
        who = f"rank {peer[0]}" if peer[0] is not None else "another rank"
        log.error("rank %d: %s failed: %s", self.rank, who, peer[1])

    def _end_if_stuck(self) -> None:
        """After a peer failed: give the main thread ``grace_s`` to notice, else end the process."""
        if self._peer is None or self._stop.is_set():
            return
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline:
            if self._ending or self._stop.wait(0.05):
                return
        if self._ending or self._stop.is_set():
            return
        print(f"error: {PeerFailedError(*self._peer)}; this rank (rank {self.rank}) did not get to a point where it "
              f"could notice within {self.grace_s:.0f} s (stuck in a collective?): ending it", file=sys.stderr,
              flush=True)  # fmt: skip
        self._exit(1)

    # -- the end --------------------------------------------------------------------------------

    def close(self) -> None:
        """A normal end (every rank calls it): stop the watcher; rank 0 waits for the others to leave."""
        self._ending = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.world == 1 or self._peer is not None or self._acked:
            return
        try:
            if self.rank != 0:
                self.store.add("left", 1)
                return
            deadline = time.monotonic() + 60.0
            while int(self.store.add("left", 0)) < self.world - 1 and time.monotonic() < deadline:
                time.sleep(0.01)
        except Exception as e:
            log.debug("rank %d: the store went away while closing: %s", self.rank, e)

    def stop_watching(self) -> None:
        """Stop the watcher thread only (after a failure was handled)."""
        self._ending = True
        self._stop.set()


__all__ = ["Ranks"]
