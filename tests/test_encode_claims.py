"""Exactly once under concurrency (latentae.encode.claims): stale claims, a part held by a live
process, two encoders started together on one folder (real processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from latentae.encode.claims import Claims, Owner, _proc_stat, machine_id
from latentae.latents import read_manifest
from test_encode import ROOT, _env, leftovers, make_images, one_torch_thread, read_all, run_encode, vae_file  # noqa: F401


def _claim_of(out: Path, name: str, **owner) -> Path:
    p = out / "claims" / f"{name}.claim"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(owner))
    return p


def _started(pid: int) -> int:
    return _proc_stat(pid)[1]


@pytest.fixture
def sleeper():
    """A live process on this machine (the owner of a claim that is not stale)."""
    p = subprocess.Popen(["sleep", "60"])
    yield p
    p.kill()
    p.wait()


def test_stale_claims_are_detected(tmp_path, sleeper):
    me = Claims(tmp_path, Owner.current(), timeout=5.0)
    here = machine_id()
    dead = subprocess.Popen(["true"])
    dead.wait()
    cases = {
        "dead pid here": (dict(machine=here, pid=dead.pid, started=None, token="a"), True),
        "live pid here": (dict(machine=here, pid=sleeper.pid, started=_started(sleeper.pid), token="b"), False),
        "pid reused": (dict(machine=here, pid=sleeper.pid, started=_started(sleeper.pid) - 1, token="c"), True),
        "this process, earlier run": (dict(machine=here, pid=os.getpid(), started=me.owner.started, token="d"), True),
        "other machine, fresh": (dict(machine="node7/boot/pid:[1]", pid=1, started=1, token="e"), False),
        "other machine, silent": (dict(machine="node7/boot/pid:[1]", pid=1, started=1, token="f"), True),
    }
    for i, (name, (owner, stale)) in enumerate(cases.items()):
        p = _claim_of(tmp_path, f"part-{i:06d}", **owner)
        if name == "other machine, silent":  # last refreshed 10 s ago by the filesystem's clock (timeout 5 s)
            t = me.fs_now() - 10
            os.utime(p, (t, t))
        assert me.is_stale(p.stem, me.holder(p.stem))[0] is stale, name
        assert me.try_claim(p.stem) is stale, name  # a stale claim is taken over, a live one is not
        assert me.is_mine(p.stem) is stale, name
    me.release_all()
    assert sorted(p.stem for p in (tmp_path / "claims").glob("*.claim")) == ["part-000001", "part-000004"]


def test_take_over_of_a_stale_claim_has_one_winner(tmp_path):
    """Contenders that all judged one claim stale: exactly one ends up holding the part."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    for trial in range(50):
        name = f"part-{trial:06d}"
        _claim_of(tmp_path, name, machine=machine_id(), pid=dead.pid, started=None, token="dead")
        contenders = [Claims(tmp_path, Owner.current(), timeout=5.0) for _ in range(6)]
        barrier = threading.Barrier(6)
        won = []

        def go(c):
            barrier.wait()
            if c.try_claim(name):
                won.append(c)

        threads = [threading.Thread(target=go, args=(c,)) for c in contenders]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        holder = json.loads((tmp_path / "claims" / f"{name}.claim").read_text())["token"]
        assert [c.owner.token for c in won] == [holder], trial


def test_parts_held_by_a_live_process_are_waited_for_then_taken_over(tmp_path, vae_file, sleeper):
    """One part is claimed by a live process on this machine: the job does the others, waits,
    and takes the part over as soon as that process is gone (here: killed after 1.5 s)."""
    make_images(tmp_path / "data", 6, size=(32, 32))
    out = tmp_path / "out"
    out.mkdir()
    _claim_of(out, "part-000001", machine=machine_id(), pid=sleeper.pid, started=_started(sleeper.pid), token="x")
    threading.Timer(1.5, sleeper.kill).start()
    r = run_encode(vae_file[0], tmp_path / "data", out, size=32, shard_size=2, claim_timeout=5.0)
    assert r.parts_written == 3 and r.manifest["num_encoded"] == 6
    assert r.waited_seconds > 0.5
    assert not list((out / "claims").glob("*.claim"))


