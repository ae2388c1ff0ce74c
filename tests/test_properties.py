"""Properties checked on generated input (hypothesis): no malformed reply is ever aggregated or crashes
a strategy, and no run-config or profile value crashes its parser instead of being named in a clear error."""

from functools import lru_cache

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_app.config import ConfigError, RunConfig, default_run_config
from fl_app.data import make_synthetic
from fl_app.profiles import ProfileError, load_profile, profile_from_dict
from fl_app.wire import encode, serialized_bytes
from server_app.rounds import ReplyRejected, expected_tensors, validate_reply
from server_app.strategies import STRATEGIES
from server_app.strategies.base import Device, Federation

PUBLIC = 32
PROFILES = ["raspberry-pi-4", "jetson-nano", "laptop", "workstation"]
REPLIES_PER_STRATEGY = 60  # generated cases per strategy (x6 strategies)
CONFIGS = 400


@lru_cache(maxsize=None)
def setup(strategy: str):
    """A strategy on four devices, and its round-1 tasks (built once: examples reuse them)."""
    config = RunConfig.from_mapping({"strategy": strategy, "public-size": PUBLIC,
                                     "server-distill-epochs": 1, "batch-size": 16})
    devices = [Device(i + 1, i, load_profile(p), 50) for i, p in enumerate(PROFILES)]
    federation = Federation(config, devices, make_synthetic(train_size=400, test_size=20), np.random.default_rng(0))
    s = STRATEGIES[strategy](federation)
    tasks = s.configure_train(1)
    for t in tasks:
        t.max_examples = 50 * t.job.train.epochs
    return s, tasks


def honest(task) -> tuple[dict[str, torch.Tensor], dict]:
    g = torch.Generator().manual_seed(task.node_id)
    tensors = {name: torch.randn(shape, generator=g) * 0.01 if floating else torch.zeros(shape, dtype=torch.int64)
               for name, (shape, floating) in expected_tensors(task, PUBLIC).items()}
    return tensors, {"num-examples": 40, "train-loss": 0.5}


def content_of(task, tensors, report, record=None) -> RecordDict:
    arrays = tensors if isinstance(tensors, ArrayRecord) else encode(tensors, task.job.encoding)
    content = RecordDict({task.job.returns if record is None else record: arrays})
    if report is not None:
        try:
            content["report"] = report if isinstance(report, ConfigRecord) else MetricRecord(report)
        except TypeError:  # values a MetricRecord refuses (bool, str) can still arrive in a ConfigRecord
            content["report"] = ConfigRecord(report)
    return content


BAD_EXAMPLES = st.one_of(st.integers(-2**63, 0), st.integers(51, 2**63 - 1), st.just(float("nan")),
                         st.just(float("inf")), st.floats(max_value=0.0, allow_nan=False), st.booleans(), st.text(max_size=5))


FAULTS = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 10**6)),
    st.tuples(st.just("extra"), st.text(min_size=1, max_size=8)),
    st.tuples(st.just("shape"), st.integers(0, 10**6), st.lists(st.integers(0, 6), max_size=4)),
    st.tuples(st.just("nonfinite"), st.integers(0, 10**6), st.integers(0, 10**6),
              st.sampled_from([float("nan"), float("inf"), float("-inf")])),
    st.tuples(st.just("dtype"), st.integers(0, 10**6), st.sampled_from(["int32", "uint8", "int64", "bool"])),
    st.tuples(st.just("record"), st.sampled_from(["weights", "logits", "params", ""])),
    st.tuples(st.just("no-report")),
    st.tuples(st.just("examples"), BAD_EXAMPLES),
    st.tuples(st.just("report-kind")),
    st.tuples(st.just("padding")),
)


