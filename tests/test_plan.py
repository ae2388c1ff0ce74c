"""The planner predicts what a run records: one in-process round per strategy against its plan."""

import json

import pytest

from experiments.inprocess import run_inprocess
from server_app.plan import FOLD_FREE, main, make_plan, plan_config, plan_dataset, plan_devices, plan_strategy
from server_app.strategies import STRATEGIES

# Every profile of the default mix once; with the deadline the Pis are left out or given submodels.
BASE = {"memory-pool": "", "model": "cnn", "dataset": "synthetic", "num-server-rounds": 1, "fraction-train": 1.0,
        "device-mix": "raspberry-pi-3b-plus,raspberry-pi-4,jetson-nano,laptop,workstation",
        "max-client-examples": 64, "batch-size": 32, "public-size": 64, "test-size": 100}
POOL = {"memory-pool": "uniform-fraction:0.3-1.3"}
DEADLINE = {"emulated-deadline": 0.6}
CASES = ([(name, {}) for name in STRATEGIES] + [("profl", POOL), ("heterofl", POOL)]
         + [(name, DEADLINE) for name in ("exclusivefl", "heterofl", "reft", "depthfl")]
         # Width-scaled models through the planner, the width routine, ProFL's steps and DepthFL's exits.
         + [(name, {**POOL, "model": model}) for name, model in (("profl", "vgg16-w0.25"),
                                                                 ("fedrolex", "vgg16-w0.25"),
                                                                 ("depthfl", "resnet18-w0.25"))])
# ResNet-18's ProFL step 1 (no checkpointing) is predicted 4 % below its measured peak, at any width
# (resnet18 batch 32: 115.8 vs 120.5 MB; resnet18-w0.25: 27.1 vs 28.1 MB): a device whose budget falls
# between the two is planned to train and refused by its client's measured first step.
UNDER_PREDICTED = [pytest.param("profl", {**POOL, "model": "resnet18-w0.25"}, id="profl-resnet18-w0.25-pool",
                                marks=pytest.mark.xfail(strict=True, reason="cost model under-predicts ProFL "
                                                        "step 1 of ResNet-18 by 4 %; node 2 is refused"))]
# The cost model's stated accuracy for a training step's peak memory (tests/test_cost.py:
# predicted / measured within 0.75-1.35; benchmarks/results/foundation.txt: 1.01-1.17 at batch 64).
# Submodels keeping under a quarter of the channels are over-predicted by more (measured here, CNN at
# batch 32: 1.36 at keep 0.19, 1.37 at keep 0.06; what does not scale with width weighs more): for
# those the test checks only that the prediction is safe (not below the measurement) and under 1.4.
PEAK_RATIO, NARROW_PEAK_RATIO, NARROW = (0.75, 1.35), (1.0, 1.4), 0.25
EXACT = ("model_params", "model_size_mb", "train_flops_per_sample", "predicted_peak_memory_mb", "fits_memory",
         "bytes_down", "bytes_up", "device_time_s")


@pytest.mark.parametrize("name,extra", [pytest.param(n, e, id=f"{n}-{'-'.join(e) or 'profiles'}") for n, e in CASES]
                         + UNDER_PREDICTED)
