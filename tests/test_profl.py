"""ProFL: blocks and output modules, frozen fronts, effective movement, memory-aware selection, traffic."""

import logging

import pytest
import torch

from fl_app.job import Job, reply_state
from fl_app.models import MODEL_NAMES, ModelSpec, block_outputs, build_model, full_widths, num_blocks
from fl_app.training import TrainConfig, forward, freeze_except, make_optimizer, train_step
from server_app.strategies.base import ClientUpdate
from server_app.strategies.profl import ProFL, Step, build_model_keys, effective_movement, part_of, shrink_schedule
from tests.test_federation import run
from tests.test_reft import federation

QUICK = {"strategy": "profl", "memory-pool": "", "em-window": 2, "block-round-cap": 1, "max-client-examples": 48}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_depth_is_the_front_blocks_closed_by_an_output_module(name):
    total = num_blocks(name)
    stages = [g for g, _ in block_outputs(name) if g is not None]
    for depth in range(1, total):
        model = build_model(ModelSpec(name).with_depth(depth))
        assert len(model.blocks) == depth + 1
        output = model.blocks[depth]
        later_stages = [g for g, _ in block_outputs(name)[depth:] if g is not None]
        assert len(output.basic) == len(later_stages)  # one stride-2 basic layer per later block
        assert all(isinstance(m, torch.nn.Conv2d) and m.stride == (s, s) and m.kernel_size == (3, 3)
                   for m, (_, s) in zip(output.basic, [o for o in block_outputs(name)[depth:] if o[0]]))
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert stages  # every model has feature-map blocks
    full = build_model(ModelSpec(name).with_depth(total))
    assert list(full.state_dict()) == list(build_model(ModelSpec(name)).state_dict())


def test_output_modules_never_share_a_name_with_a_real_block():
    names = set(build_model(ModelSpec("vgg16")).state_dict())
    for depth in range(1, 5):
        om = {k for k in build_model(ModelSpec("vgg16").with_depth(depth)).state_dict()
              if part_of(k) == f"output{depth}"}
        assert om and not om & names


