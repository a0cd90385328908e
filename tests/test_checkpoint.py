"""Checkpoint directories: atomic writes, health, rotation, cleaning, --resume resolution."""

from __future__ import annotations

import json
import os

import pytest

from latentae.checkpoint import (
    MANIFEST,
    CheckpointError,
    clean_temp,
    health_problem,
    latest_checkpoint,
    list_checkpoints,
    read_manifest,
    resolve_resume,
    rotate,
    write_checkpoint,
)


def _writers(payload: str = "x"):
    return {"a.txt": lambda p: p.write_text(payload), "b.bin": lambda p: p.write_bytes(payload.encode() * 3)}


def test_write_is_complete_and_listed(tmp_path):
    path = write_checkpoint(tmp_path, 12, _writers("hello"), {"note": 1})
    assert path == tmp_path / "checkpoints" / "step-000000012"
    meta = read_manifest(path)
    assert meta["step"] == 12 and meta["note"] == 1 and meta["files"] == {"a.txt": 5, "b.bin": 15}
    assert (path / "a.txt").read_text() == "hello"
    assert list_checkpoints(tmp_path) == [(12, path)]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_failed_write_leaves_no_checkpoint(tmp_path):
    def boom(p):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(tmp_path, 3, {"a.txt": lambda p: p.write_text("1"), "b": boom}, {})
    assert list_checkpoints(tmp_path) == [] and latest_checkpoint(tmp_path) is None
    assert clean_temp(tmp_path) == [tmp_path / "checkpoints" / ".tmp-step-000000003"]
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_unhealthy_checkpoints_are_ignored_and_named(tmp_path):
    good = write_checkpoint(tmp_path, 1, _writers(), {})
    bad = write_checkpoint(tmp_path, 2, _writers(), {})
    (bad / "b.bin").write_bytes(b"truncated")
    assert "b.bin has 9 bytes" in health_problem(bad)
    assert latest_checkpoint(tmp_path) == good
    no_manifest = write_checkpoint(tmp_path, 3, _writers(), {})
    (no_manifest / MANIFEST).unlink()
    assert latest_checkpoint(tmp_path) == good
    with pytest.raises(CheckpointError, match=r"step-000000003 is not a complete checkpoint: no trainer.json"):
        resolve_resume(tmp_path, str(no_manifest))


def test_rotation_keeps_newest_healthy(tmp_path):
    for s in (1, 2, 3):
        write_checkpoint(tmp_path, s, _writers(), {}, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    # A damaged newer directory does not count: the newest *healthy* one survives rotation.
    broken = tmp_path / "checkpoints" / "step-000000009"
    broken.mkdir()
    assert rotate(tmp_path, 1) == [tmp_path / "checkpoints" / "step-000000002"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3] and broken.is_dir()
    with pytest.raises(ValueError, match="keep_last"):
        rotate(tmp_path, 0)


def test_rewriting_a_step_replaces_it(tmp_path):
    write_checkpoint(tmp_path, 5, _writers("old"), {})
    path = write_checkpoint(tmp_path, 5, _writers("new"), {})
    assert (path / "a.txt").read_text() == "new" and len(list_checkpoints(tmp_path)) == 1


def test_clean_temp_restores_a_checkpoint_moved_aside(tmp_path):
    # A crash between "move the old step-5 aside" and "rename the new one in".
    path = write_checkpoint(tmp_path, 5, _writers("old"), {})
    aside = path.parent / ".tmp-old-step-000000005"
    os.replace(path, aside)
    (path.parent / ".tmp-step-000000005").mkdir()  # the half-written replacement
    removed = clean_temp(tmp_path)
    assert removed == [path.parent / ".tmp-step-000000005"]
    assert (path / "a.txt").read_text() == "old" and latest_checkpoint(tmp_path) == path


def test_resolve_resume(tmp_path):
    assert resolve_resume(tmp_path, "latest") is None  # nothing yet: start fresh
    c1 = write_checkpoint(tmp_path, 1, _writers(), {})
    c2 = write_checkpoint(tmp_path, 2, _writers(), {})
    assert resolve_resume(tmp_path, "latest") == c2
    assert resolve_resume(tmp_path / "elsewhere", str(c1)) == c1
    assert resolve_resume(tmp_path / "elsewhere", str(tmp_path)) == c2  # a run dir: its newest
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a checkpoint directory nor a run"):
        resolve_resume(tmp_path, str(tmp_path / "empty"))
    assert json.loads((c2 / MANIFEST).read_text())["step"] == 2
