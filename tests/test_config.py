"""The run config: defaults from pyproject, every bad value named with its fix, before any training."""

import pytest

from fl_app.config import ConfigError, RunConfig, default_run_config
from server_app.strategies import STRATEGIES


def test_defaults_in_pyproject_are_valid():
    config = RunConfig.from_mapping({})
    assert config.strategy == "profl" and config.dataset == "synthetic"  # the main job: ProFL at the memory wall
    assert config.memory_pool and config.emulated_deadline == 0


def test_the_strategy_registry_is_the_one_list_of_valid_strategies():
    for name in STRATEGIES:
        assert RunConfig.from_mapping({"strategy": name}, strategies=STRATEGIES).strategy == name
    with pytest.raises(ConfigError, match="valid choices are " + ", ".join(STRATEGIES)):
        RunConfig.from_mapping({"strategy": "fedprox"}, strategies=STRATEGIES)


def test_every_default_key_is_a_field():
    assert RunConfig.from_mapping(default_run_config())


@pytest.mark.parametrize("key,value,message", [
    ("strategy", "fedprox", "valid choices are fedavg"),
    ("model", "resnet50", "valid choices are cnn"),
    ("dataset", "imagenet", "npz:<file>"),
    ("partition", "random", "valid choices are iid, dirichlet, shards"),
    ("device-mix", "toaster:3", "unknown device profile 'toaster'"),
    ("device-mix", "laptop:zero", "an integer from 1 to"),
    ("lr", 0, "must be > 0"),
    ("fraction-train", 1.5, r"\(0, 1\]"),
    ("num-server-rounds", 0, "must be >= 1"),
    ("batch-size", "32", "expected an int"),
    ("augment", 1, "expected a bool"),
    ("run-name", "../escape", "plain folder name"),
])
def test_bad_values_are_named_with_what_would_be_valid(key, value, message):
    with pytest.raises(ConfigError, match=message) as err:
        RunConfig.from_mapping({key: value}, strategies=STRATEGIES)
    assert key in str(err.value)


def test_unknown_keys_and_several_problems_are_reported_together():
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping({"learning-rate": 0.1, "strategy": "x", "model": "y"}, strategies=STRATEGIES)
    text = str(err.value)
    assert "unknown key 'learning-rate'" in text and "strategy" in text and "model" in text
