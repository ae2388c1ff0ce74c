"""The ServerApp: query the devices, run the chosen strategy round by round, record everything.

One round: the strategy plans tasks -> tasks are sent and replies validated (rounds.py)
-> the strategy folds the valid updates -> the global model is evaluated on the test
set -> the round is appended to results.json and logged as one line.
"""

from __future__ import annotations

import time
from datetime import datetime
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fl_app.config import ConfigError, RunConfig
from fl_app.cost import device_time_s
from fl_app.data import Batches, DataError, Dataset, load_dataset
from fl_app.job import ERROR_MISSING_WEIGHTS
from fl_app.profiles import ProfileError
from fl_app.results import ResultsWriter
from fl_app.training import evaluate
from server_app.rounds import TaskOutcome, query_devices, run_train_tasks
from server_app.strategies import STRATEGIES
from server_app.strategies.base import Device, Federation, Strategy, StrategySetupError

app = ServerApp()

MB = 1e6  # traffic is reported in decimal megabytes, as bandwidth is


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:  # everything a user can get wrong is checked here, before any training
        config = RunConfig.from_mapping(dict(context.run_config))
        dataset = load_dataset(config.dataset, config.data_dir, config.seed)
        devices = discover_devices(grid, config)
        federation = Federation(config, devices, dataset, np.random.default_rng(config.seed))
        strategy = STRATEGIES[config.strategy](federation)
    except (ConfigError, DataError, ProfileError, StrategySetupError, NoDevicesError) as exc:
        log(ERROR, "run stopped before training: %s", exc)
        raise
    writer = ResultsWriter(run_folder(config), config.__dict__, [d.to_dict() for d in devices])
    log(INFO, "%s on %d devices (%s); results in %s", strategy.name, len(devices),
        ", ".join(sorted({d.profile.name for d in devices})), writer.folder)
    test = _test_batches(dataset, config)
    try:
        for server_round in range(1, config.num_server_rounds + 1):
            writer.add_round(run_round(grid, strategy, federation, server_round, test))
            log(INFO, progress_line(writer.rounds[-1], config.num_server_rounds))
    except BaseException as exc:
        writer.finish(error=f"{type(exc).__name__}: {exc}")
        raise
    writer.finish()
    log(INFO, "done: final accuracy %.4f; results in %s", writer.doc["summary"]["final_accuracy"],
        writer.folder / "results.json")


class NoDevicesError(RuntimeError):
    """Fewer nodes answered than the run needs."""


def discover_devices(grid: Grid, config: RunConfig, wait_s: float = 120.0) -> list[Device]:
    """Wait for `min-nodes` nodes, then query them all for their device reports."""
    deadline = time.monotonic() + wait_s
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < config.min_nodes and time.monotonic() < deadline:
        time.sleep(1.0)
        node_ids = list(grid.get_node_ids())
    devices, problems = query_devices(grid, node_ids, timeout=wait_s)
    for problem in problems:
        log(WARNING, "left out of the run: %s", problem)
    if len(devices) < config.min_nodes:
        raise NoDevicesError(f"only {len(devices)} nodes answered the device query, min-nodes is "
                           f"{config.min_nodes}: {'; '.join(problems) or 'no node connected'}")
    return devices


def run_folder(config: RunConfig) -> Path:
    name = config.run_name or f"{config.strategy}-{config.model}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(config.output_dir).expanduser().resolve() / name


def _test_batches(dataset: Dataset, config: RunConfig) -> Batches:
    """The test set, or a seeded random `test-size` subset of it (never its first rows: stored
    datasets are often sorted by class)."""
    n = len(dataset.y_test)
    idx = np.arange(n) if not config.test_size or config.test_size >= n else np.sort(
        np.random.default_rng(config.seed + 11).permutation(n)[:config.test_size])
    idx = torch.from_numpy(idx)
    return Batches(dataset.x_test[idx], dataset.y_test[idx], dataset, batch_size=256, shuffle=False)


