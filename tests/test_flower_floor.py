"""benchmarks/flower_floor, the do-nothing Flower app behind `scripts/compare_engines.py --floor`, still
runs and times its rounds on the pinned Flower (slow: one `flwr run` in simulation)."""

import json

import pytest

from tests.flwr_harness import REPO, flwr_simulation


@pytest.mark.slow
def test_the_floor_app_times_each_round_of_one_message_per_node(tmp_path):
    timings = tmp_path / "timings.json"
    run = flwr_simulation(tmp_path, {"num-server-rounds": 2, "min-nodes": 3, "timings-file": str(timings)},
                          num_supernodes=3, timeout_s=300, app=REPO / "benchmarks" / "flower_floor")
    assert run.status == "finished:completed", run.log[-3000:]
    doc = json.loads(timings.read_text())
    assert doc["nodes"] == 3 and doc["replies"] == [3, 3]
    assert len(doc["seconds"]) == 2 and all(s > 0 for s in doc["seconds"])
