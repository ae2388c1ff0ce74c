"""The node data cache (fl_app.data.node_data): equal to a fresh derivation, keyed by everything that
determines it, never trusting a damaged file, and safe with concurrent writers."""

import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from client_app.node import LocalNode
from fl_app import data as fl_data
from fl_app.data import (derive_node_data, evaluation_indices, federated_split, forget_held_data, load_dataset,
                         node_cache_key,
                         node_data, read_node_cache, resolve_cache_dir, write_node_cache)

FIELDS = ("x_train", "y_train", "x_public", "x_test", "y_test")


def node_message(*args):
    """`node_data` as a deployed node's message calls it: in a fresh process, nothing held in memory."""
    forget_held_data()
    return node_data(*args)


def _npz(path: Path, seed: int = 0, n_train: int = 300, n_test: int = 60) -> str:
    rng = np.random.default_rng(seed)
    np.savez(path, x_train=rng.integers(0, 255, (n_train, 8, 8, 3), dtype=np.uint8),
             y_train=rng.integers(0, 4, n_train), x_test=rng.integers(0, 255, (n_test, 8, 8, 3), dtype=np.uint8),
             y_test=rng.integers(0, 4, n_test))
    return f"npz:{path}"


def _args(name: str, **change) -> tuple:
    a = {"dataset": name, "data_dir": "", "seed": 3, "num_partitions": 4, "partition_id": 1, "scheme": "dirichlet",
         "alpha": 0.5, "shards_per_client": 2, "public_size": 40, "max_client_examples": 0, "test_size": 30}
    a.update(change)
    return tuple(a.values())


def _equal(a, b) -> bool:
    return (all(torch.equal(getattr(a, f), getattr(b, f)) for f in FIELDS)
            and (a.num_classes, a.mean, a.std) == (b.num_classes, b.mean, b.std))


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("node-*.npz"))


@pytest.fixture(autouse=True)
def _fresh_memo():
    forget_held_data()  # the in-process memo would hide the disk
    yield
    forget_held_data()


def test_cache_returns_arrays_equal_to_a_fresh_derivation(tmp_path, monkeypatch):
    name = _npz(tmp_path / "d.npz")
    cache = tmp_path / "cache"
    derived = {}
    for pid in range(4):
        args = _args(name, partition_id=pid)
        fresh = derived[pid] = derive_node_data(*args)
        # ... which is what the node cut from the whole dataset before the cache existed
        d = load_dataset(name, "", 3)
        split = federated_split(d, 4, "dirichlet", 3, 0.5, 2, 40, 0)
        test = torch.from_numpy(evaluation_indices(len(d.y_test), 30, 3)[pid::4])
        assert torch.equal(fresh.x_train, d.x_train[torch.from_numpy(split.clients[pid])])
        assert torch.equal(fresh.x_public, d.x_train[torch.from_numpy(split.public)])
        assert torch.equal(fresh.y_test, d.y_test[test])
        assert _equal(node_message(*args, str(cache)), fresh)  # derived, then written
    assert len(_entries(cache)) == 4
    forget_held_data()
    monkeypatch.setattr(fl_data, "derive_node_data", lambda *a: pytest.fail("a cache hit must not derive"))
    for pid in range(4):
        hit = node_message(*_args(name, partition_id=pid), str(cache))
        assert _equal(hit, derived[pid])
        assert hit.image_shape == (3, 8, 8)
        assert torch.equal(hit.normalize(hit.x_train), load_dataset(name, "", 3).normalize(hit.x_train))


def test_a_hit_equals_a_fresh_derivation_for_synthetic_data(tmp_path):
    args = ("synthetic", "", 0, 3, 2, "iid", 0.5, 2, 100, 64, 200)
    first = node_data(*args, str(tmp_path))
    forget_held_data()
    assert _equal(node_data(*args, str(tmp_path)), derive_node_data(*args)) and _equal(first, derive_node_data(*args))


def test_a_change_to_any_key_part_misses(tmp_path):
    name = _npz(tmp_path / "d.npz")
    other = _npz(tmp_path / "e.npz", seed=1)
    base = node_cache_key(*_args(name))
    changes = {"dataset": other, "data_dir": str(tmp_path), "seed": 4, "num_partitions": 5, "partition_id": 2,
               "scheme": "iid", "alpha": 0.3, "shards_per_client": 3, "public_size": 41, "max_client_examples": 10,
               "test_size": 31}
    keys = {part: node_cache_key(*_args(name, **{part: value})) for part, value in changes.items()}
    assert base not in keys.values() and len(set(keys.values())) == len(changes)
    assert node_cache_key(*_args(name)) == base  # and an unchanged one hits
    # the file itself: a new mtime, or a new size, is another key
    path = tmp_path / "d.npz"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    touched = node_cache_key(*_args(name))
    _npz(path, n_train=301)
    assert len({base, touched, node_cache_key(*_args(name))}) == 3


