"""AllSmall and HeteroFL: the width baselines, on the same budget and width machinery as REFT."""

import torch

from server_app.strategies.base import ClientUpdate
from server_app.strategies.allsmall import AllSmall
from server_app.strategies.heterofl import HeteroFL
from tests.test_federation import run
from tests.test_reft import federation


def test_allsmall_gives_everybody_the_weakest_devices_model():
    fed = federation(**{"strategy": "allsmall"})
    strategy = AllSmall(fed)
    tasks = strategy.configure_train(1)
    weakest = min(fed.affordable_ratio(d) for d in fed.devices)
    assert len(tasks) == 4 and all(t.job.model == strategy.model.spec for t in tasks)
    assert all(t.info["keep_ratio"] == weakest for t in tasks)


def test_heterofl_sends_first_k_channels_sized_to_each_device():
    fed = federation(**{"strategy": "heterofl"})
    strategy = HeteroFL(fed)
    for task in strategy.configure_train(1):
        keep = strategy.keep[task.node_id]
        assert all(idx == list(range(len(idx))) for idx in keep.values())
        assert fed.fits(fed.cost(task.job.model), next(d for d in fed.devices if d.node_id == task.node_id))


def test_heterofl_averages_each_coordinate_over_the_clients_that_hold_it():
    fed = federation(["workstation", "workstation"], **{"strategy": "heterofl"})
    strategy = HeteroFL(fed)
    strategy.ratios = {1: 0.5, 2: 0.25}
    tasks = {t.node_id: t for t in strategy.configure_train(1)}
    name = "blocks.0.0.weight"  # conv1: 32 output channels
    before = strategy.model.state_dict()[name].clone()
    updates = []
    for node, value in ((1, 1.0), (2, 3.0)):
        tensors = {k: torch.full_like(v, value) if v.is_floating_point() else v
                   for k, v in tasks[node].weights.items()}
        updates.append(ClientUpdate(node, tasks[node].job, tensors, num_examples=10, metrics={}))
    strategy.aggregate_train(1, updates)
    after = strategy.model.state_dict()[name]
    assert torch.all(after[:8] == 2.0)  # held by both: the mean of 1 and 3
    assert torch.all(after[8:16] == 1.0)  # held by the half-width client only
    assert torch.equal(after[16:], before[16:])  # held by nobody: unchanged


def test_width_baselines_run_end_to_end_and_record_keep_ratios(tmp_path):
    for strategy in ("allsmall", "heterofl"):
        results, _ = run(tmp_path / strategy, strategy=strategy, )
        clients = results["rounds"][-1]["clients"]
        assert results["status"] == "completed" and all(c["participated"] for c in clients)
        assert all(0 < c["keep_ratio"] <= 1 for c in clients)
