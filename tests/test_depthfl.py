"""DepthFL: each device trains the first k blocks it can afford, a classifier after every block,
the classifiers distilling each other; every tensor is averaged over the clients that held it."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from fl_app.cost import model_cost
from fl_app.data import Batches, make_synthetic
from fl_app.job import Job
from fl_app.models import ModelSpec, build_model, num_blocks, num_parameters
from fl_app.training import TrainConfig, forward, train
from fl_app.wire import decode
from server_app.strategies.base import ClientUpdate
from server_app.strategies.depthfl import DepthFL
from tests.test_federation import run
from tests.test_reft import federation

PROFILES = ["raspberry-pi-4", "jetson-nano", "laptop", "workstation"]  # weakest first


def blocks_and_heads(names) -> set[str]:
    """`blocks.<i>` / `exits.<i>` of every state name."""
    return {".".join(n.split(".")[:2]) for n in names}


def expected(depth: int, total: int) -> set[str]:
    """Blocks 1..k and heads 1..k; at full depth the last head is the last block's own classifier."""
    return {f"blocks.{i}" for i in range(depth)} | {f"exits.{i}" for i in range(min(depth, total - 1))}


def test_a_device_gets_the_deepest_submodel_that_fits_it_and_a_weaker_one_a_shallower_one():
    fed = federation(PROFILES, strategy="depthfl", model="vgg11", **{"emulated-deadline": 3.0})
    strategy = DepthFL(fed)
    total = num_blocks("vgg11")
    for device in fed.devices:
        k = strategy.depths.get(device.node_id)
        if k is None:
            assert not fed.fits(strategy.sizing_cost(1), device) and "first block" in strategy.left_out[device.node_id]
            continue
        assert fed.fits(strategy.sizing_cost(k), device)
        assert not any(fed.fits(strategy.sizing_cost(deeper), device) for deeper in range(k + 1, total + 1))
    depths = [strategy.depths.get(d.node_id, 0) for d in fed.devices]
    assert depths == sorted(depths) and depths[0] < depths[-1] == total  # weaker devices, shallower models
    assert len(set(depths)) >= 3
    for task in strategy.configure_train(1):  # the job is that submodel, and carries exactly its weights
        k = strategy.depths[task.node_id]
        assert task.job.model.depth == k and task.job.model.exits and task.info["depth"] == k
        assert blocks_and_heads(task.weights) == expected(k, total)


def test_the_cost_model_prices_the_heads():
    for depth in (1, 2, 3):
        spec = ModelSpec("cnn", exits=True).with_depth(depth)
        assert model_cost(spec, (3, 32, 32)).params == num_parameters(build_model(spec))
    plain, heads = model_cost(ModelSpec("cnn"), (3, 32, 32)), model_cost(ModelSpec("cnn", exits=True), (3, 32, 32))
    assert heads.params > plain.params and heads.train_flops_per_sample > plain.train_flops_per_sample


def test_new_fields_at_their_default_leave_the_json_as_it_was():
    assert ModelSpec("cnn").to_json() == \
        '{"depth": 0, "in_channels": 3, "name": "cnn", "num_classes": 10, "widths": {}}'
    job = Job(round=1, model=ModelSpec("cnn"), mimic=ModelSpec("cnn").with_depth(1))
    assert "exits" not in job.to_json() and "mutual_distillation" not in job.to_json()
    deep = Job(round=1, model=ModelSpec("cnn", exits=True).with_depth(2), mutual_distillation=3.0)
    assert Job.from_json(deep.to_json()) == deep and Job.from_json(job.to_json()) == job


def mean_pairwise_kl(model, x) -> float:
    """Mean over ordered pairs of heads (i, j) of KL(softmax_i || softmax_j) on `x`."""
    model.eval()
    with torch.no_grad():
        log_p = F.log_softmax(forward(model, x), dim=-1)
    pairs = list(itertools.permutations(range(len(log_p)), 2))
    return sum(float(F.kl_div(log_p[j], log_p[i], reduction="batchmean", log_target=True)) for i, j in pairs) / len(pairs)


