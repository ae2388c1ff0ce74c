"""One constraint policy: for the same budgets and `constraints`, every strategy draws the same line."""

import pytest

from fl_app.config import CONSTRAINTS
from server_app.strategies.allsmall import AllSmall
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


def test_a_left_out_device_is_told_which_budget_and_which_key():
    fed = federation(MIX, constraints="memory", model="resnet18", **{"batch-size": 128})
    strategy = ExclusiveFL(fed)
    reasons = list(strategy.left_out.values())
    assert reasons and all("memory: needs" in r and "batch-size" in r for r in reasons)