def malformed(task, fault: tuple) -> RecordDict:
    """A reply to `task` with the one thing `fault` describes wrong."""
    tensors, report = honest(task)
    names = sorted(tensors)
    kind, *args = fault
    record = None
    if kind == "drop":
        del tensors[names[args[0] % len(names)]]
    elif kind == "extra":
        tensors[args[0] if args[0] not in tensors else args[0] + "_x"] = torch.zeros(3)
    elif kind == "shape":
        name = names[args[0] % len(names)]
        shape = tuple(args[1]) if tuple(args[1]) != tuple(tensors[name].shape) else tuple(args[1]) + (2,)
        tensors[name] = torch.zeros(shape, dtype=tensors[name].dtype)
    elif kind == "nonfinite":
        floats = [n for n in names if tensors[n].is_floating_point() and tensors[n].numel()]
        flat = tensors[floats[args[0] % len(floats)]].view(-1)
        flat[args[1] % len(flat)] = args[2]
    elif kind == "dtype":
        name = names[args[0] % len(names)]
        arrays = {n: Array(v.numpy()) for n, v in tensors.items()}
        value = tensors[name].numpy()
        # A float tensor sent as integers or booleans; an integer counter sent as floats.
        arrays[name] = Array(value.astype(args[1]) if tensors[name].is_floating_point() else value.astype(np.float32))
        tensors = ArrayRecord(arrays)
    elif kind == "record":
        record = args[0] if args[0] != task.job.returns else "other"
    elif kind == "no-report":
        report = None
    elif kind == "examples":
        report["num-examples"] = args[0]
    elif kind == "report-kind":
        report = ConfigRecord({"num-examples": "forty"})
    elif kind == "padding":
        tensors["padding"] = torch.zeros(8 * sum(v.numel() for v in tensors.values()) + 70_000)
    return content_of(task, tensors, report, record)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@settings(max_examples=REPLIES_PER_STRATEGY, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_no_malformed_reply_is_aggregated_and_none_crashes_a_strategy(strategy, data):
    s, tasks = setup(strategy)
    bad_task = tasks[data.draw(st.integers(0, len(tasks) - 1), label="task")]
    fault = data.draw(FAULTS, label="fault")
    bad_content = malformed(bad_task, fault)
    updates = []
    for task in tasks:
        content = bad_content if task is bad_task else content_of(task, *honest(task))
        try:
            updates.append(validate_reply(task, content, PUBLIC, serialized_bytes(content)))
        except ReplyRejected:
            assert task is bad_task, f"an honest reply was rejected (fault elsewhere: {fault})"
    assert bad_task.node_id not in {u.node_id for u in updates}, f"a reply with fault {fault!r} was accepted"
    s.aggregate_train(1, updates)
    for name, value in s.global_model().state_dict().items():
        assert torch.isfinite(value.float()).all(), f"{name} is not finite after aggregating valid replies"


def test_honest_replies_are_accepted_by_every_strategy():
    for strategy in STRATEGIES:
        _, tasks = setup(strategy)
        for task in tasks:
            content = content_of(task, *honest(task))
            assert validate_reply(task, content, PUBLIC, serialized_bytes(content)).num_examples == 40


KEYS = sorted(default_run_config())
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(), st.text(max_size=24),
                   st.lists(st.integers(), max_size=3), st.sampled_from(["", ":", "laptop:0", "laptop:-1", "a:b:c",
                                                                         "laptop:99999999999", "npz:", "../x"]))


@settings(max_examples=CONFIGS, deadline=None)
@given(st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=10)), VALUES, max_size=6))
def test_the_run_config_parser_names_every_bad_value_and_never_crashes(values):
    try:
        config = RunConfig.from_mapping(values)
    except ConfigError as exc:
        assert any(key in str(exc) or repr(key) in str(exc) for key in values), f"no given key named in: {exc}"
        return
    for key, value in values.items():  # accepted: every value is what was given, of the declared type
        assert getattr(config, key.replace("-", "_")) == value


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["name", "gflops", "memory_mb", "uplink_mbps", "downlink_mbps", "x"]),
                       VALUES, max_size=6))
def test_the_profile_parser_names_every_bad_value_and_never_crashes(values):
    try:
        profile = profile_from_dict(values, "generated")
    except ProfileError as exc:
        assert "generated" in str(exc) or any(k in str(exc) for k in values), str(exc)
        return
    assert profile.gflops > 0 and profile.memory_mb > 0
