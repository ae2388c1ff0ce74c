"""FedRolex: HeteroFL's submodels, but the channel window rolls by one each round and wraps."""

import torch

from server_app.strategies.base import ClientUpdate
from server_app.strategies.fedrolex import FedRolex, rolling_window
from tests.test_federation import run
from tests.test_reft import federation


def test_the_window_rolls_by_one_each_round_and_wraps_around():
    assert rolling_window(8, 3, 0) == [0, 1, 2]
    assert rolling_window(8, 3, 1) == [1, 2, 3]
    assert rolling_window(8, 3, 6) == [0, 6, 7]  # wraps past the last channel
    assert rolling_window(8, 3, 8) == [0, 1, 2]  # a full turn after C rounds
    assert rolling_window(8, 8, 5) == list(range(8))  # the full width is every channel, whatever the start


def test_a_submodel_takes_the_rolled_channels_of_every_group():
    fed = federation(["workstation", "workstation"], strategy="fedrolex")
    strategy = FedRolex(fed)
    strategy.ratios = {1: 0.5, 2: 0.25}
    full = strategy.model.spec.resolved_widths()
    for server_round in (1, 2, 40):
        for task in strategy.configure_train(server_round):
            keep = strategy.keep[task.node_id]
            for group, channels in keep.items():
                assert channels == rolling_window(full[group], len(channels), server_round - 1)


def test_over_enough_rounds_every_channel_of_the_global_model_is_trained():
    fed = federation(["workstation"], strategy="fedrolex")
    strategy = FedRolex(fed)
    strategy.ratios = {1: 0.25}
    name = "blocks.1.0.weight"  # conv2: 64 output channels over 32 input channels
    trained = torch.zeros(64, dtype=torch.bool)
    for server_round in range(1, 65):
        (task,) = strategy.configure_train(server_round)
        tensors = {k: v + 1.0 if v.is_floating_point() else v for k, v in task.weights.items()}
        before = strategy.model.state_dict()[name].clone()
        strategy.aggregate_train(server_round, [ClientUpdate(1, task.job, tensors, 10, {})])
        trained |= (strategy.model.state_dict()[name] != before).flatten(1).any(1)
        if server_round == 16:
            assert not trained.all()  # a quarter-width window has not reached every channel yet
    assert trained.all()  # 64 rounds: every output channel was in the window at some round


def test_heterofl_would_never_train_the_channels_past_the_first_k():
    from server_app.strategies.heterofl import HeteroFL
    fed = federation(["workstation"], strategy="heterofl")
    strategy = HeteroFL(fed)
    strategy.ratios = {1: 0.25}
    seen = set()
    for server_round in range(1, 10):
        strategy.configure_train(server_round)
        seen |= set(strategy.keep[1]["conv2"])
    assert seen == set(range(16))


def test_fedrolex_runs_end_to_end(tmp_path):
    results, _ = run(tmp_path / "fedrolex", strategy="fedrolex", )
    assert results["status"] == "completed"
    assert all(c["participated"] and 0 < c["keep_ratio"] <= 1 for c in results["rounds"][-1]["clients"])