def test_frozen_front_gets_no_gradients_and_keeps_its_batchnorm_statistics():
    model = build_model(ModelSpec("resnet18").with_depth(2))
    freeze_except(model, [1, 2])
    front = {k: v.clone() for k, v in model.blocks[0].state_dict().items()}
    optimizer = make_optimizer(model, TrainConfig())
    for _ in range(2):
        train_step(model, optimizer, torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)), [1, 2])
    assert all(p.grad is None for p in model.blocks[0].parameters())
    assert all(torch.equal(v, model.blocks[0].state_dict()[k]) for k, v in front.items())
    assert any(p.grad is not None for p in model.blocks[1].parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_checkpointing_changes_the_memory_not_the_step(name):
    """Same loss, gradients and BatchNorm statistics with and without checkpointing: for the whole
    model, and for a ProFL step (a block and its output module behind a frozen block). In float64,
    because the two layouts' convolutions round differently in float32, and at 1/8 width so that
    float64 stays fast: the checkpoint units do not depend on the width."""
    narrow = {g: max(2, c // 8) for g, c in full_widths(name).items()}
    x, y = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (2,))
    for spec, trainable in [(ModelSpec(name, widths=narrow), None), (ModelSpec(name, widths=narrow, depth=2), [1, 2])]:
        results = []
        for checkpoint in (False, True):
            torch.manual_seed(0)
            model = build_model(spec).double()
            freeze_except(model, trainable)
            loss = torch.nn.functional.cross_entropy(forward(model, x, trainable, checkpoint), y)
            loss.backward()
            results.append((loss, {k: p.grad for k, p in model.named_parameters()}, dict(model.named_buffers())))
        (plain_loss, plain_grads, plain_buffers), (loss, grads, buffers) = results
        torch.testing.assert_close(loss, plain_loss, rtol=1e-9, atol=0)
        assert {k for k, g in grads.items() if g is None} == {k for k, g in plain_grads.items() if g is None}
        torch.testing.assert_close({k: g for k, g in grads.items() if g is not None},
                                   {k: g for k, g in plain_grads.items() if g is not None}, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(buffers, plain_buffers, rtol=1e-9, atol=1e-12)  # updated once, not twice


def test_effective_movement_is_one_for_steady_drift_and_zero_for_oscillation():
    drift = [torch.full((5,), float(i)) for i in range(7)]
    assert effective_movement(drift, 6) == pytest.approx(1.0)
    oscillation = [torch.full((5,), float(i % 2)) for i in range(7)]
    assert effective_movement(oscillation, 6) == pytest.approx(0.0)
    half = [torch.tensor([0.0]), torch.tensor([2.0]), torch.tensor([1.0])]  # |1-0| / (2 + 1)
    assert effective_movement(half, 2) == pytest.approx(1 / 3)
    assert effective_movement(drift[:3], 6) is None


def test_schedule_shrinks_back_to_front_then_grows_front_to_back():
    strategy = ProFL(federation(**{"strategy": "profl", "num-server-rounds": 20}))
    steps = [strategy.step] + list(strategy.schedule)
    assert [(s.stage, s.block, s.kind, s.rounds) for s in steps] == [
        ("shrink", 3, "train", 1), ("shrink", 3, "mimic", 1), ("shrink", 2, "train", 1), ("shrink", 2, "mimic", 1)]
    assert Step("grow", 1, "train").trainable(3) == [0, 1] and Step("grow", 3, "train").trainable(3) == [2]
    assert Step("shrink", 3, "mimic").trainable(3) == [2]


@pytest.mark.parametrize("blocks", [3, 4, 5])
@pytest.mark.parametrize("rounds", [5, 8, 12, 24, 100])
def test_shrinking_takes_a_bounded_share_and_leaves_every_block_a_round(blocks, rounds):
    steps = shrink_schedule(blocks, rounds, 0.2)
    assert sum(s.rounds for s in steps) <= 0.2 * rounds and rounds - sum(s.rounds for s in steps) >= blocks
    assert [(s.block, s.kind) for s in steps] == [(t, k) for t in range(blocks, 1, -1)
                                                   for k in ("train", "mimic")][:len(steps)]


@pytest.mark.parametrize("model,rounds", [("cnn", 3), ("cnn", 5), ("cnn", 8), ("resnet18", 8), ("resnet18", 24)])
def test_every_block_is_trained_and_the_full_model_evaluated_at_any_run_length(model, rounds):
    """Blocks that keep moving (EM never decides) are frozen by caps that follow from the rounds left."""
    strategy = ProFL(federation(model=model, **{"strategy": "profl", "num-server-rounds": rounds}))
    grown = set()
    for r in range(1, rounds + 1):
        if strategy.step.stage == "grow":
            grown.add(strategy.step.block)
            _grow_round(strategy, r, +0.01)
        else:
            strategy.configure_train(r)
            strategy.aggregate_train(r, [])
    assert grown == set(range(1, strategy.total + 1))
    assert strategy.global_model().spec.depth == strategy.total  # the full model is what was evaluated last


def test_a_run_shorter_than_the_blocks_says_what_it_leaves_untrained(caplog):
    with caplog.at_level(logging.WARNING, logger="flwr"):
        ProFL(federation(model="resnet18", **{"strategy": "profl", "num-server-rounds": 3}))
    assert "block 4 untrained" in caplog.text and "num-server-rounds to at least 4" in caplog.text


def test_selection_never_sends_a_step_to_a_device_it_does_not_fit(tmp_path):
    tiny = tmp_path / "tiny.toml"
    tiny.write_text('name = "tiny"\ngflops = 1.0\nmemory_mb = 10.0\nuplink_mbps = 1.0\ndownlink_mbps = 1.0\n')
    results, grid = run(tmp_path, num_nodes=3, **QUICK, **{"num-server-rounds": 6,
                                                          "device-mix": f"laptop:1,workstation:1,{tiny}:1"})
    for r in results["rounds"]:
        node3 = r["clients"][2]
        if 3 not in r["eligible_nodes"]:
            assert not node3["participated"] and node3["error"] is None
        elif node3["participated"]:  # sampled: predicted to fit, and the measured step fit too
            assert node3["predicted_peak_memory_mb"] <= 10.0 and node3["peak_memory_mb"] <= 10.0
            assert node3["error"] is None
    assert any(3 not in r["eligible_nodes"] for r in results["rounds"])
    assert any(3 in r["eligible_nodes"] for r in results["rounds"])  # cheap steps do include it
    for m in grid.sent:
        if m.metadata.dst_node_id == 3 and m.metadata.message_type == "train":
            job = Job.from_json(str(m.content["job"]["json"]))
            r = results["rounds"][job.round - 1]
            assert 3 in r["eligible_nodes"]


def test_frozen_blocks_travel_once_and_only_the_active_part_after(tmp_path):
    results, grid = run(tmp_path, num_nodes=2, **QUICK, **{
        "num-server-rounds": 8, "profl-shrink-share": 0, "device-mix": "laptop:1,workstation:1"})
    assert [r["active_block"] for r in results["rounds"]] == [1, 2, 3, 3, 3, 3, 3, 3]
    sent_to_1 = [m for m in grid.sent if m.metadata.dst_node_id == 1 and m.metadata.message_type == "train"]
    parts = [{part_of(k) for k in m.content["weights"].keys()} for m in sent_to_1]
    assert parts[0] == {"block0", "output1"}  # step 1: the active block and its output module
    # Each block, once frozen, travels once more (its aggregated final version replaces the
    # node's local copy), then never again; afterwards only the active part travels.
    assert parts[1] == {"block0", "block1", "output2"}
    assert parts[2] == {"block1", "block2"}
    assert parts[3:] == [{"block2"}] * 5


def test_a_client_that_lacks_a_frozen_block_gets_it(tmp_path):
    holder = {}

    def reboot_node_1_after_round_2(node, reply):
        if node == 1 and reply.metadata.message_type == "train":
            holder["answers"] = holder.get("answers", 0) + 1
            if holder["answers"] == 2:
                holder["grid"].contexts[1].state.pop("kept-weights")  # loses its frozen blocks
        return reply

    results, grid = run(tmp_path, num_nodes=2, tamper=reboot_node_1_after_round_2,
                        on_grid=lambda g: holder.update(grid=g), **QUICK,
                        **{"num-server-rounds": 3, "profl-shrink-share": 0, "device-mix": "laptop:1,workstation:1"})
    third = results["rounds"][2]
    assert third["clients"][0]["participated"] and third["clients"][0]["error"] is None
    first_try, resent = [m for m in grid.sent if m.metadata.dst_node_id == 1][-2:]
    assert {part_of(k) for k in first_try.content["weights"].keys()} == {"block1", "block2"}
    assert {part_of(k) for k in resent.content["weights"].keys()} == {"block0", "block1", "block2"}


def test_the_grown_model_is_the_full_architecture(tmp_path):
    results, _ = run(tmp_path, num_nodes=2, **QUICK, **{"num-server-rounds": 3, "profl-shrink-share": 0,
                                                        "device-mix": "laptop:1,workstation:1"})
    strategy = ProFL(federation(**{"strategy": "profl", "profl-shrink-share": 0, "block-round-cap": 1}))
    for r in range(1, 4):
        strategy.configure_train(r)
        strategy.aggregate_train(r, [])
    grown = strategy.global_model()
    assert grown.spec.depth == 3 and list(grown.state_dict()) == list(build_model(ModelSpec("cnn")).state_dict())
    assert results["rounds"][-1]["active_block"] == 3


def _grow_round(strategy, server_round, shift):
    """Plan a round and reply as every client would if training moved the active block by `shift`."""
    tasks = strategy.configure_train(server_round)
    updates = []
    for task in tasks:
        reply = reply_state(task.job, {k: strategy.weights[k] for k in build_model_keys(task.job.model)})
        moved = {k: v + shift if v.is_floating_point() and k.startswith("blocks.0.") else v for k, v in reply.items()}
        updates.append(ClientUpdate(task.node_id, task.job, moved, 10, {}))
    return strategy.aggregate_train(server_round, updates)


def test_a_round_that_freezes_a_block_is_evaluated_on_what_it_trained():
    """Not on the next step's model, whose new block is still at its initialisation."""
    strategy = ProFL(federation(**{"strategy": "profl", "profl-shrink-share": 0, "block-round-cap": 1}))
    record = _grow_round(strategy, 1, +0.01)
    assert record["frozen"] and strategy.step.block == 2  # the schedule moved on
    evaluated = strategy.global_model()
    assert evaluated.spec.depth == 1 and record["evaluated"] == "block 1 + output module 1"
    assert all(torch.equal(v, strategy.weights[k]) for k, v in evaluated.state_dict().items())


def test_effective_movement_freezes_an_oscillating_block_before_the_cap():
    strategy = ProFL(federation(**{"strategy": "profl", "profl-shrink-share": 0, "em-window": 2,
                                   "em-threshold": 0.5, "em-patience": 1, "block-round-cap": 10,
                                   "num-server-rounds": 30}))
    first = _grow_round(strategy, 1, +0.01)
    assert first["effective_movement"] is None  # one move: no window of 2 yet
    second = _grow_round(strategy, 2, -0.01)  # back where it started: it oscillates
    assert second["frozen"] and second["freeze_reason"] == "em" and second["em_at_freeze"] < 0.5
    assert strategy.step.block == 2  # rounds 2 of a cap of 10: EM decided


def test_a_block_that_keeps_moving_is_frozen_by_the_cap_and_says_so():
    strategy = ProFL(federation(**{"strategy": "profl", "profl-shrink-share": 0, "em-window": 2,
                                   "em-threshold": 0.5, "em-patience": 1, "block-round-cap": 3,
                                   "num-server-rounds": 30}))
    records = [_grow_round(strategy, r, +0.01) for r in (1, 2, 3)]  # steady drift: EM = 1
    assert [r["frozen"] for r in records] == [False, False, True]
    assert records[-1]["freeze_reason"] == "cap" and records[-1]["effective_movement"] == pytest.approx(1.0)
    assert records[-1]["em_by_window"][2] == pytest.approx(1.0)  # recorded at the freeze too
    assert records[-1]["em_by_window"][3] == pytest.approx(1.0) and records[-1]["em_by_window"][4] is None


def test_effective_movement_ignores_batchnorm_running_statistics():
    strategy = ProFL(federation(**{"strategy": "profl", "profl-shrink-share": 0}))
    strategy.configure_train(1)
    before = strategy._active_parameters()
    for k in strategy.weights:
        if k.startswith("blocks.0.") and ("running_" in k):
            strategy.weights[k] = strategy.weights[k] + 5.0
    assert torch.equal(strategy._active_parameters(), before)