def test_changed_data_are_derived_again_not_served_stale(tmp_path):
    path = tmp_path / "d.npz"
    name = _npz(path, seed=0)
    cache = str(tmp_path / "cache")
    before = node_data(*_args(name), cache)
    _npz(path, seed=5)  # same shapes and size, new pixels and labels
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # even on a coarse clock
    forget_held_data()  # load_dataset's memo still holds the old arrays: they must not be stored
    after = node_data(*_args(name), cache)
    assert not torch.equal(before.x_train, after.x_train)
    assert _equal(after, derive_node_data(*_args(name), fresh=True))
    forget_held_data()
    assert _equal(node_data(*_args(name), cache), after)  # and what was stored is the new data


def test_the_key_covers_the_code_and_library_versions(tmp_path):
    key = node_cache_key(*_args(_npz(tmp_path / "d.npz")))
    assert fl_data._code_digest() in key and torch.__version__ in key and np.__version__ in key


def _damage(path: Path, how: str) -> None:
    blob = path.read_bytes()
    if how == "truncated":
        path.write_bytes(blob[:len(blob) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(os.urandom(len(blob)))
    elif how == "flipped":  # one byte changed inside an array: the zip's CRC no longer matches
        mid = len(blob) // 2
        path.write_bytes(blob[:mid] + bytes([blob[mid] ^ 0xFF]) + blob[mid + 1:])
    elif how == "wrong-dtype":  # a well-formed file, its key right, an array of the wrong type
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["x_train"] = arrays["x_train"].astype(np.float32)
        np.savez(path, **arrays)
    elif how == "short-labels":
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["y_train"] = arrays["y_train"][:-1]
        np.savez(path, **arrays)


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage", "flipped", "wrong-dtype", "short-labels"])
def test_a_damaged_cache_file_is_derived_again_and_replaced(tmp_path, how):
    name = _npz(tmp_path / "d.npz")
    cache = tmp_path / "cache"
    fresh = node_data(*_args(name), str(cache))
    (entry,) = _entries(cache)
    _damage(entry, how)
    forget_held_data()
    assert _equal(node_data(*_args(name), str(cache)), fresh)  # no error, the right arrays
    assert read_node_cache(entry, node_cache_key(*_args(name))) is not None  # and the file is good again


def test_a_process_that_holds_the_dataset_serves_more_nodes_from_memory_not_the_disk(tmp_path, monkeypatch):
    """A simulation: one long-lived process answers for many nodes; one cache entry, not one per node."""
    name = _npz(tmp_path / "d.npz")
    cache = tmp_path / "cache"
    node_message(*_args(name, partition_id=0), str(cache))
    monkeypatch.setattr(fl_data, "read_node_cache", lambda *a: pytest.fail("a held dataset must not read the disk"))
    for pid in (1, 2, 3):
        assert _equal(node_data(*_args(name, partition_id=pid), str(cache)), derive_node_data(*_args(name, partition_id=pid)))
    assert len(_entries(cache)) == 1


def test_a_file_stored_under_another_key_is_not_used(tmp_path):
    name = _npz(tmp_path / "d.npz")
    cache = tmp_path / "cache"
    node_message(*_args(name, partition_id=0), str(cache))
    node_message(*_args(name, partition_id=1), str(cache))
    a, b = _entries(cache)
    b.write_bytes(a.read_bytes())  # one node's file where the other's belongs
    forget_held_data()
    for pid in (0, 1):
        assert _equal(node_message(*_args(name, partition_id=pid), str(cache)), derive_node_data(*_args(name, partition_id=pid)))


def test_an_unwritable_cache_costs_only_the_cache(tmp_path):
    name = _npz(tmp_path / "d.npz")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert _equal(node_data(*_args(name), str(blocker / "cache")), derive_node_data(*_args(name)))


_SHARED: dict = {}  # what the forked writers write (numpy only in the children: no torch thread pools after fork)


def test_old_entries_and_the_oldest_beyond_the_size_cap_are_removed(tmp_path, monkeypatch):
    name = _npz(tmp_path / "d.npz")
    cache = tmp_path / "cache"
    entry = {}
    for pid in range(4):
        before = set(_entries(cache)) if cache.exists() else set()
        node_message(*_args(name, partition_id=pid), str(cache))
        (entry[pid],) = set(_entries(cache)) - before
    now = entry[0].stat().st_mtime
    for pid, age_s in ((1, 3600), (2, 1800), (3, 600)):
        os.utime(entry[pid], (now - age_s, now - age_s))
    stale_tmp = cache / ".node-x.npz.abc.tmp"  # left by a writer that was killed
    stale_tmp.write_bytes(b"partial")
    os.utime(stale_tmp, (now - 40 * 86400, now - 40 * 86400))
    size = {pid: p.stat().st_size for pid, p in entry.items()}
    entry[0].unlink()  # partition 0 misses and is written anew
    forget_held_data()
    # that write prunes: the temporary file by age; then, with room for three entries, the oldest
    # (entry 1), never the one just written
    monkeypatch.setattr(fl_data, "CACHE_MAX_BYTES", size[0] + size[2] + size[3])
    node_message(*_args(name, partition_id=0), str(cache))
    assert not stale_tmp.exists() and not entry[1].exists()
    assert all(entry[pid].exists() for pid in (0, 2, 3))
    monkeypatch.setattr(fl_data, "CACHE_MAX_BYTES", 1)
    node_message(*_args(name, seed=9), str(cache))
    assert len(_entries(cache)) == 1  # only the entry just written
    forget_held_data()
    assert _equal(node_message(*_args(name, seed=9), str(cache)), derive_node_data(*_args(name, seed=9)))


def test_an_entry_past_its_age_is_removed_when_another_is_written(tmp_path):
    name = _npz(tmp_path / "d.npz")
    cache = tmp_path / "cache"
    node_message(*_args(name, partition_id=0), str(cache))
    (old,) = _entries(cache)
    past = old.stat().st_mtime - (fl_data.CACHE_MAX_AGE_DAYS + 1) * 86400
    os.utime(old, (past, past))
    node_message(*_args(name, partition_id=1), str(cache))
    assert not old.exists() and len(_entries(cache)) == 1


def _write_many(path: str, times: int) -> None:
    for _ in range(times):
        write_node_cache(Path(path), _SHARED["key"], _SHARED["data"])


def test_concurrent_writers_leave_a_valid_file(tmp_path):
    name = _npz(tmp_path / "d.npz")
    args = _args(name)
    key = node_cache_key(*args)
    _SHARED.update(key=key, data=derive_node_data(*args))
    path = tmp_path / "cache" / "node-shared.npz"
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_write_many, args=(str(path), 15)) for _ in range(4)]
    for w in writers:
        w.start()
    deadline = time.monotonic() + 60
    while any(w.is_alive() for w in writers) and time.monotonic() < deadline:
        if path.exists():  # a reader sees a whole file or none, never a partial one
            with np.load(path) as z:
                assert str(z["key"][()]) == key and len(z["x_train"]) == len(_SHARED["data"].x_train)
    for w in writers:
        w.join(timeout=max(1.0, deadline - time.monotonic()))
        assert w.exitcode == 0
    assert _equal(read_node_cache(path, key), derive_node_data(*args))
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files left behind