def run_round(grid: Grid, strategy: Strategy, federation: Federation, server_round: int,
              test: Batches) -> dict[str, Any]:
    start = time.perf_counter()
    tasks = strategy.configure_train(server_round)
    outcomes = resend_missing(grid, strategy, run_train_tasks(grid, tasks, federation.config.public_size),
                              federation.config.public_size)
    extras = strategy.aggregate_train(server_round, [o.update for o in outcomes if o.update])
    accuracy, loss, _ = evaluate(strategy.global_model(), test)
    by_node = {o.task.node_id: o for o in outcomes}
    clients = [client_record(federation, d, by_node.get(d.node_id), strategy.left_out.get(d.node_id))
               for d in federation.devices]
    return {"round": server_round, "accuracy": accuracy, "loss": loss,
            "bytes_down": sum(o.bytes_down for o in outcomes), "bytes_up": sum(o.bytes_up for o in outcomes),
            **traffic_by_kind(outcomes), "participants": sum(c["participated"] for c in clients),
            "seconds": time.perf_counter() - start, **extras, "clients": clients}


def resend_missing(grid: Grid, strategy: Strategy, outcomes: list[TaskOutcome], public_size: int) -> list[TaskOutcome]:
    """Once per round, give nodes that lost what they kept (a reboot, a new device) everything again."""
    retry = {o.task.node_id: strategy.resend(o.task) for o in outcomes if o.error_code == ERROR_MISSING_WEIGHTS}
    retry = {node: task for node, task in retry.items() if task is not None}
    if not retry:
        return outcomes
    log(INFO, "resending full weights to nodes %s, which lack what they kept", sorted(retry))
    second = {o.task.node_id: o for o in run_train_tasks(grid, list(retry.values()), public_size)}
    merged = []
    for o in outcomes:
        again = second.get(o.task.node_id)
        if again is not None:  # both attempts crossed the wire
            again.bytes_down += o.bytes_down
            for name, size in o.bytes_down_by_record.items():
                again.bytes_down_by_record[name] = again.bytes_down_by_record.get(name, 0) + size
            o = again
        merged.append(o)
    return merged


def traffic_by_kind(outcomes: list[TaskOutcome]) -> dict[str, int]:
    """Bytes down and up split into model weights and logits (soft labels down, public logits up)."""
    def total(direction: str, records: tuple[str, ...]) -> int:
        return sum(getattr(o, f"bytes_{direction}_by_record").get(r, 0) for o in outcomes for r in records)

    return {"bytes_down_weights": total("down", ("weights",)), "bytes_down_logits": total("down", ("soft-labels",)),
            "bytes_up_weights": total("up", ("weights",)), "bytes_up_logits": total("up", ("logits",))}


def client_record(federation: Federation, device: Device, outcome: TaskOutcome | None,
                  left_out: str | None) -> dict[str, Any]:
    """What one device could afford and what it spent this round."""
    record: dict[str, Any] = {"node_id": device.node_id, "profile": device.profile.name,
                              "participated": False, "error": None, "left_out": left_out}
    if outcome is None:
        return record
    job = outcome.task.job
    cost = federation.job_cost(job)
    update = outcome.update
    examples = update.num_examples if update else device.num_examples * job.train.epochs
    metrics = update.metrics if update else {}
    public = federation.config.public_size
    distilled = job.distill_epochs * public if "soft-labels" in outcome.task.extra else 0
    forward_only = public if job.returns == "logits" else 0  # logits on the public slice
    train_flops = (cost.train_flops_per_sample * (examples + distilled)
                   + 2 * cost.forward_macs_per_sample * forward_only)
    record.update({
        "participated": update is not None, "error": outcome.error,
        "model_params": cost.params, "model_size_mb": cost.state_bytes / 2**20,
        "train_flops_per_sample": cost.train_flops_per_sample,
        "predicted_peak_memory_mb": federation.job_peak_memory_mb(job),
        "peak_memory_mb": metrics.get("peak-memory-mb"),
        "fits_memory": federation.job_peak_memory_mb(job) <= device.profile.memory_mb,
        "num_examples": examples if update else None, "train_loss": metrics.get("train-loss"),
        "bytes_down": outcome.bytes_down, "bytes_up": outcome.bytes_up,
        "device_time_s": device_time_s(device.profile, train_flops, outcome.bytes_down, outcome.bytes_up),
        "submodel_accuracy": metrics.get("test-accuracy"), **outcome.task.info,
    })
    return record


def progress_line(r: dict[str, Any], total_rounds: int) -> str:
    failed = sum(1 for c in r["clients"] if c["error"])
    return (f"round {r['round']}/{total_rounds}  accuracy {r['accuracy']:.4f}  loss {r['loss']:.4f}  "
            f"down {r['bytes_down'] / MB:.2f} MB  up {r['bytes_up'] / MB:.2f} MB  "
            f"clients {r['participants']}/{len(r['clients'])} ({failed} failed)  {r['seconds']:.1f} s")


