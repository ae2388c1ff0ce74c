"""Run settings from the field (issue #23 items 4 and 5): any seed a user types, and output that cannot
be written. A bad value is refused in one line before any training, or the run works; a write failure
is the run's recorded error and never leaves a folder that can be neither resumed nor reused."""

import errno
import os

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from experiments.inprocess import InProcessGrid
from fl_app.config import ConfigError, RunConfig
from fl_app.data import Batches, federated_split, make_synthetic
from fl_app.results import OutputWriteError, load_results
from fl_app.seeds import SEED_RANGE, generator_seed, numpy_rng, torch_generator
from server_app import checkpoint as checkpoint_module
from server_app.checkpoint import CHECKPOINT
from server_app.server_app import main


def _run(output_dir, seed=0, nodes=2, **overrides):
    config = {"num-server-rounds": 1, "device-mix": "laptop:1,workstation:1", "output-dir": str(output_dir),
              "run-name": "run", "public-size": 8, "max-client-examples": 16, "min-nodes": nodes, "model": "cnn",
              "test-size": 64, "seed": seed, "strategy": "fedavg", "memory-pool": "", **overrides}
    # fedavg on the profiles' own memory: every node trains whatever the seed draws
    main(InProcessGrid(config, nodes), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                               run_config=config))
    return load_results(output_dir / "run")


# --- 4. seeds -----------------------------------------------------------------------------------------

TYPED_SEEDS = [-1, 2**32 - 1, 1_733_300_000_000]  # what users type: -1, uint32 max, a ms timestamp
EXTREME_SEEDS = [SEED_RANGE[0], SEED_RANGE[1]]


@pytest.mark.parametrize("seed", TYPED_SEEDS)
def test_any_seed_a_user_types_runs_every_client(tmp_path, seed):
    results = _run(tmp_path, seed=seed)
    assert results["status"] == "completed", results["error"]
    clients = results["rounds"][0]["clients"]
    assert clients and all(c["error"] is None and c["participated"] for c in clients)


@pytest.mark.parametrize("seed", TYPED_SEEDS + EXTREME_SEEDS)
def test_every_generator_a_seed_derives_accepts_it(seed):
    data = make_synthetic(train_size=40, test_size=8, seed=seed)
    split = federated_split(data, 4, "dirichlet", seed, 0.5, 2, 8, 5)
    assert sum(map(len, split.clients)) <= 32
    node_seed = seed * 7919 + 3 * 104729 + 5  # client_app.node: one stream per node and round
    batches = Batches(data.x_train, data.y_train, data, batch_size=8, seed=node_seed)
    assert sum(len(y) for _, y in batches.epoch(2, augment=True)) == 40


def test_seeds_that_worked_before_keep_their_streams():
    """Reducing modulo 2^64 changes nothing for a seed numpy and torch already took: old runs reproduce."""
    assert numpy_rng(1234).integers(1 << 30) == np.random.default_rng(1234).integers(1 << 30)
    assert numpy_rng([7, 3, 4111]).random() == np.random.default_rng([7, 3, 4111]).random()
    for seed in (0, 42, -5, 2**63 + 9):
        assert torch.randint(1000, (4,), generator=torch_generator(seed)).tolist() == \
            torch.randint(1000, (4,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_distinct_typed_seeds_give_distinct_generators():
    seeds = TYPED_SEEDS + EXTREME_SEEDS + [0, 1]
    assert len({numpy_rng(s).integers(1 << 62) for s in seeds}) == len(seeds)
    assert generator_seed(-1) != generator_seed(1)


def test_a_seed_beyond_64_bits_is_refused_naming_the_range():
    with pytest.raises(ConfigError, match=r"seed = 18446744073709551616: must be a signed 64-bit integer, "
                                          r"-9223372036854775808 to 9223372036854775807"):
        RunConfig.from_mapping({"seed": 2**64})


# --- 5. output that cannot be written ----------------------------------------------------------------


def _assert_nothing_trained_and_refused(exc_info, named):
    assert named in str(exc_info.value) and "\n" not in str(exc_info.value)


def test_an_output_dir_under_a_file_is_refused_before_the_device_query(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr("server_app.server_app.discover_devices", lambda *a, **k: asked.append(1))
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OutputWriteError, match=r"cannot write the run folder .*file/run.*writable output-dir") as info:
        _run(tmp_path / "file")
    _assert_nothing_trained_and_refused(info, "file/run")
    assert not asked


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder; the test above covers the check")
def test_a_read_only_output_dir_is_refused_before_the_device_query(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(OutputWriteError, match=r"Permission denied.*writable output-dir"):
            _run(out)
    finally:
        out.chmod(0o755)


def _disk_full_at_round(monkeypatch, failing_round):
    real = checkpoint_module.atomic_write_bytes
    calls = []

    def write(path, data, suffix=""):
        calls.append(path)
        if len(calls) == failing_round:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data, suffix)

    monkeypatch.setattr(checkpoint_module, "atomic_write_bytes", write)


def test_a_full_disk_at_the_first_checkpoint_is_the_runs_error_and_the_folder_can_be_resumed_or_reused(
        tmp_path, monkeypatch):
    _disk_full_at_round(monkeypatch, 1)
    with pytest.raises(OutputWriteError, match=r"round 1: cannot write .*checkpoint.pt \(No space left on device\)"
                                               r"; no round was saved; .*resume = true"):
        _run(tmp_path)
    failed = load_results(tmp_path / "run")
    assert failed["status"] == "failed" and "No space left" in failed["error"] and failed["rounds"] == []
    assert not (tmp_path / "run" / CHECKPOINT).exists()
    monkeypatch.undo()
    resumed = _run(tmp_path, resume=True)  # restarts: there is nothing to continue from
    assert resumed["status"] == "completed" and [r["round"] for r in resumed["rounds"]] == [1]


def test_a_folder_whose_first_checkpoint_failed_can_be_reused_by_a_fresh_run(tmp_path, monkeypatch):
    _disk_full_at_round(monkeypatch, 1)
    with pytest.raises(OutputWriteError):
        _run(tmp_path)
    monkeypatch.undo()
    assert _run(tmp_path)["status"] == "completed"


def test_a_full_disk_at_a_later_checkpoint_keeps_the_results_at_the_last_checkpointed_round(tmp_path, monkeypatch):
    _disk_full_at_round(monkeypatch, 2)
    with pytest.raises(OutputWriteError, match=r"round 2: .*rounds 1-1 are saved"):
        _run(tmp_path, **{"num-server-rounds": 3})
    assert [r["round"] for r in load_results(tmp_path / "run")["rounds"]] == [1]
    monkeypatch.undo()
    resumed = _run(tmp_path, resume=True, **{"num-server-rounds": 3})
    assert resumed["status"] == "completed" and [r["round"] for r in resumed["rounds"]] == [1, 2, 3]


def test_a_run_holding_rounds_is_still_never_overwritten(tmp_path):
    _run(tmp_path)
    with pytest.raises(ConfigError, match="already holds the results of a run"):
        _run(tmp_path)


def test_temporary_files_of_interrupted_writes_are_removed_when_the_run_starts(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    stale = [folder / ".checkpoint.pt.k2j3h4", folder / ".results.json.a8f9", folder / ".rounds.jsonl.x",
             folder / ".write-probe.q1"]
    for path in stale:
        path.write_bytes(b"half a file")
    (folder / "notes.txt").write_text("the user's")
    assert _run(tmp_path)["status"] == "completed"
    assert not any(p.exists() for p in stale) and (folder / "notes.txt").exists()