def test_plan_equals_the_run_it_predicts(tmp_path, name, extra):
    config = {**BASE, **extra}
    results = run_inprocess({**config, "strategy": name, "output-dir": str(tmp_path), "run-name": "run"}, 5)
    plan = make_plan(config, strategies=[name])
    strategy = plan.strategies[0]
    assert results["status"] == "completed" and strategy.error is None
    assert [d.to_dict() for d in plan.devices] == results["devices"]  # profiles, pooled memory, examples

    recorded = results["rounds"][0]
    summary = strategy.round_summary(1)
    assert (summary["bytes_down"], summary["bytes_up"]) == (recorded["bytes_down"], recorded["bytes_up"])
    assert summary["participants"] == recorded["participants"]
    for client in recorded["clients"]:
        task = strategy.task(client["node_id"])
        assert client["error"] is None
        assert client["participated"] == (task is not None), client
        if task is None:  # left out: the plan gives the strategy's own reason, or the resource short
            reason = strategy.absent[0][client["node_id"]]
            assert client["left_out"] in reason if client["left_out"] else ("memory: needs" in reason
                                                                            or "compute: needs" in reason)
            continue
        planned = task.to_dict()
        assert {k: client[k] for k in EXACT} == {k: planned[k] for k in EXACT}
        for key in ("keep_ratio", "depth", "active_block"):
            assert client.get(key) == task.info.get(key)
        # REFT's global pruning leaves some layers narrow at any level: the narrow tolerance.
        narrow = task.info.get("keep_ratio", 1.0) < NARROW or (name == "reft" and task.info["keep_ratio"] < 1.0)
        low, high = NARROW_PEAK_RATIO if narrow else PEAK_RATIO
        ratio = client["predicted_peak_memory_mb"] / client["peak_memory_mb"]
        assert low <= ratio < high, (client["profile"], task.info, ratio)


def test_bad_input_is_one_line_and_exit_2(capsys):
    assert_exit_2(capsys, ["--device-mix", "raspberry-pi-9:2"], "unknown device profile 'raspberry-pi-9'")
    # Nobody can train: VGG-16 at batch 512 exceeds every Pi's memory, under every strategy.
    assert_exit_2(capsys, ["--device-mix", "raspberry-pi-3b-plus:2", "--strategies", "exclusivefl,profl",
                           "--run-config", "model='vgg16' batch-size=512 memory-pool=''"], "no device of this mix can train")
    assert_exit_2(capsys, ["--strategies", "fedsgd"], "unknown fedsgd")
    assert_exit_2(capsys, ["--run-config", "batch-size=0"], "batch-size = 0")


def assert_exit_2(capsys, argv, expected):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and expected in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_cli_writes_json_and_figure_for_known_shapes_without_reading_images(tmp_path, capsys):
    assert main(["--strategies", "fedavg,exclusivefl", "--device-mix", "raspberry-pi-4:2,laptop",
                 "--run-config", "dataset='cifar100' num-server-rounds=2 emulated-deadline=60",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "known sizes, images not read" in out and "== exclusivefl" in out
    doc = json.loads((tmp_path / "plan.json").read_text())
    assert doc["dataset"]["num_classes"] == 100 and not doc["dataset"]["images_loaded"]
    assert [d["num_examples"] for d in doc["devices"]] == [16500, 16500, 16500]  # (50000 - 500 public) / 3
    fedavg = doc["strategies"]["fedavg"]
    assert len(fedavg["rounds"]) == 2 and fedavg["rounds"][0]["seconds_under_deadline"] == 60.0
    assert (tmp_path / "plan.png").stat().st_size > 0


@pytest.mark.parametrize("name", FOLD_FREE)
def test_strategies_planned_without_folding_plan_the_same_with_it(name):
    """FOLD_FREE strategies skip folding echo replies between planned rounds: it must change nothing
    (participants, sizes, bytes, times), also when fraction-train samples different nodes each round."""
    config = plan_config({**BASE, "num-server-rounds": 3, "fraction-train": 0.6})
    dataset, _ = plan_dataset(config)
    devices = plan_devices(config, dataset, 5)

    def rounds(fold):
        plan = plan_strategy(name, config, devices, dataset, fold=fold)
        return [[t.to_dict() for t in tasks] for tasks in plan.rounds]

    assert rounds(True) == rounds(False)


def test_a_left_out_reason_names_its_shortfall_once():
    """DepthFL's reason already names the memory that falls short; the plan does not repeat it."""
    plan = make_plan({"model": "cnn", "dataset": "synthetic", "num-server-rounds": 1, "max-client-examples": 64,
                      "memory-pool": "uniform-fraction:0.4-1.2"}, strategies=["depthfl"])
    [strategy] = plan.strategies
    reasons = [r for absent in strategy.absent for r in absent.values()]
    assert reasons and all(r.count("memory: needs") == 1 for r in reasons), reasons
