"""The ServerApp: query the devices, run the chosen strategy round by round, record everything.

One round (`run_round`): the strategy plans tasks -> tasks are sent and replies validated
(rounds.py), retried while too few are valid -> the strategy aggregates the valid updates ->
the global model is evaluated on the test set -> the round is recorded in results.json and
logged as one line.
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
from fl_app.data import Batches, DataError, Dataset, load_dataset
from fl_app.job import ERROR_MISSING_WEIGHTS
from fl_app.profiles import ProfileError
from fl_app.results import ResultsWriter
from fl_app.models import ModelSpec
from fl_app.training import check_input_size, evaluate
from fl_app.units import MB
from server_app.checkpoint import CHECKPOINT, CheckpointError, load_checkpoint, restore_rng, save_checkpoint
from server_app.pricing import planned_examples, price_task
from server_app.rounds import TaskOutcome, query_devices, run_train_tasks
from server_app.strategies import STRATEGIES
from server_app.strategies.base import Device, Federation, Strategy, StrategySetupError, TrainTask

app = ServerApp()



@app.main()
def main(grid: Grid, context: Context) -> None:
    try:  # everything a user can get wrong is checked here, before any training
        config = RunConfig.from_mapping(dict(context.run_config), strategies=STRATEGIES)
        folder = run_folder(config)
        checkpoint = load_checkpoint(folder, config) if config.resume else None
        if checkpoint is None:
            refuse_to_overwrite(folder)
        dataset = load_dataset(config.dataset, config.data_dir, config.seed)
        check_input_size(ModelSpec(config.model, dataset.num_classes, dataset.image_shape[0]), dataset.image_shape,
                         config.batch_size)  # a model and input size that cannot train together: refused here
        devices = discover_devices(grid, config)
        federation = Federation(config, devices, dataset, np.random.default_rng(config.seed))
        strategy = STRATEGIES[config.strategy](federation)
    except (ConfigError, CheckpointError, DataError, ProfileError, StrategySetupError, NoDevicesError) as exc:
        log(ERROR, "run stopped before training: %s", exc)
        raise
    first_round = 1
    device_list = [d.to_dict() for d in devices]
    if checkpoint is not None:
        strategy.load_state_dict(checkpoint["strategy"])
        restore_rng(checkpoint, federation.rng)
        first_round = checkpoint["round"] + 1
        checkpoint["results"].setdefault("resumed", []).append({"after_round": checkpoint["round"],
                                                                 "at": datetime.now().isoformat(timespec="seconds")})
        writer = ResultsWriter(folder, config.__dict__, device_list, doc=checkpoint["results"])
        log(INFO, "resuming %s after round %d from %s", folder.name, checkpoint["round"], folder / CHECKPOINT)
    else:
        writer = ResultsWriter(folder, config.__dict__, device_list)
    log(INFO, "%s on %d devices (%s); results in %s", strategy.name, len(devices),
        ", ".join(sorted({d.profile.name for d in devices})), writer.folder)
    test = _test_batches(dataset, config)
    try:
        for server_round in range(first_round, config.num_server_rounds + 1):
            writer.add_round(run_round(grid, strategy, federation, writer, server_round, test),
                             write=False)
            # Checkpoint first: results.json never shows a round the checkpoint lacks, so whoever
            # sees round r finished can resume after it. (A crash in between reruns round r.)
            save_checkpoint(folder, server_round, strategy.state_dict(), federation.rng, writer.doc)
            writer.write()
            log(INFO, progress_line(writer.rounds[-1], config.num_server_rounds))
    except RoundFailed as exc:
        log(ERROR, "run stopped: %s", exc)
        writer.finish(error=str(exc))
        raise
    except BaseException as exc:
        writer.finish(error=f"{type(exc).__name__}: {exc}")
        raise
    writer.finish()
    log(INFO, "done: final accuracy %s; results in %s", writer.doc["summary"].get("final_accuracy"),
        writer.folder / "results.json")


class NoDevicesError(RuntimeError):
    """Fewer nodes answered than the run needs."""


class RoundFailed(RuntimeError):
    """A round did not get `min-successful-clients` valid replies in any attempt; the run stops."""


def refuse_to_overwrite(folder: Path) -> None:
    if (folder / "results.json").exists():
        raise ConfigError(f"{folder} already holds the results of a run: set resume = true to continue it, "
                          "or choose another run-name (an empty run-name makes a new timestamped folder)")


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


def refresh_devices(grid: Grid, strategy: Strategy, federation: Federation, writer: ResultsWriter) -> None:
    """Track who is online; query nodes that joined since the last round and admit them to the strategy.

    A node that restarts comes back under a new node id: it is queried like any newcomer,
    and since it keeps nothing the strategy sends it everything it needs.
    """
    online = set(grid.get_node_ids())
    known = {d.node_id for d in federation.devices}
    new = sorted(online - known - federation.refused)
    if new:
        devices, problems = query_devices(grid, new, timeout=federation.config.round_timeout or 120.0)
        for problem in problems:
            log(WARNING, "a joining node was left out: %s", problem)
        federation.refused |= set(new) - {d.node_id for d in devices}
        for device in devices:
            federation.devices.append(device)
            strategy.admit(device)
            log(INFO, "node %d joined (partition %d, %s)", device.node_id, device.partition_id, device.profile.name)
        writer.set_devices([d.to_dict() for d in devices])
    left = federation.online - online
    if left:
        log(WARNING, "nodes %s are offline; they are skipped until they come back", sorted(left))
    federation.online = online & {d.node_id for d in federation.devices}


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


def run_round(grid: Grid, strategy: Strategy, federation: Federation, writer: ResultsWriter,
              server_round: int, test: Batches) -> dict[str, Any]:
    """One round: plan -> send -> validate (`collect_valid_replies`) -> aggregate -> evaluate -> record."""
    started = time.perf_counter()
    outcomes, spent, failed = collect_valid_replies(grid, strategy, federation, writer, server_round)
    extras = strategy.aggregate_train(server_round, [o.update for o in outcomes if o.update])
    accuracy, loss, _ = evaluate(strategy.global_model(), test)
    return round_record(federation, strategy, server_round, accuracy, loss, outcomes, spent, failed, extras,
                        time.perf_counter() - started)


def collect_valid_replies(grid: Grid, strategy: Strategy, federation: Federation, writer: ResultsWriter,
                          server_round: int) -> tuple[list[TaskOutcome], list[TaskOutcome], list[dict[str, Any]]]:
    """Plan, send and validate the round; retry it (`round-retries`) while fewer than
    `min-successful-clients` replies are valid. Returns (the accepted attempt's outcomes, the
    outcomes of failed attempts, a description of each failed attempt); raises RoundFailed.

    A failed attempt is never aggregated; its traffic still counts (it crossed the wire).
    """
    config = federation.config
    failed: list[dict[str, Any]] = []
    spent: list[TaskOutcome] = []
    for attempt in range(1, config.round_retries + 2):
        refresh_devices(grid, strategy, federation, writer)
        outcomes = run_tasks(grid, strategy, federation, server_round)
        succeeded = sum(1 for o in outcomes if o.update)
        if succeeded >= config.min_successful_clients:
            return outcomes, spent, failed
        failed.append({"attempt": attempt, "planned": len(outcomes), "succeeded": succeeded,
                       "errors": {str(o.task.node_id): o.error for o in outcomes if o.error}})
        spent += outcomes
        log(WARNING, "round %d attempt %d: %d of %d clients succeeded, min-successful-clients is %d%s",
            server_round, attempt, succeeded, len(outcomes), config.min_successful_clients,
            "; retrying" if attempt <= config.round_retries else "")
        if len(outcomes) < config.min_successful_clients and attempt <= config.round_retries:
            wait_for_nodes(grid, config.min_successful_clients)
    reasons = "; ".join(f"node {n}: {e}" for n, e in failed[-1]["errors"].items()) or "no node could be given work"
    raise RoundFailed(
        f"round {server_round}: fewer than min-successful-clients = {config.min_successful_clients} valid replies "
        f"in each of {len(failed)} attempts (last: {failed[-1]['succeeded']} of {failed[-1]['planned']}; {reasons}). "
        f"Rounds 1-{server_round - 1} are saved in {writer.folder}; fix or add nodes, or lower "
        f"min-successful-clients, then continue with resume = true and run-name = {writer.folder.name!r}")


def wait_for_nodes(grid: Grid, wanted: int, wait_s: float = 30.0) -> None:
    """Give nodes that dropped out a moment to come back before a retry."""
    deadline = time.monotonic() + wait_s
    while len(set(grid.get_node_ids())) < wanted and time.monotonic() < deadline:
        time.sleep(1.0)


def run_tasks(grid: Grid, strategy: Strategy, federation: Federation, server_round: int) -> list[TaskOutcome]:
    """Plan the round, send it, and resend to nodes that lack what they kept."""
    outcomes = send(grid, federation, strategy.configure_train(server_round))
    return resend_missing(grid, strategy, federation, outcomes)


def send(grid: Grid, federation: Federation, tasks: list[TrainTask]) -> list[TaskOutcome]:
    """Send tasks with the round deadline; a reply may not claim more examples than its node
    reported having, times the job's epochs."""
    for task in tasks:
        device = federation.device(task.node_id)
        task.max_examples = device.num_examples * task.job.train.epochs if device else None
    config = federation.config
    return run_train_tasks(grid, tasks, config.public_size, config.round_timeout or None)


