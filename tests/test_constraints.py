"""Physical constraints, one rule for every strategy (shared/docs/ALGORITHMS.md, "Constraints are physical").

A device never gets a job whose predicted peak memory exceeds its budget; with an emulated round
deadline, never one whose predicted device time (compute at its GFLOPS + bytes at its link rates, the
virtual clock's price) exceeds the deadline. Without a deadline nobody is left out for compute.
FedAvg is the documented exception: the upper bound that ignores device limits.
"""

import re
from dataclasses import replace

import pytest

from fl_app.config import ConfigError, RunConfig
from server_app.plan import make_plan
from server_app.server_app import left_out_kind
from server_app.strategies import STRATEGIES
from server_app.strategies.allsmall import AllSmall
from server_app.strategies.base import StrategySetupError
from server_app.strategies.depthfl import DepthFL
from server_app.strategies.exclusivefl import ExclusiveFL
from server_app.strategies.fedrolex import FedRolex
from server_app.strategies.heterofl import HeteroFL
from server_app.strategies.profl import ProFL
from server_app.strategies.reft import REFT
from tests.test_reft import federation

MIX = ["raspberry-pi-3b-plus", "raspberry-pi-4", "jetson-nano", "laptop", "workstation"]
# The default mix on the CNN, 64 examples each: a full-model round takes the Pi 3B+ 2.0 s and the Pi 4
# 0.8 s of device time, the Jetson 0.43 s and the others less (python -m server_app.plan, this config).
PLAN = {"model": "cnn", "dataset": "synthetic", "num-server-rounds": 3, "device-mix": ",".join(MIX),
        "max-client-examples": 64, "batch-size": 32, "public-size": 64, "test-size": 100,
        "memory-pool": "uniform-fraction:0.5-1.2"}
DEADLINE = 0.6  # emulated seconds: the two Pis cannot train the full model in it, the rest can
BOUNDED = [name for name in STRATEGIES if name != "fedavg"]


@pytest.mark.parametrize("deadline", [0.0, DEADLINE])
@pytest.mark.parametrize("name", BOUNDED)
def test_no_strategy_sends_a_job_over_a_devices_memory_or_the_deadline(name, deadline):
    plan = make_plan({**PLAN, "emulated-deadline": deadline}, strategies=[name])
    [strategy] = plan.strategies
    assert strategy.error is None
    budgets = {d.node_id: d.profile.memory_mb for d in plan.devices}
    sent = [task for tasks in strategy.rounds for task in tasks]
    assert sent
    for task in sent:  # the exact price the run records (server_app.pricing.price_task)
        assert task.price.predicted_peak_memory_mb <= budgets[task.node_id], (task.node_id, task.label)
        if deadline:
            assert task.price.device_time_s <= deadline, (task.node_id, task.label, task.price.device_time_s)


@pytest.mark.parametrize("name", BOUNDED)
def test_without_a_deadline_nobody_is_left_out_for_compute(name):
    plan = make_plan({**PLAN, "memory-pool": ""}, strategies=[name])  # the profiles' memory: all fit the CNN
    [strategy] = plan.strategies
    for absent in strategy.absent:
        assert not any(left_out_kind(reason) != "other" for reason in absent.values()), absent


def test_a_deadline_gives_slower_devices_smaller_submodels():
    """REFT's pruning adapted to each client's FLOPS falls out of sizing to one deadline."""
    fed = federation(MIX, **{"emulated-deadline": 0.4, "max-client-examples": 64})
    strategy = REFT(fed)
    by_speed = sorted(fed.devices, key=lambda d: d.profile.gflops)
    levels = [strategy.ratios.get(d.node_id, 0.0) for d in by_speed]
    assert levels == sorted(levels) and levels[0] < levels[-1] == 1.0


def test_every_strategy_gives_the_full_model_to_the_same_devices():
    fed = federation(MIX, **{"batch-size": 64, "emulated-deadline": 0.6})
    full = {d.node_id for d in fed.devices if fed.fits(fed.cost(fed.full_spec()), d)}
    assert 0 < len(full) < len(MIX)
    assert {d.node_id for d in ExclusiveFL(fed).eligible} == full
    for strategy in (HeteroFL(fed), FedRolex(fed)):
        assert {n for n, r in strategy.ratios.items() if r == 1.0} == full, strategy.name
    assert AllSmall(fed).keep_ratio < 1.0


def test_profl_selects_each_step_by_the_same_rule():
    fed = federation(MIX, **{"batch-size": 256, "strategy": "profl", "emulated-deadline": 0.6})
    strategy = ProFL(fed)
    strategy.configure_train(1)
    job = strategy.job(1, strategy.step)
    assert {d.node_id for d in strategy.eligible} == {d.node_id for d in fed.devices
                                                      if fed.job_shortfall(job, d) is None}


@pytest.mark.parametrize("strategy_class", [ExclusiveFL, DepthFL])
def test_a_left_out_device_is_told_which_budget_and_which_key(strategy_class):
    fed = federation(MIX, model="resnet18", **{"batch-size": 128})
    reasons = list(strategy_class(fed).left_out.values())
    assert reasons and all("memory: needs" in r and "batch-size" in r for r in reasons)
    assert {left_out_kind(r) for r in reasons} == {"memory"}  # the console's count says why, not "other"
    late = federation(MIX, **{"emulated-deadline": 0.1, "max-client-examples": 64})
    reasons = list(strategy_class(late).left_out.values())
    assert reasons and all("deadline: needs" in r and "emulated-deadline" in r for r in reasons)
    assert {left_out_kind(r) for r in reasons} == {"deadline"}


