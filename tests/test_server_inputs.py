"""What the server checks and says about field inputs (issue #14, items 5, 7, 8 and the console part of 9):
nodes without data are left out after the device query, problems the server can see are refused before
any node is asked, identical node errors are one line, a run that stops before training leaves a
results.json that says so, and the console says who was left out and why."""

import logging

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from experiments.inprocess import InProcessGrid
from fl_app.config import ConfigError, RunConfig
from fl_app.data import DataError, evaluation_indices, federated_split, load_dataset, make_synthetic
from fl_app.results import load_results, summarize
from server_app.server_app import NoDevicesError, _test_batches, main, progress_line
from server_app.strategies import STRATEGIES
from server_app.strategies.base import StrategySetupError

BASE = {"strategy": "fedavg", "memory-pool": "", "num-server-rounds": 1, "device-mix": "workstation:1", "public-size": 8, "max-client-examples": 16,
        "min-nodes": 2, "model": "cnn", "run-name": "run"}


def _npz(path, n_train=20, n_test=10, shape=(8, 8), classes=3):
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 255, (n_train, *shape), dtype=np.uint8), y_train=np.arange(n_train) % classes,
             x_test=rng.integers(0, 255, (n_test, *shape), dtype=np.uint8), y_test=np.arange(n_test) % classes)
    return f"npz:{path}"


def _config(tmp_path, **overrides):
    return {**BASE, "output-dir": str(tmp_path), **overrides}


def _main(grid, config):
    main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))


def _run(tmp_path, num_nodes, tamper=None, node_config=None, on_grid=None, **overrides):
    config = _config(tmp_path, **overrides)
    grid = InProcessGrid(config, num_nodes, tamper, node_config)
    if on_grid:
        on_grid(grid)
    _main(grid, config)
    return _results(tmp_path), grid


def _results(tmp_path, name="run"):
    return load_results(tmp_path / name)


def _trained(grid):
    return {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "train"}


def _empty_partitions(config, num_nodes):
    c = RunConfig.from_mapping(config)
    split = federated_split(load_dataset(c.dataset, c.data_dir, c.seed), num_nodes, c.partition, c.seed,
                            c.dirichlet_alpha, c.shards_per_client, c.public_size, c.max_client_examples)
    return [pid for pid, idx in enumerate(split.clients) if len(idx) == 0]


# --- 5. nodes with no data ------------------------------------------------------------------------


def test_nodes_without_data_are_left_out_never_sent_a_task_and_never_counted_as_rejected(tmp_path):
    """The issue's case: shards of 12 private examples over 10 nodes, fraction-train 0.1."""
    overrides = {"dataset": _npz(tmp_path / "d.npz", n_train=20), "partition": "shards", "fraction-train": 0.1,
                 "num-server-rounds": 3}
    empty = {pid + 1 for pid in _empty_partitions(_config(tmp_path, **overrides), 10)}
    assert empty and len(empty) < 8
    results, grid = _run(tmp_path, 10, **overrides)
    assert results["status"] == "completed"
    assert not _trained(grid) & empty
    for r in results["rounds"]:
        assert r["attempts"] == 1 and r["rejected"] == 0 and r["participants"] == 1
        for c in r["clients"]:
            if c["node_id"] in empty:
                assert not c["participated"] and c["error"] is None and "holds no training data" in c["left_out"]
        assert r["left_out_by_kind"] == {"no data": len(empty)}
    assert {d["node_id"] for d in results["devices"]} == set(range(1, 11))  # still recorded


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_runs_with_nodes_that_hold_no_data(tmp_path, strategy):
    overrides = {"dataset": _npz(tmp_path / "d.npz", n_train=14), "partition": "shards", "strategy": strategy}
    empty = {pid + 1 for pid in _empty_partitions(_config(tmp_path, **overrides), 4)}
    assert empty == {4}
    results, grid = _run(tmp_path, 4, **overrides)
    assert results["status"] == "completed" and 4 not in _trained(grid)
    record = results["rounds"][0]
    assert record["rejected"] == 0 and record["clients"][3]["left_out"].startswith("holds no training data")


def test_a_joining_node_without_data_is_left_out_too(tmp_path):
    overrides = {"dataset": _npz(tmp_path / "d.npz", n_train=14), "partition": "shards", "num-server-rounds": 2}

    def on_grid(grid):  # node 4 (the empty partition 3) connects only during round 1
        grid.offline.add(4)

        def tamper(node, reply):
            if reply.metadata.message_type == "train":
                grid.offline.discard(4)
            return reply
        grid.tamper = tamper

    results, grid = _run(tmp_path, 4, on_grid=on_grid, **overrides)
    assert results["status"] == "completed" and 4 not in _trained(grid)
    assert [d["node_id"] for d in results["devices"]] == [1, 2, 3, 4]
    joined = results["rounds"][1]["clients"][-1]
    assert joined["node_id"] == 4 and "holds no training data" in joined["left_out"]