def round_record(federation: Federation, strategy: Strategy, server_round: int, accuracy: float, loss: float,
                 outcomes: list[TaskOutcome], spent: list[TaskOutcome], failed: list[dict[str, Any]],
                 extras: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The round as results.json records it (traffic includes failed attempts: it crossed the wire).
    The strategy's `extras` may add keys but never replace one the loop writes."""
    by_node = {o.task.node_id: o for o in outcomes}
    clients = [client_record(federation, d, by_node.get(d.node_id), strategy.left_out.get(d.node_id))
               for d in federation.devices]
    every = outcomes + spent
    record = {"round": server_round, "accuracy": accuracy, "loss": loss,
              "bytes_down": sum(o.bytes_down for o in every), "bytes_up": sum(o.bytes_up for o in every),
              **traffic_by_kind(every), "participants": sum(c["participated"] for c in clients),
              "missed_deadline": sum(o.missed_deadline for o in outcomes),
              "rejected": sum(o.rejected for o in outcomes),
              "attempts": len(failed) + 1, "failed_attempts": failed,
              "offline": sorted(d.node_id for d in federation.devices if d.node_id not in federation.online),
              "seconds": seconds, "clients": clients}
    return with_extras(record, extras, f"{strategy.name}.aggregate_train")


def with_extras(record: dict[str, Any], extras: dict[str, Any], source: str) -> dict[str, Any]:
    """`record` plus a strategy's `extras`; a key the record already has is a bug in `source`."""
    clash = sorted(set(extras) & set(record))
    if clash:
        raise ValueError(f"{source} returned reserved result keys {clash}; rename them")
    return {**record, **extras}


def resend_missing(grid: Grid, strategy: Strategy, federation: Federation,
                   outcomes: list[TaskOutcome]) -> list[TaskOutcome]:
    """Once per round, give nodes that lost what they kept (a reboot, a new device) everything again."""
    retry = {o.task.node_id: strategy.resend(o.task) for o in outcomes if o.error_code == ERROR_MISSING_WEIGHTS}
    retry = {node: task for node, task in retry.items() if task is not None}
    if not retry:
        return outcomes
    log(INFO, "resending full weights to nodes %s, which lack what they kept", sorted(retry))
    second = {o.task.node_id: o for o in send(grid, federation, list(retry.values()))}
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
    update = outcome.update
    examples = update.num_examples if update else planned_examples(device, outcome.task.job)
    metrics = update.metrics if update else {}
    price = price_task(federation, device, outcome.task, examples, outcome.bytes_down, outcome.bytes_up)
    record.update({
        "participated": update is not None, "error": outcome.error,
        "model_params": price.model_params, "model_size_mb": price.model_size_mb,
        "train_flops_per_sample": price.train_flops_per_sample,
        "predicted_peak_memory_mb": price.predicted_peak_memory_mb,
        "peak_memory_mb": metrics.get("peak-memory-mb"),
        "fits_memory": price.fits_memory,
        "num_examples": examples if update else None, "train_loss": metrics.get("train-loss"),
        "bytes_down": outcome.bytes_down, "bytes_up": outcome.bytes_up,
        "device_time_s": price.device_time_s,
        "submodel_accuracy": metrics.get("test-accuracy"),
    })
    return with_extras(record, outcome.task.info, "the strategy's TrainTask.info")


def progress_line(r: dict[str, Any], total_rounds: int) -> str:
    failed = sum(1 for c in r["clients"] if c["error"])
    return (f"round {r['round']}/{total_rounds}  accuracy {r['accuracy']:.4f}  loss {r['loss']:.4f}  "
            f"down {r['bytes_down'] / MB:.2f} MB  up {r['bytes_up'] / MB:.2f} MB  "
            f"clients {r['participants']}/{len(r['clients'])} ({failed} failed)  {r['seconds']:.1f} s")


