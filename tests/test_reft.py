"""REFT: submodels within each device's budget, logits instead of weights, distillation both ways."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fl_app.config import RunConfig
from fl_app.data import Batches, make_synthetic
from fl_app.job import Job
from fl_app.models import ModelSpec, build_model
from fl_app.profiles import load_profile
from fl_app.training import TrainConfig, distill, predict_logits
from fl_app.wire import decode, encode, serialized_bytes
from server_app.rounds import run_train_tasks
from fl_app.cost import model_cost
from fl_app.width import channel_costs, extract, fit_ratio, global_widths, uniform_widths
from server_app.strategies.base import ClientUpdate, Device, Federation, TrainTask
from server_app.strategies.reft import REFT
from tests.test_federation import run

PROFILES = ["raspberry-pi-4", "jetson-nano", "laptop", "workstation"]


def federation(profiles=PROFILES, **overrides) -> Federation:
    # The devices keep their profiles' own memory, so no pool is drawn from (the default pool is one).
    config = RunConfig.from_mapping({"strategy": "reft", "memory-pool": "", **overrides})
    devices = [Device(i + 1, i, load_profile(p), 100) for i, p in enumerate(profiles)]
    return Federation(config, devices, make_synthetic(train_size=600, test_size=50), np.random.default_rng(0))


@pytest.mark.parametrize("pruning", ["global", "uniform"])
def test_every_submodel_fits_its_devices_memory_and_the_deadline(pruning):
    fed = federation(**{"batch-size": 64, "emulated-deadline": 0.5, "pruning": pruning})
    strategy = REFT(fed)
    tasks = strategy.configure_train(1)
    assert len(tasks) == 4
    full = fed.cost(fed.full_spec())
    for task in tasks:
        device = next(d for d in fed.devices if d.node_id == task.node_id)
        cost = fed.cost(task.job.model)
        assert strategy.workload(device).device_time_s(device.profile, cost) <= 0.5
        assert fed.peak_memory_mb(cost) <= device.profile.memory_mb
        assert cost.params <= full.params
    ratios = [t.info["keep_ratio"] for t in tasks]
    assert ratios == sorted(ratios) and ratios[0] < ratios[-1] == 1.0  # weaker devices, smaller models


def test_global_pruning_gives_reft_papers_vgg16_shape_where_uniform_cannot():
    """REFT's VGG-16 (4096 classifier): 128.4 MB / 0.33 GMAC -> 1.8 MB / 0.07 GMAC (Desai et al. 2023).
    At a budget of 0.07/0.33 of the full model's training FLOPs, global pruning keeps the early
    convolutions wide and gives a submodel of at most 3.6 MB (twice the paper's) at 0.07 GMAC +- 10 %;
    one uniform ratio at the same FLOPs leaves ~27 MiB."""
    spec, shape = ModelSpec("vgg16-fc4096"), (3, 32, 32)
    full = model_cost(spec, shape)
    torch.manual_seed(0)
    model = build_model(spec)

    def within(cost):
        return cost.train_flops_per_sample <= full.train_flops_per_sample * 0.07 / 0.33

    cuts = {}
    by_parameters = global_widths(model, 0.05, channel_costs(spec, shape, 32, "parameters"))
    for name, widths_at, floor in [("global", by_parameters, 0.0), ("uniform", uniform_widths(spec), 0.05)]:
        level = fit_ratio(spec, shape, within, floor, widths_at)
        cuts[name] = (widths_at(level), model_cost(spec.with_widths(widths_at(level)), shape))
    widths, cost = cuts["global"]
    assert cost.state_bytes <= 3.6e6 and abs(cost.forward_macs_per_sample / 0.07e9 - 1) <= 0.1
    assert widths["stage1.conv1"] == widths["stage1.conv2"] == 64  # FLOP-heavy, few parameters: kept whole
    assert widths["fc1"] < 0.1 * 4096 and widths["stage5.conv3"] < 0.1 * 512  # parameter-heavy: pruned most
    assert cuts["uniform"][1].state_bytes > 20 * 2**20


def test_a_memory_bound_device_is_pruned_by_training_memory_not_left_with_a_starved_layer():
    """Costed in parameters, the CNN's conv2 (parameter-heavy) would fall to its floor before conv1 (whose
    activations hold most of the memory) lost a channel; costed in training memory it does not."""
    spec, shape = ModelSpec("cnn"), (3, 32, 32)
    full = model_cost(spec, shape).peak_train_bytes(32, shape)
    torch.manual_seed(0)
    model = build_model(spec)

    def half_memory(cost):
        return cost.peak_train_bytes(32, shape) <= 0.5 * full

    kept = {}
    for resource in ("parameters", "memory"):
        widths_at = global_widths(model, 0.05, channel_costs(spec, shape, 32, resource))
        kept[resource] = widths_at(fit_ratio(spec, shape, half_memory, 0.0, widths_at))
    assert kept["parameters"]["conv2"] <= 4  # starved
    assert kept["memory"]["conv2"] >= 16 and kept["memory"]["conv1"] < 32


def test_reft_costs_a_device_in_memory_exactly_when_the_full_model_does_not_fit_it():
    fed = federation(["raspberry-pi-4", "workstation"])
    strategy = REFT(fed)
    assert {strategy.binding_resource(d) for d in fed.devices} == {"parameters"}  # the CNN fits both
    full_mb = fed.peak_memory_mb(fed.cost(fed.full_spec()))
    tight = replace(fed.devices[0], profile=replace(fed.devices[0].profile, memory_mb=0.6 * full_mb))
    assert strategy.binding_resource(tight) == "memory"


def test_pruned_submodels_carry_the_global_models_largest_channels():
    strategy = REFT(federation())
    task = strategy.configure_train(1)[0]
    global_w = strategy.model.state_dict()["blocks.0.0.weight"]
    kept = task.weights["blocks.0.0.weight"]
    norms = global_w.flatten(1).norm(dim=1)
    threshold = norms.sort(descending=True).values[len(kept) - 1]
    assert (kept.flatten(1).norm(dim=1) >= threshold - 1e-6).all()


def test_distillation_moves_the_student_toward_the_teacher():
    d = make_synthetic(train_size=256, test_size=10)
    x = d.normalize(d.x_train)
    torch.manual_seed(0)
    teacher, student = build_model(ModelSpec("cnn")), build_model(ModelSpec("cnn"))
    target = predict_logits(teacher, x)

    def gap() -> float:
        return float(F.kl_div(F.log_softmax(predict_logits(student, x), 1), F.log_softmax(target, 1),
                              reduction="batchmean", log_target=True))

    before = gap()
    distill(student, Batches(d.x_train, target, d, 32), TrainConfig(lr=0.05), epochs=3, temperature=2.0)
    assert gap() < 0.5 * before


def test_after_setup_a_round_moves_logits_not_weights(tmp_path):
    results, grid = run(tmp_path, strategy="reft", **{"num-server-rounds": 3})
    first, *later = results["rounds"]
    assert first["bytes_down_weights"] > 0 and first["bytes_down_logits"] == 0
    for r in later:
        assert r["bytes_down_weights"] == 0 and r["bytes_up_weights"] == 0
        assert r["bytes_down_logits"] > 0 and r["bytes_up_logits"] > 0
        assert r["ensemble_size"] == 4
        assert 0.0 <= r["ensemble_public_accuracy"] <= 1.0  # the teacher, scored on the public slice's labels
    assert all(c["submodel_accuracy"] is not None for c in later[-1]["clients"])
    # Byte counts are the serialized sizes of the messages that were actually sent.
    sent = [serialized_bytes(m.content) for m in grid.sent if m.metadata.message_type == "train"]
    assert sum(r["bytes_down"] for r in results["rounds"]) == sum(sent)


def test_refresh_re_prunes_and_sends_weights_again(tmp_path):
    results, _ = run(tmp_path, strategy="reft", **{"num-server-rounds": 3, "refresh-every": 2})
    assert [r["bytes_down_weights"] > 0 for r in results["rounds"]] == [True, False, True]


def test_int8_encoding_cuts_the_logits_traffic(tmp_path):
    fp32, _ = run(tmp_path / "a", strategy="reft", **{"num-server-rounds": 2})
    int8, _ = run(tmp_path / "b", strategy="reft", encoding="int8", **{"num-server-rounds": 2})
    ratio = fp32["rounds"][1]["bytes_up_logits"] / int8["rounds"][1]["bytes_up_logits"]
    assert ratio > 3


@pytest.mark.parametrize("fault,message", [
    (lambda t: {"logits": t["logits"][:-1]}, "shape"),
    (lambda t: {"logits": t["logits"] * float("inf")}, "NaN or Inf"),
    (lambda t: {"logitz": t["logits"]}, "missing"),
])
def test_malformed_logits_are_rejected_and_the_ensemble_is_built_without_them(tmp_path, fault, message):
    def tamper(node, reply):
        if node == 3 and reply.metadata.message_type == "train" and not reply.has_error():
            reply.content["logits"] = encode(fault(decode(reply.content["logits"])))
        return reply

    results, _ = run(tmp_path, strategy="reft", tamper=tamper, )
    for r in results["rounds"]:
        assert message in r["clients"][2]["error"] and r["ensemble_size"] == 3


def test_a_client_that_lost_its_submodel_says_so(tmp_path):
    _, grid = run(tmp_path, strategy="reft", **{"num-server-rounds": 1})
    spec = Job.from_json(str(grid.sent[-1].content["job"]["json"])).model
    node = grid.sent[-1].metadata.dst_node_id
    grid.contexts[node].state.pop("kept-weights")  # e.g. the device rebooted
    job = Job(round=2, model=spec, returns="logits", keep_state=True)
    [outcome] = run_train_tasks(grid, [TrainTask(node, job, weights={})], public_size=100)
    assert outcome.update is None and "lacks weights" in outcome.error


def test_after_the_warm_up_submodels_are_cut_from_trained_weights_not_the_initial_ones():
    """With refresh-every = 2, round 3 re-cuts every submodel from the global model as distillation
    left it: the weights sent differ from a cut of the randomly initialised model."""
    fed = federation(**{"refresh-every": 2, "public-size": 40, "server-distill-epochs": 2})
    strategy = REFT(fed)
    initial = {k: v.clone() for k, v in strategy.model.state_dict().items()}
    for server_round in (1, 2):
        tasks = strategy.configure_train(server_round)
        logits = torch.randn(40, 10, generator=torch.Generator().manual_seed(server_round)) * 3
        strategy.aggregate_train(server_round, [ClientUpdate(t.node_id, t.job, {"logits": logits}, 10, {})
                                                for t in tasks])
    refreshed = strategy.configure_train(3)
    assert all(t.info["weights_sent"] for t in refreshed)
    untrained = build_model(fed.full_spec())
    untrained.load_state_dict(initial)
    for task in refreshed:
        cut_of_initial = extract(untrained, strategy.ratios[task.node_id], by="magnitude").state
        assert any(not torch.equal(v, cut_of_initial[k]) for k, v in task.weights.items() if v.is_floating_point())


def test_refresh_is_on_by_default():
    assert RunConfig.from_mapping({}).refresh_every > 0
