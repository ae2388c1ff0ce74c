"""A client runs only jobs within its own bounds, whoever sends them (issue 22: a hostile or broken server).

`fl_app.job.check_bounds` refuses, with one line, epochs, batch sizes, hyperparameters and models outside
what a client agrees to run; the ClientApp also refuses a model that does not match its data, and a
SuperNode whose node config names its profile enforces that memory budget whatever the job says.
"""

from __future__ import annotations

import math

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

import client_app.client_app as ca
from client_app.node import LocalNode
from fl_app.config import ConfigError, RunConfig
from fl_app.job import MAX_BATCH_SIZE, MAX_EPOCHS, Job, JobError
from fl_app.models import ModelSpec, build_model, full_widths
from fl_app.training import TrainConfig
from fl_app.wire import encode

FULL = full_widths("cnn")
GROUP = next(iter(FULL))


def _refused(job: Job) -> str:
    with pytest.raises(JobError) as info:
        Job.from_json(job.to_json())
    message = str(info.value)
    assert "\n" not in message and message.startswith("job refused")
    return message


def test_jobs_the_strategies_send_pass():
    for job in (Job(round=1, model=ModelSpec("cnn")),
                Job(round=3, model=ModelSpec("cnn", widths={GROUP: 1}).with_depth(1), trainable=[0],
                    train=TrainConfig(epochs=MAX_EPOCHS, batch_size=MAX_BATCH_SIZE), distill_epochs=MAX_EPOCHS,
                    mimic=ModelSpec("cnn")),
                Job(round=1, model=ModelSpec("resnet18", widths=full_widths("resnet18")))):
        assert Job.from_json(job.to_json()) == job


@pytest.mark.parametrize("train, needle", [
    (TrainConfig(epochs=0), "epochs = 0"), (TrainConfig(epochs=MAX_EPOCHS + 1), "epochs"),
    (TrainConfig(batch_size=0), "batch_size = 0"), (TrainConfig(batch_size=MAX_BATCH_SIZE + 1), "batch_size"),
    (TrainConfig(lr=math.nan), "lr = nan"), (TrainConfig(lr=math.inf), "lr = inf"),
    (TrainConfig(lr=-0.1), "lr > 0"), (TrainConfig(momentum=1.0), "momentum < 1"),
])
def test_training_outside_the_bounds_is_refused(train, needle):
    assert needle in _refused(Job(round=1, model=ModelSpec("cnn"), train=train))


def test_distillation_epochs_and_temperature_are_bounded():
    assert "distill_epochs" in _refused(Job(round=1, model=ModelSpec("cnn"), distill_epochs=10**6))
    assert "temperature" in _refused(Job(round=1, model=ModelSpec("cnn"), temperature=0.0))


def test_a_model_wider_or_deeper_than_its_architecture_is_refused():
    wide = ModelSpec("cnn", widths={GROUP: FULL[GROUP] + 1})
    assert f"width {GROUP} = {FULL[GROUP] + 1} outside [1, {FULL[GROUP]}]" in _refused(Job(round=1, model=wide))
    assert "width" in _refused(Job(round=1, model=ModelSpec("cnn", widths={GROUP: 0})))
    assert "no width group 'x'" in _refused(Job(round=1, model=ModelSpec("cnn", widths={"x": 4})))
    assert "depth" in _refused(Job(round=1, model=ModelSpec("cnn", depth=99)))
    assert "mimic width" in _refused(Job(round=1, model=ModelSpec("cnn"), mimic=wide))
    assert "not a model this client knows" in _refused(Job(round=1, model=ModelSpec("gpt-5")))
    assert "trainable" in _refused(Job(round=1, model=ModelSpec("cnn"), trainable=[0, 57]))


def test_a_run_config_beyond_the_client_bounds_is_refused_at_its_start():
    with pytest.raises(ConfigError, match="local-epochs = 101: at most 100"):
        RunConfig.from_mapping({"local-epochs": MAX_EPOCHS + 1})
    with pytest.raises(ConfigError, match="batch-size"):
        RunConfig.from_mapping({"batch-size": MAX_BATCH_SIZE + 1})


# --- the ClientApp ---------------------------------------------------------------------------------

def _node(node_config: dict) -> LocalNode:
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={"max-client-examples": 32},
                      node_config={"partition-id": 0, "num-partitions": 2, **node_config})
    return LocalNode.from_context(context)


@pytest.fixture(autouse=True)
def _as_a_clientapp_process(monkeypatch):
    """Flower builds messages only inside a task: give this process a task identity, as a ClientApp has."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _train_message(job: Job) -> Message:
    return Message(RecordDict({"job": ConfigRecord({"json": job.to_json()}),
                               "weights": encode(build_model(job.model).state_dict())}),
                   dst_node_id=1, message_type="train")


def test_the_client_refuses_an_out_of_bounds_job_before_training(monkeypatch):
    monkeypatch.setattr(ca, "train", lambda *a, **k: pytest.fail("trained an out-of-bounds job"))
    job = Job(round=1, model=ModelSpec("cnn"), train=TrainConfig(epochs=10**9))
    with pytest.raises(JobError, match="epochs"):
        ca._train(_train_message(job), _node({"profile": "raspberry-pi-4"}))


def test_the_client_refuses_a_model_that_does_not_match_its_data(monkeypatch):
    monkeypatch.setattr(ca, "train", lambda *a, **k: pytest.fail("trained a job for other data"))
    job = Job(round=1, model=ModelSpec("cnn", num_classes=100_000))
    with pytest.raises(JobError, match="100000 classes"):
        ca._train(_train_message(job), _node({"profile": "raspberry-pi-4"}))


def test_only_a_simulated_node_lets_the_job_switch_memory_enforcement_off():
    deployed, simulated = _node({"profile": "raspberry-pi-4"}), _node({})
    budget = int(deployed.profile.memory_mb * 2**20)
    assert deployed.memory_limit_bytes(job_enforces=False) == budget
    assert deployed.memory_limit_bytes(job_enforces=True) == budget
    assert simulated.memory_limit_bytes(job_enforces=False) is None
    assert simulated.memory_limit_bytes(job_enforces=True) == int(simulated.profile.memory_mb * 2**20)


def test_a_deployed_node_trains_under_its_budget_even_when_the_job_says_not_to(monkeypatch):
    limits = []

    def record(model, batches, config, trainable, limit, *rest):
        limits.append(limit)
        raise JobError("recorded")

    monkeypatch.setattr(ca, "train", record)
    node = _node({"profile": "raspberry-pi-3b-plus"})
    job = Job(round=1, model=ModelSpec("cnn"), enforce_memory=False)
    with pytest.raises(JobError, match="recorded"):
        ca._train(_train_message(job), node)
    assert limits == [int(node.profile.memory_mb * 2**20)]
