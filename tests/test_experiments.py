"""The experiments command: a grid checked whole before it runs, finished runs skipped, changed ones refused;
its runs are Ray tasks, on an embedded Ray or on a cluster at --address, with the same results."""

import io
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

from experiments.__main__ import main
from experiments.runner import Outcome, StaleRun, progress_line, run_grid, run_sequentially, run_status
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("fraction,message", [("0.5", "this machine has no CUDA GPU; drop the flag"),
                                              ("1.5", "give a fraction of one GPU in (0, 1]")])
def test_gpus_per_run_is_refused_in_one_line_where_no_gpu_exists(tmp_path, capsys, fraction, message):
    assert main([str(write(tmp_path)), "--gpus-per-run", fraction]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()  # refused before any run started


def test_ctrl_c_stops_the_grid_with_one_line_saying_how_to_continue(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # where Ray's wait raises it on Ctrl-C
    monkeypatch.setattr("experiments.__main__.run_grid", interrupted)
    spec = write(tmp_path)
    assert main([str(spec)]) == 130
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "interrupted" in err and f"python -m experiments {spec}` again" in err


def test_an_address_where_no_ray_cluster_listens_is_refused_in_one_line(tmp_path, capsys):
    assert main([str(write(tmp_path)), "--address", f"127.0.0.1:{free_port()}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no Ray cluster answers there" in err and "ray start --head" in err
    assert not (tmp_path / "out").exists()


def test_the_progress_line_counts_runs_done_running_and_left_and_estimates_the_rest():
    outcome = Outcome("fedavg-seed0", "completed", 60.0, 0.4321)
    line = progress_line(outcome, finished=5, running=2, left=4, elapsed=600.0, done_now=3, total=11)
    # 3 runs finished here in 10 min: the 6 not finished take about 20 min more.
    assert line == ("[5/11 done, 2 running, 4 left] fedavg-seed0: final accuracy 0.4321 (60 s); elapsed 10.0 min, "
                    "about 20 min left")
    assert "FAILED: boom" in progress_line(Outcome("x", "failed", 1.0, None, "boom"), 1, 0, 0, 1.0, 1, 1)


ONE_RUN = {'strategies = ["fedavg", "heterofl"]': 'strategies = ["fedavg"]', "seeds = [0, 1]": "seeds = [0]",
           "lr = [0.05, 0.1]": "lr = [0.05]"}


def one_run_spec(tmp_path, output_dir="out", strategies='strategies = ["fedavg"]'):
    text = SPEC.replace('output-dir = "out"', f'output-dir = "{output_dir}"')
    for old, new in {**ONE_RUN, 'strategies = ["fedavg", "heterofl"]': strategies}.items():
        text = text.replace(old, new)
    path = tmp_path / f"{output_dir}.toml"
    path.write_text(text)
    return path


def test_each_run_is_a_task_on_an_embedded_ray_that_writes_its_own_results_where_the_spec_says(tmp_path):
    spec = load_spec(one_run_spec(tmp_path))
    out = io.StringIO()
    [outcome] = run_grid(spec, out=out)
    assert outcome.status == "completed" and outcome.host == socket.gethostname()
    doc = load_results(tmp_path / "out" / "runs" / "fedavg-lr=0.05-seed0")
    assert doc["status"] == "completed" and doc["summary"]["final_accuracy"] == outcome.final_accuracy
    assert "embedded Ray" in out.getvalue() and "[1/1 done, 0 running, 0 left] fedavg-lr=0.05-seed0" in out.getvalue()
    assert (tmp_path / "out" / "logs" / "fedavg-lr=0.05-seed0.log").stat().st_size > 0
    assert [o.status for o in run_grid(spec, out=io.StringIO())] == ["skipped"]  # and no Ray started for it


@pytest.fixture
def ray_head():
    """A Ray head on loopback with 2 CPUs and a small object store, in its own session and temp dir (never
    a cluster of anyone else's); its address, then the whole session is stopped by its process group."""
    port, temp = free_port(), tempfile.mkdtemp(prefix="rayh")  # short: Ray's socket paths must stay < 108 chars
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--port", str(port), "--node-ip-address", "127.0.0.1",
         "--num-cpus", "2", "--num-gpus", "0", "--object-store-memory", str(100 * 2**20), "--include-dashboard",
         "false", "--disable-usage-stats", "--ray-client-server-port", str(free_port()),
         "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", temp],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and head.poll() is None, "the Ray head did not start"
                time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)


def comparable(folder: Path) -> dict:
    """What a run computed (accuracy, losses, bytes), without its wall-clock times."""
    doc = load_results(folder)
    rounds = [{k: r[k] for k in ("accuracy", "loss", "bytes_down", "bytes_up", "participants")}
              | {"train_losses": [c["train_loss"] for c in r["clients"]]} for r in doc["rounds"]]
    return {"status": doc["status"], "summary": doc["summary"], "rounds": rounds, "devices": doc["devices"]}


@pytest.mark.slow
def test_a_ray_cluster_at_address_gives_the_same_results_as_the_embedded_ray(tmp_path, ray_head):
    strategies = 'strategies = ["fedavg", "heterofl"]'
    embedded, cluster = one_run_spec(tmp_path, "embedded", strategies), one_run_spec(tmp_path, "cluster", strategies)
    assert main([str(embedded)]) == 0
    assert main([str(cluster), "--address", ray_head]) == 0
    for name in ("fedavg-lr=0.05-seed0", "heterofl-lr=0.05-seed0"):
        made_here = comparable(tmp_path / "embedded" / "runs" / name)
        assert made_here["status"] == "completed"
        assert comparable(tmp_path / "cluster" / "runs" / name) == made_here


def test_sequential_runs_each_run_in_a_fresh_process_without_ray_with_the_same_files_and_skipping(tmp_path):
    spec = load_spec(one_run_spec(tmp_path, strategies='strategies = ["fedavg", "heterofl"]'))
    out = io.StringIO()
    outcomes = run_sequentially(spec, out=out)
    assert [o.status for o in outcomes] == ["completed", "completed"]
    for outcome in outcomes:
        doc = load_results(tmp_path / "out" / "runs" / outcome.name)
        assert doc["status"] == "completed" and doc["summary"]["final_accuracy"] == outcome.final_accuracy
        assert (tmp_path / "out" / "logs" / f"{outcome.name}.log").stat().st_size > 0
    assert "without Ray" in out.getvalue() and "[2/2 done, 0 running, 0 left]" in out.getvalue()
    assert [o.status for o in run_sequentially(spec, out=io.StringIO())] == ["skipped", "skipped"]


def test_sequential_refuses_ray_options_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(write(tmp_path)), "--sequential", "--gpus-per-run", "0.5"])
    err = capsys.readouterr().err
    assert "--sequential runs one run at a time" in err and not (tmp_path / "out").exists()