def test_nodes_whose_counts_contradict_the_split_the_run_stops_before_any_task_with_one_line(tmp_path):
    # The server derives the split itself (server_app.verify): a report of no data where the
    # partition holds some is a wrong report, and a run left with none stops before training.
    def no_data(node, reply):
        if reply.metadata.message_type == "query" and not reply.has_error():
            reply.content["device"]["num_examples"] = 0
        return reply

    with pytest.raises(NoDevicesError, match="reports 0 training examples; partition 0 of 3 holds") as info:
        _run(tmp_path, 3, tamper=no_data)
    assert "\n" not in str(info.value)
    assert _results(tmp_path)["status"] == "failed"


# --- 7. one line that names the problem and the fix; the server checks what it can -----------------


@pytest.mark.parametrize("overrides, match", [
    ({"partition": "dirichlet", "dirichlet-alpha": 0.001, "dataset": "synthetic"}, "dirichlet-alpha"),
    ({"public-size": 100000, "dataset": "synthetic"}, "public-size"),
    ({"dataset": "SMALL"}, "cannot split 4 examples into 20 partitions"),
])
def test_what_the_server_can_check_is_refused_before_any_node_is_asked(tmp_path, caplog, overrides, match):
    if overrides.get("dataset") == "SMALL":
        overrides = {**overrides, "dataset": _npz(tmp_path / "small.npz", n_train=12)}
    config = _config(tmp_path, **overrides)
    grid = InProcessGrid(config, 20)
    with caplog.at_level(logging.INFO, logger="flwr"), pytest.raises(DataError, match=match) as info:
        _main(grid, config)
    assert grid.sent == []  # not even the device query
    assert "\n" not in str(info.value)
    mentions = [r for r in caplog.records if match.split()[0] in r.getMessage()]
    assert len(mentions) == 1 and mentions[0].levelno == logging.ERROR


def test_identical_node_errors_are_one_line_under_a_headline_that_says_they_answered(tmp_path, caplog):
    node_config = {n: {"profile": "no-such-device"} for n in range(1, 6)}
    with caplog.at_level(logging.INFO, logger="flwr"), pytest.raises(NoDevicesError) as info:
        _run(tmp_path, 5, node_config=node_config, dataset="synthetic")
    message = str(info.value)
    assert "answered the device query with errors" in message and "5 nodes" in message
    assert message.count("no-such-device") == 1 and len(message) < 600
    assert sum("no-such-device" in r.getMessage() for r in caplog.records) == 1  # no warning per node


def test_some_nodes_with_errors_are_grouped_and_the_others_run(tmp_path, caplog):
    node_config = {n: {"profile": "no-such-device"} for n in (2, 3)}
    with caplog.at_level(logging.INFO, logger="flwr"):
        results, _ = _run(tmp_path, 4, node_config=node_config, dataset="synthetic")
    assert [d["node_id"] for d in results["devices"]] == [1, 4]
    warned = [r.getMessage() for r in caplog.records if "no-such-device" in r.getMessage()]
    assert len(warned) == 1 and "2 nodes" in warned[0]


# --- 8. a run that stops before training leaves results.json that says so --------------------------


def test_a_data_error_before_training_leaves_failed_results_with_the_error_and_config(tmp_path):
    with pytest.raises(DataError):
        _run(tmp_path, 20, dataset="synthetic", **{"public-size": 100000})
    doc = _results(tmp_path)
    assert doc["status"] == "failed" and "public-size" in doc["error"] and doc["rounds"] == []
    assert doc["config"]["public_size"] == 100000


def test_an_invalid_config_leaves_failed_results_in_the_named_folder(tmp_path):
    with pytest.raises(ConfigError):
        _run(tmp_path, 2, strategy="nope")
    doc = _results(tmp_path)
    assert doc["status"] == "failed" and "strategy = 'nope'" in doc["error"]
    assert doc["config"]["strategy"] == "nope"  # as given: it could not be parsed


def test_a_strategy_that_cannot_run_leaves_failed_results_with_the_devices(tmp_path):
    with pytest.raises(StrategySetupError):
        _run(tmp_path, 2, strategy="exclusivefl", model="resnet18", dataset="synthetic",
             **{"device-mix": "raspberry-pi-3b-plus:1", "batch-size": 512})
    doc = _results(tmp_path)
    assert doc["status"] == "failed" and "exclusivefl" in doc["error"] and len(doc["devices"]) == 2


def test_a_finished_run_is_never_overwritten_and_a_failed_setup_never_blocks_a_rerun(tmp_path):
    with pytest.raises(DataError):
        _run(tmp_path, 2, dataset="synthetic", **{"public-size": 100000})
    results, _ = _run(tmp_path, 2, dataset="synthetic", **{"public-size": 8})  # the corrected run, same name
    assert results["status"] == "completed"
    before = (tmp_path / "run" / "results.json").read_bytes()
    with pytest.raises(ConfigError, match="already holds the results"):
        _run(tmp_path, 2, dataset="synthetic", **{"public-size": 100000})
    assert (tmp_path / "run" / "results.json").read_bytes() == before


