"""Surviving real devices, in-process: deadlines, retries, nodes that leave and join, bad replies,
checkpoints and resume. The same faults on the real deployment engine are in test_fault_suite.py."""

import os

import pytest
import torch

from server_app.checkpoint import CHECKPOINT, load_checkpoint
from server_app.server_app import RoundFailed
from tests.test_federation import run
from fl_app.results import OutputWriteError, load_results

FAST = {"memory-pool": "", "num-server-rounds": 3, "max-client-examples": 64, "public-size": 64, "test-size": 200}


def results_of(tmp_path):
    return load_results(tmp_path / "run")


def dropping(nodes, attempts=None):
    """A tamper that drops the train replies of `nodes` (all, or only the first `attempts` of them)."""
    seen = {"n": 0}

    def tamper(node, reply):
        if reply.metadata.message_type != "train" or node not in nodes:
            return reply
        seen["n"] += 1
        return None if attempts is None or seen["n"] <= attempts else reply
    return tamper


def test_a_straggler_past_the_deadline_is_ignored_and_counted(tmp_path):
    results, _ = run(tmp_path, tamper=dropping({2}), **{**FAST, "round-timeout": 5.0})
    assert results["status"] == "completed"
    for r in results["rounds"]:
        late = r["clients"][1]
        assert r["missed_deadline"] == 1 and r["participants"] == 3
        assert not late["participated"] and "no reply within the round deadline (5 s)" in late["error"]


def test_a_round_short_of_valid_replies_is_retried_and_the_failed_attempt_is_not_aggregated(tmp_path):
    # Nodes 2 and 3 miss the first attempt of round 1 (two dropped replies), then recover.
    results, grid = run(tmp_path, tamper=dropping({2, 3}, attempts=2), **{**FAST,
                        "round-timeout": 5.0, "min-successful-clients": 3, "min-nodes": 4})
    first = results["rounds"][0]
    assert first["attempts"] == 2 and first["participants"] == 4
    assert first["failed_attempts"] == [{"attempt": 1, "planned": 4, "succeeded": 2, "errors": {
        "2": "no reply within the round deadline (5 s)", "3": "no reply within the round deadline (5 s)"}}]
    trains = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(trains) == 4 * 2 + 4 * 2  # round 1 twice, then rounds 2 and 3 once
    assert first["bytes_down"] == sum(len_bytes(m) for m in trains[:8])
    assert [r["attempts"] for r in results["rounds"]] == [2, 1, 1]


def len_bytes(message):
    from fl_app.wire import serialized_bytes
    return serialized_bytes(message.content)


def test_a_run_that_cannot_get_enough_valid_replies_stops_with_its_reason_and_keeps_finished_rounds(tmp_path):
    def nan_from_round_2(node, reply):  # after round 1's four replies, only node 1 sends sane weights
        if reply.metadata.message_type == "train":
            if node > 1 and len(trained) >= 4:
                reply.content["weights"] = poison(reply.content["weights"])
            trained.append(node)
        return reply
    trained: list[int] = []
    with pytest.raises(RoundFailed, match="min-successful-clients = 2") as err:
        run(tmp_path, tamper=nan_from_round_2, **{**FAST, "min-successful-clients": 2, "round-retries": 1})
    assert "resume = true" in str(err.value) and "NaN" in str(err.value)
    results = results_of(tmp_path)
    assert results["status"] == "failed" and "min-successful-clients" in results["error"]
    assert [r["round"] for r in results["rounds"]] == [1]
    assert torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)["round"] == 1


def poison(record):
    from fl_app.wire import decode, encode
    return encode({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                   for k, v in decode(record).items()})


@pytest.mark.parametrize("strategy", ["reft", "profl", "heterofl", "exclusivefl"])
def test_a_node_that_leaves_is_skipped_and_a_restarted_one_rejoins_with_what_it_lacks(tmp_path, strategy):
    def on_grid(grid):
        def tamper(node, reply):  # during round 1, node 4 dies; it comes back as node 5 (same partition)
            if reply.metadata.message_type == "train" and node < 4 and 5 not in grid.contexts:
                grid.offline.add(4)
                grid.add_node(5, 3)
            return reply
        grid.tamper = tamper

    results, grid = run(tmp_path, strategy=strategy, on_grid=on_grid, **{**FAST})
    assert results["status"] == "completed"
    assert [d["node_id"] for d in results["devices"]] == [1, 2, 3, 4, 5]
    assert all(r["offline"] == [4] for r in results["rounds"][1:])
    lost = results["rounds"][0]["clients"][3]  # the SuperLink's "unavailable" reply, put on the right node
    assert lost["node_id"] == 4 and not lost["participated"] and "Node Unavailable" in lost["error"]
    later = results["rounds"][1]["clients"]
    assert not later[3]["participated"] and later[4]["participated"]
    assert results["devices"][4]["partition_id"] == 3
    first_train_to_5 = next(m for m in grid.sent if m.metadata.dst_node_id == 5 and m.metadata.message_type == "train")
    assert "weights" in first_train_to_5.content  # it kept nothing: it is sent what its job needs


