"""Shard streams: resume without re-reading, interleaved shards, elastic resume."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import webdataset as wds
from test_data import encode, make_shards, noise, same_batches, take

from latentae.data import DataConfig, SlotStream, build_train_loader
from latentae.data.shards import default_plan, fresh_slot_state
from latentae.sources import ShardPos, expand_shards, iter_shard

RES = 8


def logged(pattern: str, log: Path) -> str:
    """A pipe: opener that appends each shard it opens to ``log``."""
    return f"pipe:sh -c 'echo $0 >> {log}; cat $0' {pattern}"


def count(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def shard_of(key: str) -> str:
    return key.split("_")[0]  # make_shards keys: s{shard}_{i}


def test_iter_shard_positions_resume_anywhere(tmp_path):
    """A sample's (ordinal, end offset, key) is a position: reading from it (by seeking
    a local tar, or by skipping through a pipe) gives exactly the samples after it."""
    pattern = make_shards(tmp_path / "s", 1, 6, bad=True)  # + members of other kinds and captions
    (url,) = expand_shards(pattern)
    every = list(iter_shard(url))
    assert [s.ordinal for s in every] == list(range(len(every)))
    for s in every[:-1]:
        pos = ShardPos(s.ordinal + 1, s.end, s.key)
        for source in (url, f"pipe:cat {url}"):
            rest = list(iter_shard(source, start=pos))
            assert [(r.key, r.data, r.ordinal) for r in rest] == [(r.key, r.data, r.ordinal) for r in every[s.ordinal + 1 :]]
        # A sample alone, by its header offset.
        again = next(iter_shard(url, start=ShardPos(s.ordinal, s.offset, None)))
        assert (again.key, again.data) == (s.key, s.data)


def test_resume_opens_only_the_shards_it_needs(tmp_path):
    """The issue's measurement, small: a logging pipe: opener counts shard opens. The
    resumed stream equals the uninterrupted one and opens only the shards that were open
    or held buffered samples (plus those the next steps need), not the consumed ones."""
    pattern = make_shards(tmp_path / "s", 40, 12)
    log = tmp_path / "opens.log"
    cfg = DataConfig(path=logged(pattern, log), resolution=RES, num_val=0, num_workers=2, shards_per_worker=2,
                     shuffle_buffer=6)  # fmt: skip
    k, m = 60, 4
    full = take(build_train_loader(cfg, 4, seed=3), k + m)  # uninterrupted
    opened_full = count(log) - 1  # (start-up probes read one shard)

    log.unlink()
    loader = build_train_loader(cfg, 4, seed=3)
    head = take(loader, k)
    opened_head = count(log) - 1
    state = json.loads(json.dumps(loader.state_dict()))

    log.unlink()
    tail = take(build_train_loader(cfg, 4, seed=3, resume_states=[state]), m)
    opened_resume = count(log) - 1
    assert same_batches(head + tail, full)
    held = {u[0] for w in state["workers"] for u in w["open"]} | {b[0] for w in state["workers"] for b in w["buffer"]}
    print(f"\nshard opens: uninterrupted {k}+{m} steps {opened_full}, first {k} steps {opened_head}, resume for "
          f"{m} steps {opened_resume} (the saved state refers to {len(held)} shards)")  # fmt: skip
    # Which shards the resume opened, by index (make_shards names them shard-XXX.tar, pattern order).
    resumed = [int(line.rsplit("shard-", 1)[1][:3]) for line in log.read_text().splitlines()[1:]]
    assert len(resumed) == len(set(resumed)), f"a shard was opened twice on resume: {resumed}"
    # Shards finished before the saved position (started units that are no longer open): never
    # opened again, except to fetch samples still in the buffer. (What workers had prefetched
    # past the position is not "finished": the resumed run may open those, once.)
    finished = set()
    for w, st in enumerate(state["workers"]):
        plan = st["plan"] or default_plan(40, 3, st["epoch"], w, len(state["workers"]))
        finished |= {u[0] for u in plan[: st["next_unit"]]} - {u[0] for u in st["open"]}
    assert len(finished - held) >= 10  # the check below has something to catch
    assert not (set(resumed) & (finished - held)), sorted(set(resumed) & (finished - held))
    assert opened_resume < opened_head / 2  # re-reading would open all of opened_head again


def test_resume_seeks_in_local_tars(tmp_path):
    """From local uncompressed tars, a resume reads the needed members only, not the prefix."""
    if not Path("/proc/self/io").exists():
        pytest.skip("needs /proc/self/io")
    pattern = make_shards(tmp_path / "s", 2, 120)
    cfg = DataConfig(path=pattern, resolution=RES, num_val=0, num_workers=0, shards_per_worker=2, shuffle_buffer=4)
    loader = build_train_loader(cfg, 4, seed=0)
    take(loader, 40)  # 160 of the 240 samples: both shards are far in
    state = loader.state_dict()
    expected = take(loader, 2)

    def rchar() -> int:
        return int(next(line for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar")).split()[1])

    resumed = build_train_loader(cfg, 4, seed=0, state=state)
    before = rchar()
    got = take(resumed, 2)
    read = rchar() - before
    assert same_batches(got, expected)
    shard_bytes = os.path.getsize(expand_shards(pattern)[0])
    print(f"\nresume read {read} bytes; one shard is {shard_bytes}")
    assert read < shard_bytes / 4  # a prefix re-read would be >= 2/3 of each shard


# by shard; by sample (1 shard < 2 slots). Sized so that no slot finishes the epoch in 5 batches.
@pytest.mark.parametrize("world,workers,n_shards,per_shard", [(2, 2, 12, 4), (2, 1, 1, 40)])
def test_multi_rank_resume_is_exact(tmp_path, world, workers, n_shards, per_shard):
    pattern = make_shards(tmp_path / "s", n_shards, per_shard)
    cfg = DataConfig(path=pattern, resolution=RES, num_val=2, num_workers=workers, shards_per_worker=3, shuffle_buffer=5)
    loaders = [build_train_loader(cfg, 3, seed=1, rank=r, world_size=world) for r in range(world)]
    heads = [take(lo, 5) for lo in loaders]
    states = [json.loads(json.dumps(lo.state_dict())) for lo in loaders]
    tails = [take(lo, 5) for lo in loaders]
    for r in range(world):
        resumed = build_train_loader(cfg, 3, seed=1, rank=r, world_size=world, resume_states=states)
        assert same_batches(take(resumed, 5), tails[r])
    keys = [k for h in heads for b in h for k in b["key"]]
    assert len(keys) == len(set(keys))  # ranks and workers disjoint within the epoch


def distinct_shards_per_batch(batches: list[dict]) -> float:
    return sum(len({shard_of(k) for k in b["key"]}) for b in batches) / len(batches)


def test_interleaving_spreads_batches_over_shards(tmp_path):
    """The measured figure: distinct shards per batch of 8, one shard per worker through a
    buffer of half a shard (the old scheme, scaled down) vs 4 interleaved shards."""
    pattern = make_shards(tmp_path / "s", 16, 32)
    figures = {}
    for k in (1, 4):
        cfg = DataConfig(path=pattern, resolution=RES, num_val=0, num_workers=0, shards_per_worker=k, shuffle_buffer=16)
        figures[k] = distinct_shards_per_batch(take(build_train_loader(cfg, 8, seed=0), 24))
    print(f"\ndistinct shards per batch of 8: 1 shard per worker {figures[1]:.2f}, 4 interleaved {figures[4]:.2f}")
    assert figures[4] >= 3.0 and figures[4] >= 1.8 * figures[1]


def slot_keys_until_epoch_end(urls: list[str], cfg: DataConfig, state: dict, slot: int, slots: int) -> list[str]:
    stream = SlotStream(urls, cfg, seed=1, slot=slot, slots=slots, state=state)
    keys = []
    while True:
        epoch, raw = stream.next()
        if epoch != state["epoch"]:
            stream.close()
            return keys
        keys.append(raw.key)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core machine
@pytest.mark.parametrize("new_world,new_workers", [(1, 3), (3, 2)])
def test_elastic_shard_resume_neither_repeats_nor_skips(tmp_path, caplog, new_world, new_workers):
    """2 ranks x 2 workers resumed on other layouts: the rest of the epoch, read by the new
    slots, is exactly what the old ones had not yet consumed (finished shards are not
    read again, open ones continue, buffered samples are fetched by position)."""
    pattern = make_shards(tmp_path / "s", 12, 6)
    urls = expand_shards(pattern)
    cfg = DataConfig(path=pattern, resolution=RES, num_val=0, num_workers=2, shards_per_worker=2, shuffle_buffer=4)
    loaders = [build_train_loader(cfg, 3, seed=1, rank=r, world_size=2) for r in range(2)]
    used = [k for lo in loaders for b in take(lo, 4) for k in b["key"]]
    states = [json.loads(json.dumps(lo.state_dict())) for lo in loaders]
    assert all(w["epoch"] == 0 for s in states for w in s["workers"])

    new_cfg = DataConfig(**{**cfg.__dict__, "num_workers": new_workers, "shards_per_worker": 3, "shuffle_buffer": 7})
    rest = []
    with caplog.at_level(logging.WARNING):
        for r in range(new_world):
            loader = build_train_loader(new_cfg, 5, seed=1, rank=r, world_size=new_world, resume_states=states)
            for w, st in enumerate(loader.state_dict()["workers"]):
                rest += slot_keys_until_epoch_end(urls, new_cfg, st, r * new_workers + w, new_world * new_workers)
    assert "elastic data resume" in caplog.text and "data order differs" in caplog.text
    assert sorted(used + rest) == sorted(f"s{s}_{i:03d}" for s in range(12) for i in range(6))
    # And the resumed loader itself runs (worker processes, decoding) with the new layout.
    loader = build_train_loader(new_cfg, 5, seed=1, rank=0, world_size=new_world, resume_states=states)
    keys = [k for b in take(loader, 2) for k in b["key"]]
    assert len(keys) == 10 and not set(keys) & set(used)


def test_resume_names_a_shard_that_changed(tmp_path):
    pattern = make_shards(tmp_path / "s", 2, 8)
    cfg = DataConfig(path=pattern, resolution=RES, num_val=0, num_workers=0, shards_per_worker=2, shuffle_buffer=4)
    loader = build_train_loader(cfg, 2, seed=0)
    take(loader, 3)
    state = loader.state_dict()
    with wds.TarWriter(str(tmp_path / "s" / "shard-000.tar")) as w:  # same images, other keys
        for i in range(8):
            w.write({"__key__": f"other_{i:03d}", "png": encode(noise(i), "PNG"), "txt": "a caption"})
    with pytest.raises(RuntimeError, match=r"shard-000\.tar changed since the loader position was saved: .*'other_"):
        take(build_train_loader(cfg, 2, seed=0, state=state), 1)


def test_fresh_epochs_reshuffle_shard_order(tmp_path):
    pattern = make_shards(tmp_path / "s", 8, 2)
    urls = expand_shards(pattern)
    cfg = DataConfig(path=pattern, resolution=RES, num_val=0, num_workers=0, shards_per_worker=1, shuffle_buffer=1)
    stream = SlotStream(urls, cfg, seed=0, slot=0, slots=1, state=fresh_slot_state())
    order = [[], []]
    while True:
        epoch, raw = stream.next()
        if epoch == 2:
            break
        if shard_of(raw.key) not in order[epoch]:
            order[epoch].append(shard_of(raw.key))
    assert sorted(order[0]) == sorted(order[1]) and order[0] != order[1]