@pytest.fixture
def one_thread():
    """Small CPU training runs ~10x faster on one thread than on many contending for 2 busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_mutual_distillation_brings_the_heads_predictions_together(one_thread):
    data = make_synthetic(train_size=256, test_size=64, seed=1)
    torch.manual_seed(0)
    start = build_model(ModelSpec("cnn", exits=True))
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05)
    held_out = data.normalize(data.x_test)
    disagreement = {}
    for temperature in (0.0, 3.0):
        model = copy.deepcopy(start)
        torch.manual_seed(0)
        train(model, Batches(data.x_train, data.y_train, data, 32, seed=0), cfg, mutual_distillation=temperature)
        disagreement[temperature] = mean_pairwise_kl(model, held_out)
    assert disagreement[3.0] < 0.5 * disagreement[0.0]


def test_every_tensor_is_averaged_over_the_clients_that_held_it_only():
    fed = federation(["workstation", "workstation"], strategy="depthfl", aggregation="mean")  # the paper's weighted mean
    strategy = DepthFL(fed)
    strategy.depths = {1: 1, 2: 3}  # node 1: block 1 and its head; node 2: the whole model
    tasks = {t.node_id: t for t in strategy.configure_train(1)}
    before = {k: v.clone() for k, v in strategy.model.state_dict().items()}

    def filled(task, value):
        return {k: torch.full_like(v, value) if v.is_floating_point() else v + 5 for k, v in task.weights.items()}

    updates = [ClientUpdate(1, tasks[1].job, filled(tasks[1], 1.0), 10, {}),
               ClientUpdate(2, tasks[2].job, filled(tasks[2], 4.0), 30, {})]
    strategy.aggregate_train(1, updates)
    after = strategy.model.state_dict()
    for name, value in after.items():
        if not value.is_floating_point():
            assert torch.equal(value, before[name] + 5)  # counters: the maximum of the holders'
        elif name.split(".")[1] == "0":  # block 1 and head 1: both clients, weighted 10:30
            assert torch.allclose(value, torch.full_like(value, (10 * 1.0 + 30 * 4.0) / 40))
        else:  # deeper blocks and heads: only node 2 held them
            assert torch.allclose(value, torch.full_like(value, 4.0))

    strategy.aggregate_train(2, [ClientUpdate(1, tasks[1].job, filled(tasks[1], 2.0), 10, {})])
    again = strategy.model.state_dict()
    for name, value in again.items():
        if value.is_floating_point() and name.split(".")[1] != "0":
            assert torch.equal(value, after[name])  # nobody held them this round: unchanged


def test_depthfl_runs_end_to_end_and_each_reply_holds_exactly_its_blocks_and_heads(tmp_path):
    replies: dict[int, set[str]] = {}

    def record(node, reply):
        if reply.metadata.message_type == "train" and not reply.has_error():
            replies[node] = blocks_and_heads(decode(reply.content["weights"]))
        return reply

    results, grid = run(tmp_path / "depthfl", strategy="depthfl", tamper=record, **{"emulated-deadline": 0.6})
    assert results["status"] == "completed"
    last = results["rounds"][-1]
    assert last["accuracy"] is not None and last["participants"] >= 2
    depths = {c["node_id"]: c["depth"] for c in last["clients"] if c["participated"]}
    assert len(set(depths.values())) > 1  # the federation trains submodels of more than one depth
    total = num_blocks("cnn")
    for node, k in depths.items():
        assert replies[node] == expected(k, total)
    for c in last["clients"]:  # a device that cannot afford the first block is left out, with its reason
        assert c["participated"] or "first block" in c["left_out"]
    for c in results["rounds"][0]["clients"]:  # every job within the deadline, on the virtual clock
        assert not c["participated"] or c["device_time_s"] <= 0.6
