"""One constraint policy: for the same budgets and `constraints`, every strategy draws the same line."""

from dataclasses import replace

import pytest

from fl_app.config import CONSTRAINTS
from server_app.server_app import left_out_kind
from server_app.strategies.allsmall import AllSmall
from server_app.strategies.depthfl import DepthFL
from server_app.strategies.exclusivefl import ExclusiveFL
from server_app.strategies.fedrolex import FedRolex
from server_app.strategies.heterofl import HeteroFL
from server_app.strategies.profl import ProFL
from server_app.strategies.reft import REFT
from tests.test_reft import federation

# Budgets chosen so the policies disagree: a Pi 4 has compute but little memory relative to
# the laptop, the workstation has both.
MIX = ["raspberry-pi-3b-plus", "raspberry-pi-4", "jetson-nano", "laptop", "workstation"]


def fits_full(fed) -> set[int]:
    full = fed.cost(fed.full_spec())
    return {d.node_id for d in fed.devices if fed.fits(full, d)}


@pytest.mark.parametrize("constraints", CONSTRAINTS)
def test_every_strategy_gives_the_full_model_to_the_same_devices(constraints):
    fed = federation(MIX, constraints=constraints, **{"batch-size": 256})
    full = fits_full(fed)
    assert {d.node_id for d in ExclusiveFL(fed).eligible} == full
    for strategy in (HeteroFL(fed), FedRolex(fed), REFT(fed)):
        assert {n for n, r in strategy.ratios.items() if r == 1.0} == full, strategy.name
    assert (AllSmall(fed).keep_ratio == 1.0) == (full == {d.node_id for d in fed.devices})


@pytest.mark.parametrize("constraints", CONSTRAINTS)
def test_profl_selects_each_step_by_the_same_rule(constraints):
    fed = federation(MIX, constraints=constraints, **{"batch-size": 256, "strategy": "profl"})
    strategy = ProFL(fed)
    strategy.configure_train(1)
    job = strategy.job(1, strategy.step)
    assert {d.node_id for d in strategy.eligible} == {d.node_id for d in fed.devices
                                                      if fed.job_shortfall(job, d) is None}


def test_the_policy_decides_which_budget_binds():
    by_policy = {c: fits_full(federation(MIX, constraints=c, **{"batch-size": 256})) for c in CONSTRAINTS}
    assert by_policy["memory+compute"] == by_policy["memory"] & by_policy["compute"]
    assert by_policy["memory"] != by_policy["compute"]  # this mix: the two budgets disagree


@pytest.mark.parametrize("strategy_class", [ExclusiveFL, DepthFL])
def test_a_left_out_device_is_told_which_budget_and_which_key(strategy_class):
    fed = federation(MIX, constraints="memory", model="resnet18", **{"batch-size": 128})
    reasons = list(strategy_class(fed).left_out.values())
    assert reasons and all("memory: needs" in r and "batch-size" in r for r in reasons)
    assert {left_out_kind(r) for r in reasons} == {"memory"}  # the console's count says why, not "other"


def test_a_device_joining_allsmall_below_its_shared_submodel_is_told_which_budget():
    fed = federation(MIX, constraints="memory", model="resnet18", **{"batch-size": 128})
    strategy = AllSmall(fed)
    weakest = min(fed.devices, key=lambda d: d.profile.memory_mb)
    poorer = replace(weakest, node_id=99, profile=replace(weakest.profile, memory_mb=1.0))
    strategy.admit(poorer)
    assert left_out_kind(strategy.left_out[99]) == "memory" and "batch-size" in strategy.left_out[99]
