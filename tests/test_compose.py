"""The docker-compose federation for real (scripts/compose_federation.py), with real container limits.

It installs Docker and Compose from Debian's packages when missing, starts its own dockerd, builds
stand-ins for Flower's images and the project's image from the project's Dockerfile, brings up
docker-compose.yml unchanged (SuperLink, ServerApp, 4 SuperNodes with their profiles' limits) plus a
fifth SuperNode whose ClientApp container has less memory than its job needs, runs 2 rounds, and
always tears everything down. About 10 min from scratch, 3-4 min with the image cache
(FL_COMPOSE_CACHE) kept. Needs root (apt, dockerd, debootstrap).
"""

from __future__ import annotations

import json
import os
import warnings

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def summary():
    if os.geteuid() != 0:
        pytest.skip("needs root: installs packages, starts dockerd and debootstraps a base image")
    from scripts.compose_federation import run_compose_federation

    result = run_compose_federation(tls=False, rounds=2)
    print(json.dumps({k: v for k, v in result.items() if k != "flwr_run_tail"}, indent=1))
    return result


def test_federation_completes_two_rounds(summary):
    assert not summary["problems"], json.dumps(summary, indent=1)
    if "first_attempt" in summary:  # retried once (scripts/compose_federation.py says when): shown, not hidden
        warnings.warn("the first run got no ClientApp started and was retried: "
                      + json.dumps(summary["first_attempt"], indent=1))
    assert summary["status"] == "finished:completed"
    # SuperLink, ServerApp SuperExec, the Fleet-only proxy, 5 SuperNodes, 5 ClientApp SuperExecs
    assert summary["containers"] == 13
    assert [r["round"] for r in summary["results"]["rounds"]] == [1, 2]


def test_container_limits_are_the_profiles(summary):
    mem = summary["memory"]
    expected = {"superexec-clientapp-1": 1000, "superexec-clientapp-2": 2900, "superexec-clientapp-3": 1900,
                "superexec-clientapp-4": 7700, "supernode-1": 768, "supernode-4": 768}
    for service, limit in expected.items():
        assert mem[service]["limit_mib"] == pytest.approx(limit), (service, mem[service])
        assert 0 < mem[service]["peak_mib"] <= limit
        assert not mem[service]["oom_kills"], (service, mem[service])


def test_undersized_node_is_killed_by_the_kernel_and_recorded(summary):
    small = summary["undersized"]
    assert small["oom_kills"] >= 1, small
    assert small["peak_mib"] >= small["limit_mib"] - 8  # it ran into its limit
    errors = small["recorded_errors"]
    assert errors, summary["results"]
    # Where the kill lands decides what Flower reports: before the reply (CLIENT_APP_CRASHED, "process died")
    # or during its upload (MESSAGE_UNAVAILABLE, "upload never completed"). After the latter the node's
    # SuperNode has also missed the next round (no reply within the round deadline). Anything else is a bug.
    died = [e for e in errors if "process died" in e or "upload never completed" in e]
    assert died, errors
    assert all(e in died or e.startswith("no reply within the round deadline") for e in errors), errors
    if len(died) < len(errors):
        warnings.warn(f"the under-sized node also missed a round after its kill: {errors}")
    for r in summary["results"]["rounds"]:
        ok = [c for c in r["clients"] if c["participated"] and not c["error"]]
        assert len(ok) == 4, r
