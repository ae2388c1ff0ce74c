"""End to end: the real `flwr run` simulation engine, and real MNIST. Slow; CI runs them."""


import pytest

from tests.flwr_harness import flwr_simulation
from tests.test_data import SHARED, needs_shared
from tests.test_federation import run
from fl_app.results import load_results

pytestmark = pytest.mark.slow


def test_the_default_main_job_runs_under_flwr_run_and_records_every_round(tmp_path):
    out = tmp_path / "outputs"
    result = flwr_simulation(tmp_path, {"output-dir": str(out), "run-name": "main"}, num_supernodes=10)
    assert "completed" in result.status.lower() and "fail" not in result.status.lower(), result.log[-3000:]
    results = load_results(out / "main")
    assert results["status"] == "completed"
    assert len({d["profile"] for d in results["devices"]}) >= 3
    rounds = results["rounds"]
    assert len(rounds) == results["config"]["num_server_rounds"] and results["config"]["strategy"] == "profl"
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"] + 0.1
    trained = {c["node_id"] for r in rounds for c in r["clients"] if c["participated"] and c["error"] is None}
    assert len(trained) >= 8  # the memory wall binds, and ProFL lets the weak devices train blocks
    assert {r["active_block"] for r in rounds if r["stage"] == "grow"} == {1, 2, 3}
    assert rounds[-1]["evaluated"] == "blocks 1-3"  # the full model
    assert "cannot train the full model" in result.log and "trained blocks instead" in result.log


def test_a_run_that_fails_is_reported_as_failed_by_flwr(tmp_path):
    result = flwr_simulation(tmp_path, {"output-dir": str(tmp_path / "o"), "dataset": "mnist",
                                        "data-dir": str(tmp_path / "nowhere")}, num_supernodes=2)
    assert "fail" in result.status.lower()
    assert "data-dir" in result.log


@needs_shared
def test_fedavg_with_a_small_cnn_reaches_97_percent_on_real_mnist(tmp_path):
    results, _ = run(tmp_path, num_nodes=5, **{
        "dataset": "mnist", "data-dir": str(SHARED), "num-server-rounds": 3, "max-client-examples": 5000,
        "test-size": 0, "local-epochs": 1})
    accuracy = results["rounds"][-1]["accuracy"]
    assert accuracy >= 0.97, [r["accuracy"] for r in results["rounds"]]