def test_a_silent_claim_of_another_machine_is_taken_over_after_the_timeout(tmp_path, vae_file):
    make_images(tmp_path / "data", 4, size=(32, 32))
    out = tmp_path / "out"
    out.mkdir()
    _claim_of(out, "part-000000", machine="node7/other-boot/pid:[4026531836]", pid=12, started=3, token="y")
    t0 = time.perf_counter()
    r = run_encode(vae_file[0], tmp_path / "data", out, size=32, shard_size=2, claim_timeout=1.0)
    assert r.parts_written == 2 and r.manifest["num_encoded"] == 4
    assert time.perf_counter() - t0 > 0.9  # not before the claim was a timeout old


_SLOW_ENCODER = """
import sys, time
from pathlib import Path
gate = Path(sys.argv[1])
sys.argv = [sys.argv[2]] + sys.argv[3:]
import latentae.io
real = latentae.io.load_vae
def load(*a, **kw):  # the test's slow model: 40 ms per batch, so that the two runs overlap
    vae = real(*a, **kw)
    enc = vae.encode
    def encode(x):
        time.sleep(0.04)
        return enc(x)
    vae.encode = encode
    return vae
latentae.io.load_vae = load
while not gate.exists():  # both processes start encoding together
    time.sleep(0.01)
import runpy
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_two_encoders_started_together_write_every_input_once(tmp_path, vae_file):
    """Two separate launches (not one torchrun job) on one output folder at the same moment:
    they share the parts through claims, both finish, every input is encoded once, and
    each part is written by exactly one of them."""
    n, gate = 48, tmp_path / "go"
    make_images(tmp_path / "data", n, size=(32, 32))
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", _SLOW_ENCODER, str(gate), str(ROOT / "tools" / "encode.py"), "--vae",
           str(vae_file[0]), "--data", str(tmp_path / "data"), "--out", str(out), "--size", "32",
           "--shard-size", "4", "--batch-size", "2", "--num-workers", "1", "--no-progress"]
    procs = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    time.sleep(0.5)
    gate.touch()
    results = [p.communicate(timeout=120) for p in procs]
    for p, (so, se) in zip(procs, results):
        assert p.returncode == 0, so + se
    written = [int(so.split(" into ")[1].split()[0]) for so, _ in results]
    assert sum(written) == 12 and min(written) > 0, written  # 12 parts, each written once, by both
    assert sorted(s.index for s in read_all(out)) == list(range(n))
    assert read_manifest(out)["num_encoded"] == n
    assert not leftovers(out)
    assert run_encode(vae_file[0], tmp_path / "data", out, size=32, shard_size=4, batch_size=2).nothing_to_do


def test_overwrite_is_refused_while_another_process_encodes(tmp_path, vae_file, sleeper):
    make_images(tmp_path / "data", 2, size=(32, 32))
    out = tmp_path / "out"
    run_encode(vae_file[0], tmp_path / "data", out, size=32)
    _claim_of(out, "part-000000", machine=machine_id(), pid=sleeper.pid, started=_started(sleeper.pid), token="z")
    with pytest.raises(RuntimeError, match=r"--overwrite: another process is encoding into .* holds part-000000"):
        run_encode(vae_file[0], tmp_path / "data", out, size=32, overwrite=True)
    assert read_manifest(out)["num_encoded"] == 2  # untouched


def test_sigterm_discards_open_parts_and_releases_claims(tmp_path, vae_file):
    """A scheduler's SIGTERM mid-run: exit 143, nothing half-written, no claim left behind."""
    import signal

    n = 120
    make_images(tmp_path / "data", n, size=(32, 32))
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "tools" / "encode.py"), "--vae", str(vae_file[0]), "--data",
           str(tmp_path / "data"), "--out", str(out), "--size", "32", "--shard-size", "4", "--batch-size", "2",
           "--num-workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(list(out.glob("part-??????.json"))) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    done = len(list(out.glob("part-??????.json")))
    assert 2 <= done < 30 and not (out / "manifest.json").exists()
    assert not leftovers(out), leftovers(out)
    r = run_encode(vae_file[0], tmp_path / "data", out, size=32, shard_size=4, batch_size=2)
    assert r.parts_done_before == done and sorted(s.index for s in read_all(out)) == list(range(n))