def test_cache_location_node_config_then_environment_then_user_cache(tmp_path, monkeypatch):
    monkeypatch.delenv(fl_data.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_dir() == str(tmp_path / "xdg" / "fl-app" / "nodes")
    monkeypatch.setenv(fl_data.CACHE_ENV, str(tmp_path / "env"))
    assert resolve_cache_dir() == str(tmp_path / "env")
    assert resolve_cache_dir(str(tmp_path / "node")) == str(tmp_path / "node")
    assert resolve_cache_dir("off") == "" and resolve_cache_dir("OFF") == ""
    monkeypatch.setenv(fl_data.CACHE_ENV, "off")
    assert resolve_cache_dir() == ""


def _node(run_config: dict, **node_config) -> LocalNode:
    context = Context(run_id=1, node_id=2, state=RecordDict(), run_config=run_config,
                      node_config={"partition-id": 1, "num-partitions": 4, **node_config})
    return LocalNode.from_context(context)


def test_a_node_reads_its_rows_through_the_cache_it_is_configured_with(tmp_path, monkeypatch):
    name = _npz(tmp_path / "d.npz")
    run_config = {"dataset": name, "seed": 3, "partition": "dirichlet", "public-size": 40, "test-size": 30}
    node = _node(run_config, **{"cache-dir": str(tmp_path / "node-cache")})
    assert node.num_examples == len(node.split.clients[1])
    assert len(_entries(tmp_path / "node-cache")) == 1
    assert _equal(node.data, derive_node_data(*_args(name)))
    batches = node.test_batches()
    assert torch.equal(batches.x, node.data.x_test) and len(batches) == len(range(1, 30, 4))
    monkeypatch.setenv(fl_data.CACHE_ENV, "off")
    forget_held_data()
    off = _node(run_config)
    assert off.cache_dir == "" and _equal(off.data, node.data)