# --- 9. the console: who was left out and why; ProFL's stage and block --------------------------------


def _record(**extra):
    clients = [{"node_id": n, "error": None, "participated": n <= 12} for n in range(1, 21)]
    return {"round": 2, "accuracy": 0.5, "loss": 1.0, "bytes_down": 0, "bytes_up": 0, "participants": 12,
            "clients": clients, "seconds": 1.0, **extra}


def test_the_progress_line_says_how_many_were_left_out_and_why():
    line = progress_line(_record(left_out_by_kind={"memory": 6, "compute": 2}), 5)
    assert "clients 12/20 (8 left out: memory 6, compute 2; 0 failed)" in line
    assert "clients 12/20 (0 failed)" in progress_line(_record(left_out_by_kind={}), 5)


def test_the_progress_line_shows_profl_stage_and_block():
    assert progress_line(_record(stage="grow", active_block=2, step="train"), 5).endswith("profl grow block 2")
    assert "profl shrink block 3 mimic" in progress_line(_record(stage="shrink", active_block=3, step="mimic"), 5)


def test_run_logs_left_out_devices_per_round_and_the_device_table_once(tmp_path, caplog):
    mix = "raspberry-pi-3b-plus:1,raspberry-pi-4:1,laptop:1,workstation:1"
    with caplog.at_level(logging.INFO, logger="flwr"):
        results, _ = _run(tmp_path, 4, dataset="synthetic", strategy="exclusivefl",
                          **{"device-mix": mix, "num-server-rounds": 2, "emulated-deadline": 0.6,
                             "public-size": 100, "max-client-examples": 64, "test-size": 100})
    messages = [r.getMessage() for r in caplog.records]
    assert all(r["left_out_by_kind"] == {"deadline": 2} for r in results["rounds"])
    rounds = [m for m in messages if m.startswith("round ")]
    assert len(rounds) == 2 and all("clients 2/4 (2 left out: deadline 2; 0 failed)" in m for m in rounds)
    table = [m for m in messages if "GFLOPS  memory" in m]
    assert len(table) == 4  # one row per profile, logged once
    pi = next(m for m in table if "raspberry-pi-3b-plus" in m)
    assert "x1" in pi and "left out 1 (deadline)" in pi
    summary = next(m for m in messages if "exclusivefl leaves out 2 of 4 devices" in m)
    assert "deadline 2" in summary and "raise emulated-deadline" in summary


def test_the_device_table_gives_the_memory_range_of_a_memory_pool(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="flwr"):
        _run(tmp_path, 4, dataset="synthetic", strategy="profl",
             **{"device-mix": "laptop:1", "memory-pool": "uniform-fraction:0.3-1.3",
                "public-size": 100, "max-client-examples": 32, "test-size": 100})
    [row] = [r.getMessage() for r in caplog.records if "GFLOPS" in r.getMessage()]
    low, high = (float(x) for x in row.split("memory ")[1].split(" MB")[0].split("-"))
    assert "x4" in row and low < high
    rounds = [r.getMessage() for r in caplog.records if r.getMessage().startswith("round ")]
    assert "profl grow block 1" in rounds[0]  # one round: no shrinking (profl-shrink-share of 1 round)


# --- follow-ups -----------------------------------------------------------------------------------------


def test_the_server_test_set_is_the_evaluation_indices_subset():
    d = make_synthetic(train_size=20, test_size=500)
    config = RunConfig.from_mapping({"test-size": 120, "seed": 4})
    batches = _test_batches(d, config)
    assert torch.equal(batches.y, d.y_test[torch.from_numpy(evaluation_indices(500, 120, 4))])


def test_a_round_without_an_accuracy_is_logged_and_summarized():
    record = _record(accuracy=None, loss=None)
    assert "accuracy n/a  loss n/a" in progress_line(record, 5)
    summary = summarize([_record(accuracy=0.4), record])
    assert summary["final_accuracy"] is None and summary["best_accuracy"] == 0.4


def _flower_logs_a_failed_serverapp(exc: Exception, caplog) -> logging.LogRecord:
    """What Flower's run_serverapp does with the exception that ended a ServerApp."""
    from flwr.common.logger import log as flwr_log

    caplog.clear()
    try:
        raise exc
    except Exception as raised:  # noqa: BLE001 - as Flower catches it
        flwr_log(logging.ERROR, "%s raised an exception", "ServerApp", exc_info=raised)
    return next(r for r in caplog.records if "raised an exception" in r.getMessage())


def test_flower_adds_no_traceback_to_a_setup_error_but_keeps_a_bugs(caplog):
    import server_app.server_app  # noqa: F401 - installs the filter on Flower's logger

    caplog.set_level(logging.ERROR)
    setup = _flower_logs_a_failed_serverapp(ConfigError("invalid run config: lr = -1"), caplog)
    assert setup.exc_info is None and "says why" in setup.getMessage()
    bug = _flower_logs_a_failed_serverapp(KeyError("a bug"), caplog)
    assert bug.exc_info is not None and isinstance(bug.exc_info[1], KeyError)
