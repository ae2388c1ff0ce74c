"""The round loop against the real ClientApp, in-process: what a run records and refuses."""


import pytest
import torch
from flwr.app import Context, RecordDict

from fl_app.job import Job
from fl_app.models import ModelSpec, build_model
from fl_app.training import TrainConfig
from fl_app.wire import encode
from server_app.rounds import run_train_tasks
from server_app.strategies.base import TrainTask
from server_app.server_app import main
from experiments.inprocess import InProcessGrid
from fl_app.results import load_results


def run(tmp_path, num_nodes=4, tamper=None, on_grid=None, node_config=None, **overrides):
    config = {"strategy": "fedavg", "memory-pool": "", "num-server-rounds": 2,
              "device-mix": "raspberry-pi-3b-plus:1,raspberry-pi-4:1,laptop:1,workstation:1",
              "output-dir": str(tmp_path), "run-name": "run", "public-size": 100, "max-client-examples": 96,
              "test-size": 300, **overrides}
    grid = InProcessGrid(config, num_nodes, tamper, node_config)
    if on_grid:
        on_grid(grid)
    main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    return load_results(tmp_path / "run"), grid


def test_fedavg_records_devices_rounds_and_clients(tmp_path):
    results, _ = run(tmp_path)
    assert results["status"] == "completed"
    assert [d["profile"] for d in results["devices"]] == ["raspberry-pi-3b-plus", "raspberry-pi-4", "laptop",
                                                         "workstation"]
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    first = results["rounds"][0]
    assert first["participants"] == 4 and first["bytes_down"] > 0 and first["bytes_up"] > 0
    client = first["clients"][0]
    for key in ("node_id", "participated", "model_params", "train_flops_per_sample", "peak_memory_mb",
                "predicted_peak_memory_mb", "device_time_s", "error"):
        assert key in client
    assert client["peak_memory_mb"] > 0 and client["device_time_s"] > 0
    slowest = max(first["clients"], key=lambda c: c["device_time_s"])
    assert slowest["profile"] == "raspberry-pi-3b-plus"
    assert results["summary"]["rounds_completed"] == 2
    assert (tmp_path / "run" / "rounds.csv").read_text().count("\n") == 3


def test_accuracy_rises_over_rounds_on_synthetic_data(tmp_path):
    results, _ = run(tmp_path, **{"num-server-rounds": 3, "max-client-examples": 400})
    accuracies = [r["accuracy"] for r in results["rounds"]]
    assert accuracies[-1] > accuracies[0] and accuracies[-1] > 0.3


def test_exclusivefl_trains_only_the_devices_that_fit(tmp_path):
    results, grid = run(tmp_path, strategy="exclusivefl", **{"emulated-deadline": 0.6})  # the Pis are too slow
    participants = {c["profile"] for c in results["rounds"][0]["clients"] if c["participated"]}
    assert participants == {"laptop", "workstation"}
    assert {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "train"} == {3, 4}


def test_exclusivefl_never_sends_a_job_a_device_cannot_fit(tmp_path):
    results, grid = run(tmp_path, num_nodes=2, strategy="exclusivefl", model="resnet18", **{
        "device-mix": "workstation:1,raspberry-pi-3b-plus:1", "batch-size": 512,
        "num-server-rounds": 1, "max-client-examples": 8})
    pi = results["rounds"][0]["clients"][1]
    assert pi["profile"] == "raspberry-pi-3b-plus" and not pi["participated"] and pi["error"] is None
    assert {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "train"} == {1}


def test_an_emulated_device_that_runs_out_of_memory_fails_like_one(tmp_path):
    tiny = tmp_path / "tiny.toml"
    tiny.write_text('name = "tiny"\ngflops = 1.0\nmemory_mb = 2.0\nuplink_mbps = 1.0\ndownlink_mbps = 1.0\n')
    config = {"device-mix": f"{tiny}:1", "max-client-examples": 64, "memory-pool": ""}
    grid = InProcessGrid(config, 1)
    spec = ModelSpec("cnn")
    job = Job(round=1, model=spec, train=TrainConfig(batch_size=32), enforce_memory=True)
    tasks = [TrainTask(1, job, build_model(spec).state_dict())]
    [outcome] = run_train_tasks(grid, tasks, public_size=500)
    assert outcome.update is None and "out of memory" in outcome.error and "2.0 MB" in outcome.error
    # The same job with the budget waived (FedAvg's upper bound) trains.
    tasks = [TrainTask(1, Job(round=1, model=spec, train=TrainConfig(batch_size=32), enforce_memory=False),
                       build_model(spec).state_dict())]
    [outcome] = run_train_tasks(grid, tasks, public_size=500)
    assert outcome.error is None and outcome.update.metrics["peak-memory-mb"] > 2.0


@pytest.mark.parametrize("fault,message", [
    (lambda t: {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in t.items()},
     "NaN or Inf"),
    (lambda t: {k: v[:1] if v.dim() else v for k, v in t.items()}, "shape"),
    (lambda t: dict(list(t.items())[1:]), "missing"),
])
def test_malformed_updates_are_rejected_by_client_and_the_round_goes_on(tmp_path, fault, message):
    def tamper(node, reply):
        if node != 2 or reply.metadata.message_type != "train" or reply.has_error():
            return reply
        from fl_app.wire import decode
        reply.content["weights"] = encode(fault(decode(reply.content["weights"])))
        return reply

    results, _ = run(tmp_path, tamper=tamper)
    for r in results["rounds"]:
        bad = r["clients"][1]
        assert bad["node_id"] == 2 and not bad["participated"] and message in bad["error"]
        assert r["participants"] == 3
    assert results["status"] == "completed"


def test_an_invalid_run_config_stops_before_any_message_is_sent(tmp_path):
    config = {"strategy": "nope", "output-dir": str(tmp_path)}
    grid = InProcessGrid(config, 2)
    with pytest.raises(ValueError, match="valid choices are fedavg"):
        main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    assert grid.sent == []


def test_a_test_subset_is_a_random_sample_not_the_first_rows(tmp_path):
    """Stored datasets are often sorted by class; the first rows would be one or two classes."""
    from fl_app.data import make_synthetic
    from server_app.server_app import _test_batches
    from fl_app.config import RunConfig

    d = make_synthetic(train_size=100, test_size=1000)
    ordered = type(d)(d.x_train, d.y_train, d.x_test[d.y_test.argsort()], d.y_test.sort().values, d.num_classes,
                      d.mean, d.std)
    batches = _test_batches(ordered, RunConfig.from_mapping({"test-size": 200}))
    assert len(batches) == 200 and len(batches.y.unique()) == 10