def test_a_device_joining_allsmall_below_its_shared_submodel_is_told_which_budget():
    fed = federation(MIX, model="resnet18", **{"batch-size": 128})
    strategy = AllSmall(fed)
    weakest = min(fed.devices, key=lambda d: d.profile.memory_mb)
    poorer = replace(weakest, node_id=99, profile=replace(weakest.profile, memory_mb=1.0))
    strategy.admit(poorer)
    assert left_out_kind(strategy.left_out[99]) == "memory" and "batch-size" in strategy.left_out[99]


@pytest.mark.parametrize("strategy_class", [ExclusiveFL, AllSmall, HeteroFL, REFT, ProFL, DepthFL])
def test_a_deadline_nobody_meets_stops_the_run_naming_the_closest_device(strategy_class):
    fed = federation(MIX, **{"emulated-deadline": 1e-5, "strategy": strategy_class.name})
    with pytest.raises(StrategySetupError) as error:
        strategy_class(fed)
    text = str(error.value)
    assert "deadline: needs" in text and "raise emulated-deadline" in text and "lower min-keep-ratio" not in text
    fastest = max(fed.devices, key=lambda d: d.profile.gflops)  # the closest: the shortest time
    assert f"node {fastest.node_id}:" in text


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_the_advised_deadline_lets_the_run_start(name):
    """A refusal's advice must work: raising emulated-deadline to the time it names starts the strategy."""
    strategy_class = STRATEGIES[name]
    fed = federation(MIX, **{"emulated-deadline": 1e-5, "strategy": name})
    with pytest.raises(StrategySetupError) as error:
        strategy_class(fed)
    needs = float(re.search(r"needs ([0-9.e+-]+) s", str(error.value)).group(1))
    strategy_class(federation(MIX, **{"emulated-deadline": needs * 1.01, "strategy": name}))  # starts


def test_lowering_min_keep_ratio_is_advised_only_when_it_helps():
    pis = ["raspberry-pi-3b-plus", "raspberry-pi-3b-plus"]  # 300 MB each
    fed = federation(pis, model="resnet18", **{"batch-size": 256, "min-keep-ratio": 0.5})
    with pytest.raises(StrategySetupError) as error:
        HeteroFL(fed)
    assert "lower min-keep-ratio" in str(error.value)
    HeteroFL(federation(pis, model="resnet18", **{"batch-size": 256, "min-keep-ratio": 0.01}))  # the advice works
    hopeless = federation(pis, model="resnet18", **{"batch-size": 4096, "min-keep-ratio": 0.01})
    with pytest.raises(StrategySetupError) as error:
        HeteroFL(hopeless)
    assert "lower min-keep-ratio" not in str(error.value)  # one channel per layer would not fit either


def advised_changes(error: str) -> list[dict]:
    """The run-config changes a memory refusal advises, each as a config override."""
    changes = [{"batch-size": int(b)} for b in re.findall(r"lower batch-size to (\d+)", error)]
    changes += [{"checkpoint": True}] if "set checkpoint = true" in error else []
    changes += [{"memory-pool": p} for p in re.findall(r"memory-pool = '([^']+)'", error)]
    return changes


# Pools too small for each strategy at batch 64: every bounded strategy below 1.5 MB or 5 % of the full
# model's peak; the full-model and per-block strategies also at 20-30 MB (where a smaller batch fits).
TOO_SMALL = [(name, pool) for name in BOUNDED for pool in ("uniform:1-1.5", "uniform-fraction:0.02-0.05")] + \
            [(name, "uniform:20-30") for name in ("exclusivefl", "profl", "depthfl")]


@pytest.mark.parametrize("name,pool", TOO_SMALL)
def test_every_memory_advice_lets_the_run_start(name, pool):
    """A memory refusal offers only changes priced to work (a smaller batch-size, checkpointing, a
    fraction pool's lower bound); applying any one of them starts the strategy's plan."""
    config = {**PLAN, "memory-pool": pool, "batch-size": 64}
    [refused] = make_plan(config, strategies=[name]).strategies
    assert refused.error is not None and "memory: needs" in refused.error
    changes = advised_changes(refused.error)
    if not changes:  # only when nothing would: not even batch 1 fits the closest device
        assert "no batch-size or checkpointing fits it" in refused.error
        assert not pool.startswith("uniform-fraction")  # a fraction pool's lower bound always can
    for change in changes:
        [started] = make_plan({**config, **change}, strategies=[name]).strategies
        assert started.error is None, (change, started.error)


def test_checkpointing_is_advised_where_it_is_what_fits():
    """ResNet-18 at batch 96 on a 300 MB Pi (564 MB predicted): checkpointing brings the full model
    within budget (280 MB), and planning with checkpoint = true then prices the jobs as they train."""
    fed = federation(["raspberry-pi-3b-plus"], model="resnet18", **{"batch-size": 96})
    full = fed.cost(fed.full_spec())
    reason = fed.shortfall(full, fed.devices[0])
    assert "set checkpoint = true" in reason, reason
    checkpointed = federation(["raspberry-pi-3b-plus"], model="resnet18", **{"batch-size": 96, "checkpoint": True})
    assert checkpointed.shortfall(checkpointed.cost(checkpointed.full_spec()), checkpointed.devices[0]) is None


@pytest.mark.parametrize("key", ["constraints", "compute-slack", "profl-shrink-rounds"])
def test_a_removed_key_says_what_replaced_it(key):
    with pytest.raises(ConfigError, match=f"{key} was removed: "):
        RunConfig.from_mapping({key: 1})
