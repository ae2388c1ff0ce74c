"""The experiments command: a grid checked whole before it runs, finished runs skipped, changed ones refused."""

import json
from pathlib import Path

import pytest

from experiments.__main__ import main
from experiments.runner import StaleRun, run_grid, run_status
from experiments.spec import SpecError, load_spec
from experiments.summary import write_report
from fl_app.results import load_results

SPEC = """
name = "tiny"
output-dir = "out"
nodes = 2
workers = 1
strategies = ["fedavg", "heterofl"]
seeds = [0, 1]
[config]
num-server-rounds = 1
max-client-examples = 16
public-size = 16
test-size = 32
[vary]
lr = [0.05, 0.1]
"""


def write(tmp_path, text=SPEC):
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return path


def test_a_spec_expands_to_strategies_times_values_times_seeds(tmp_path):
    spec = load_spec(write(tmp_path))
    assert len(spec.runs) == 2 * 2 * 2
    run = spec.runs[0]
    assert run.name == "fedavg-lr=0.05-seed0" and run.group == "fedavg-lr=0.05"
    assert [r.seed for r in spec.runs] == [0] * 4 + [1] * 4  # seed by seed: an early stop leaves whole seeds
    assert run.config["strategy"] == "fedavg" and run.config["lr"] == 0.05 and run.config["seed"] == 0
    assert run.config["output-dir"] == str(tmp_path / "out" / "runs")


@pytest.mark.parametrize("change,message", [
    ('strategies = ["fedavg", "heterofl"]', "valid choices are fedavg"),
    ("num-server-rounds = 1", "num-server-rounds = 0: must be >= 1"),
    ('name = "tiny"', "unknown key 'colour'"),
    ("lr = [0.05, 0.1]", "'seed' is set by the grid"),
    ("test-size = 32", "does not exist"),
])
def test_a_bad_spec_is_refused_whole_with_one_clear_line_before_anything_runs(tmp_path, change, message):
    bad = {'strategies = ["fedavg", "heterofl"]': 'strategies = ["fedavg", "fedprox"]',
           "num-server-rounds = 1": "num-server-rounds = 0",
           'name = "tiny"': 'name = "tiny"\ncolour = "red"',
           "lr = [0.05, 0.1]": "lr = [0.05, 0.1]\nseed = [1]",
           "test-size = 32": 'test-size = 32\ndataset = "npz:/nonexistent/data.npz"'}[change]
    path = write(tmp_path, SPEC.replace(change, bad))
    with pytest.raises(SpecError, match=message) as err:
        load_spec(path)
    assert "\n" not in str(err.value)
    assert main([str(path)]) == 2 and not (tmp_path / "out").exists()


def _fake_completed(run, **config_changes):
    """A completed results.json for `run`, as the app writes it (config keys with underscores)."""
    folder = Path(run.config["output-dir"]) / run.name
    folder.mkdir(parents=True)
    config = {k.replace("-", "_"): v for k, v in {**run.config, **config_changes}.items()}
    rounds = [{"round": 1, "accuracy": 0.5, "loss": 1.0, "bytes_down": 10**6, "bytes_up": 10**6, "clients": [
        {"node_id": 1, "profile": "laptop", "participated": True, "peak_memory_mb": 12.0, "device_time_s": 3.0}]}]
    summary = {"final_accuracy": 0.5, "best_accuracy": 0.5, "distinct_participants": 1, "total_bytes_down": 10**6,
               "total_bytes_up": 10**6, "total_device_time_s": 3.0}
    (folder / "results.json").write_text(json.dumps({"status": "completed", "error": None, "config": config,
                                                     "devices": [], "rounds": rounds, "summary": summary}))


def test_finished_runs_are_skipped_when_the_grid_is_run_again(tmp_path):
    spec = load_spec(write(tmp_path))
    for run in spec.runs:
        _fake_completed(run)
    outcomes = run_grid(spec)
    assert [o.status for o in outcomes] == ["skipped"] * len(spec.runs)


def test_a_finished_run_made_with_other_values_is_refused_not_reused(tmp_path):
    spec = load_spec(write(tmp_path))
    _fake_completed(spec.runs[0], **{"num-server-rounds": 5})
    with pytest.raises(StaleRun, match="num-server-rounds"):
        run_status(spec.runs[0])


def test_the_report_gives_mean_and_std_over_seeds_and_counts_missing_seeds(tmp_path):
    spec = load_spec(write(tmp_path))
    for run in [r for r in spec.runs if r.group == "fedavg-lr=0.05"] + spec.runs[1:2]:  # 2 seeds, 1 seed
        _fake_completed(run)
    paths = write_report(spec)
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| fedavg-lr=0.05 | 2/2 | 0.500 ± 0.000 |" in table
    assert "| fedavg-lr=0.1 | 1/2 |" in table and "| heterofl-lr=0.05 | 0/2 | - |" in table
    assert {p.name for p in paths} >= {"table.md", "table.csv", "accuracy_vs_round.png", "accuracy_vs_traffic.png"}


@pytest.mark.slow
def test_a_real_grid_runs_then_skips_everything_on_a_second_call(tmp_path):
    path = write(tmp_path, SPEC.replace("seeds = [0, 1]", "seeds = [0]").replace("lr = [0.05, 0.1]", "lr = [0.05]")
                 .replace('strategies = ["fedavg", "heterofl"]', 'strategies = ["fedavg"]'))
    assert main([str(path)]) == 0
    doc = load_results(tmp_path / "out" / "runs" / "fedavg-lr=0.05-seed0")
    assert doc["status"] == "completed"
    assert [o.status for o in run_grid(load_spec(path))] == ["skipped"]