@pytest.mark.parametrize("fault,message", [
    ("nan", "NaN or Inf"), ("shapes", "shape"), ("oversize", "exceeds the"), ("dtype", "dtype"),
    ("examples", "exceeds the"),
])
@pytest.mark.parametrize("strategy", ["fedavg", "reft"])
def test_a_faulty_node_is_rejected_every_round_and_never_aggregated(tmp_path, strategy, fault, message):
    results, _ = run(tmp_path, strategy=strategy, node_config={3: {"fault": fault}}, **{**FAST,
                     "num-server-rounds": 2})
    assert results["status"] == "completed"
    for r in results["rounds"]:
        bad = r["clients"][2]
        assert not bad["participated"] and bad["error"].startswith("rejected") and message in bad["error"]
        assert r["rejected"] == 1 and r["participants"] == 3
        assert r["loss"] is not None  # the global model stayed finite (a NaN test loss is written as null)


def test_an_unknown_fault_is_a_clear_node_config_error(tmp_path):
    results, _ = run(tmp_path, node_config={2: {"fault": "melt"}}, **{**FAST, "num-server-rounds": 1})
    assert [d["node_id"] for d in results["devices"]] == [1, 3, 4]  # its query failed: left out, logged


@pytest.mark.parametrize("strategy", ["fedavg", "profl", "reft"])
def test_resume_after_a_crash_loses_and_repeats_no_round(tmp_path, strategy):
    config = {**FAST, "num-server-rounds": 4, "strategy": strategy}
    clean, _ = run(tmp_path / "clean", **config)

    def crash_in_round_3(node, reply):
        if reply.metadata.message_type == "train":
            if len(trained) == 8:
                raise KeyboardInterrupt("the server machine lost power")
            trained.append(node)
        return reply
    trained: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "faulted", tamper=crash_in_round_3, **config)
    assert [r["round"] for r in results_of(tmp_path / "faulted")["rounds"]] == [1, 2]
    resumed, _ = run(tmp_path / "faulted", **config, resume=True)
    assert resumed["status"] == "completed"
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3, 4]
    assert resumed["resumed"][0]["after_round"] == 2
    if strategy != "reft":  # REFT's nodes lose their locally trained submodels: not bit-identical
        assert [r["accuracy"] for r in resumed["rounds"]] == pytest.approx([r["accuracy"] for r in clean["rounds"]])


def test_resume_refuses_a_config_that_changes_what_is_trained(tmp_path):
    run(tmp_path, **{**FAST, "num-server-rounds": 1})
    with pytest.raises(ValueError, match="lr: checkpoint 0.05, now 0.1"):
        run(tmp_path, **FAST, resume=True, lr=0.1)
    resumed, _ = run(tmp_path, **FAST, resume=True)  # more rounds is a fine change
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3]


def test_a_new_run_never_overwrites_finished_results_and_resume_needs_a_checkpoint(tmp_path):
    run(tmp_path, **{**FAST, "num-server-rounds": 1})
    with pytest.raises(ValueError, match="already holds the results of a run"):
        run(tmp_path, **FAST)
    with pytest.raises(ValueError, match="checkpoint.pt does not exist"):
        run(tmp_path, **FAST, resume=True, **{"run-name": "other"})


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_readable(tmp_path, monkeypatch):
    run(tmp_path, **{**FAST, "num-server-rounds": 1})
    real_replace = os.replace

    def power_cut(src, dst):
        if str(dst).endswith(CHECKPOINT):
            raise OSError("power cut")
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", power_cut)
    with pytest.raises(OutputWriteError, match="power cut"):  # one line naming the file and what to do
        run(tmp_path, **FAST, resume=True)
    monkeypatch.setattr(os, "replace", real_replace)
    from fl_app.config import RunConfig
    config = RunConfig.from_mapping({**FAST, "strategy": "fedavg", "output-dir": str(tmp_path), "run-name": "run", "resume": True,
                                     "device-mix": "raspberry-pi-3b-plus:1,raspberry-pi-4:1,laptop:1,workstation:1"})
    assert load_checkpoint(tmp_path / "run", config)["round"] == 1
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_a_resent_task_keeps_the_bound_on_claimed_examples(tmp_path):
    """A REFT node that lost its submodel is resent one; its reply is held to the same bound."""
    from client_app.client_app import KEPT

    def on_grid(grid):
        def tamper(node, reply):  # node 3 reboots after round 1 and forgets its submodel
            if reply.metadata.message_type == "train" and node == 3 and KEPT in grid.contexts[3].state:
                if not reply.has_error() and reply.content["report"]["num-examples"] > 1000:
                    del grid.contexts[3].state[KEPT]
            return reply
        grid.tamper = tamper

    results, grid = run(tmp_path, strategy="reft", on_grid=on_grid, node_config={3: {"fault": "examples"}},
                        **{**FAST, "num-server-rounds": 2})
    second = results["rounds"][1]["clients"][2]
    resent = [m for m in grid.sent if m.metadata.dst_node_id == 3 and m.metadata.message_type == "train"]
    assert len(resent) == 3 and "weights" in resent[2].content  # round 1, round 2, round 2 resent
    assert not second["participated"] and "exceeds the" in second["error"]


def test_a_run_whose_training_diverges_names_the_learning_rate(tmp_path):
    """Every reply NaN or Inf: more nodes or a lower min-successful-clients would not help; a lower lr would."""
    with pytest.raises(RoundFailed) as error:
        run(tmp_path, **{**FAST, "num-server-rounds": 2, "lr": 1e4, "round-retries": 0})
    assert "training diverged" in str(error.value)  # each node said so, instead of sending a useless model
    assert "lower lr (it is 10000)" in str(error.value) and "add nodes" not in str(error.value)
