"""The ServerApp: query the devices, run the chosen strategy round by round, record everything.

One round (`run_round`): the strategy plans tasks for the nodes online (nodes offline in their
emulated availability are not) -> tasks are sent and replies validated (rounds.py) -> the virtual
clock (clock.py) settles when each reply arrives in emulated time, dropping late replies and
dropouts -> retried while too few are valid -> the strategy aggregates the valid updates -> the
global model is evaluated on the test set -> the round is appended to the results (fl_app.results)
and logged as one line.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import statistics
import time
import warnings
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import psutil
import torch
from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fl_app.aggregation import Aggregation
from fl_app.config import ConfigError, RunConfig, default_run_config
from fl_app.data import Batches, DataError, Dataset, evaluation_indices, federated_split, load_dataset
from fl_app.job import ERROR_MISSING_WEIGHTS
from fl_app.profiles import ProfileError
from fl_app.results import (RUN_FILES, OutputWriteError, ResultsWriter, check_writable, holds_no_round,
                            remove_stale_temporaries)
from fl_app.seeds import numpy_rng
from fl_app.models import ModelSpec
from fl_app.training import check_input_size, evaluate
from fl_app.units import MB, MIB
from server_app.clock import VirtualClock
from server_app.checkpoint import CHECKPOINT, CheckpointError, load_checkpoint, restore_rng, save_checkpoint
from server_app.pricing import planned_examples, price_task
from server_app.rounds import TaskOutcome, query_devices, run_train_tasks
from server_app.verify import agreed_partitions, check_partitions
from server_app.strategies import STRATEGIES
from server_app.strategies.base import ClientUpdate, Device, Federation, Strategy, StrategySetupError, TrainTask
from server_app.strategies.profl import ProFL
from server_app.trust import RootStepDiverged, label_refused, scored_updates

app = ServerApp()



@app.main()
def main(grid: Grid, context: Context) -> None:
    config: RunConfig | None = None
    devices: list[Device] = []
    try:  # everything a user can get wrong is checked here, before any training
        config = RunConfig.from_mapping(dict(context.run_config), strategies=STRATEGIES)
        folder = run_folder(config)
        checkpoint = resumable_checkpoint(folder, config)
        if checkpoint is None:
            refuse_to_overwrite(folder)
        check_writable(folder)  # a read-only or full output-dir stops here, not after the device query
        remove_stale_temporaries(folder, (*RUN_FILES, CHECKPOINT))  # of writes killed mid-way; the run owns the folder
        clock = VirtualClock.for_run(config, now_s=resumed_clock_s(checkpoint))
        dataset, data_warnings = load_dataset_noting_warnings(config)
        check_input_size(ModelSpec(config.model, dataset.num_classes, dataset.image_shape[0]), dataset.image_shape,
                         config.batch_size)  # a model and input size that cannot train together: refused here
        node_ids = wait_for_min_nodes(grid, config)
        check_split(dataset, config, len(node_ids))  # what the server can check itself, before asking any node
        # A slow node (an emulated Pi starts its ClientApp in minutes) gets the round deadline to answer.
        devices, refused = discover_devices(grid, config, node_ids, dataset, wait_s=max(120.0, config.round_timeout))
        federation = admit_devices(config, devices, dataset, refused)
        strategy = STRATEGIES[config.strategy](federation)
    except SETUP_ERRORS as exc:  # the user's to fix: one line, in the log and in results.json
        log(ERROR, "run stopped before training: %s", exc)
        record_stopped_before_training(context, config, devices, str(exc))
        # Raising is what marks the run failed; OneLineSetupErrors keeps Flower from adding a traceback.
        raise exc.with_traceback(None) from None
    except Exception as exc:  # a bug: the full traceback, and results.json still says the run failed
        record_stopped_before_training(context, config, devices, f"{type(exc).__name__}: {exc}")
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
    if data_warnings:  # what the loader read differently from the file (e.g. float labels as classes)
        writer.doc["warnings"] = data_warnings
        writer.write()
    log(INFO, "%s on %d devices (%s); results in %s", strategy.name, len(devices),
        ", ".join(sorted({d.profile.name for d in devices})), writer.folder)
    for line in device_table(federation, left_out_reasons(strategy, federation, first_round), strategy.name):
        log(INFO, line)
    unmatched = clock.unmatched_trace_keys(federation.devices + federation.idle)
    if unmatched:
        log(WARNING, "availability-trace keys %s name no node's partition id or profile here (profiles: %s); "
            "they are ignored", unmatched, ", ".join(sorted({d.profile.name for d in federation.devices})))
    test = _test_batches(dataset, config)
    try:
        for server_round in range(first_round, config.num_server_rounds + 1):
            writer.add_round(run_round(grid, strategy, federation, writer, server_round, test, clock),
                             write=False)
            # Checkpoint first: results.json never shows a round the checkpoint lacks, so whoever
            # sees round r finished can resume after it. (A crash in between reruns round r.)
            save_round(folder, server_round, strategy, federation, writer)
            log(INFO, progress_line(writer.rounds[-1], config.num_server_rounds))
    except (RoundFailed, OutputWriteError) as exc:
        log(ERROR, "run stopped: %s", exc)
        finish_results(writer, str(exc))
        raise exc.with_traceback(None) if isinstance(exc, OutputWriteError) else exc
    except BaseException as exc:
        finish_results(writer, f"{type(exc).__name__}: {exc}")
        raise
    writer.finish()
    if isinstance(strategy, ProFL):
        for line in blocks_instead(federation, writer.rounds):
            log(INFO, line)
    log(INFO, "done: final accuracy %s; results in %s", writer.doc["summary"].get("final_accuracy"),
        writer.folder / "results.json")


class NoDevicesError(RuntimeError):
    """Fewer usable nodes than the run needs; the message says why (not connected, errors, no data)."""


class RoundFailed(RuntimeError):
    """A round did not get `min-successful-clients` valid replies in any attempt; the run stops."""


SETUP_ERRORS = (ConfigError, CheckpointError, DataError, ProfileError, StrategySetupError, NoDevicesError,
                OutputWriteError)


class OneLineSetupErrors(logging.Filter):
    """Drops the traceback Flower logs with an exception that ended the ServerApp when that exception is a
    setup error: the user's to fix, already logged in one line that names the problem and the fix, and
    raised only so that Flower marks the run failed. A bug (any other exception) keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], SETUP_ERRORS):
            record.exc_info, record.exc_text = None, None
            record.msg = f"{record.msg} (the run-stopped line above says why)"
        return True


# Flower's `log` writes through the "flwr" logger in the ServerApp's process, simulation or deployment.
logging.getLogger("flwr").addFilter(OneLineSetupErrors())


def resumed_clock_s(checkpoint: dict[str, Any] | None) -> float:
    """The emulated clock where a resumed run stopped (0 for a new run)."""
    rounds = checkpoint["results"].get("rounds", []) if checkpoint else []
    return float(rounds[-1].get("emulated_clock_s", 0.0)) if rounds else 0.0


def save_round(folder: Path, server_round: int, strategy: Strategy, federation: Federation,
               writer: ResultsWriter) -> None:
    """Write the checkpoint after `server_round`, then the results that show it. A checkpoint that
    cannot be written (a full disk) withdraws the round from the results, which then end at the last
    checkpointed round; either failure is an OutputWriteError saying how to continue."""
    try:
        save_checkpoint(folder, server_round, strategy.state_dict(), federation.rng, writer.doc)
    except OSError as exc:
        writer.discard_last_round()
        raise OutputWriteError(f"round {server_round}: cannot write {folder / CHECKPOINT} ({exc.strerror or exc}); "
                               f"{_continue_hint(folder, server_round - 1)}") from None
    try:
        writer.write()
    except OSError as exc:  # the checkpoint holds round r with its results: resuming rewrites them
        raise OutputWriteError(f"round {server_round}: checkpointed, but the results in {folder} cannot be written "
                               f"({exc.strerror or exc}); {_continue_hint(folder, server_round)}") from None


def _continue_hint(folder: Path, saved: int) -> str:
    kept = f"rounds 1-{saved} are saved" if saved else "no round was saved"
    return (f"{kept}; free space or fix {folder.parent}, then continue with resume = true and "
            f"run-name = {folder.name!r}")


def load_dataset_noting_warnings(config: RunConfig) -> tuple[Dataset, list[str]]:
    """The run's dataset and what its loader warned about (labels read as classes, files skipped,
    classes missing from a split): each warning logged once and returned for results.json."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = load_dataset(config.dataset, config.data_dir, config.seed)
    notes = list(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)))
    for note in notes:
        log(WARNING, "data: %s", note)
    return dataset, notes


def finish_results(writer: ResultsWriter, error: str) -> None:
    """Record the run's error in results.json; when the disk refuses even that, say so in the log
    (the last results written and the checkpoint stay as they were)."""
    try:
        writer.finish(error=error)
    except OSError as exc:
        log(WARNING, "results.json in %s not updated with the error (%s)", writer.folder, exc.strerror or exc)


def resumable_checkpoint(folder: Path, config: RunConfig) -> dict[str, Any] | None:
    """The checkpoint `resume = true` continues from; None for a new run, and for a folder that holds
    no completed round and no checkpoint (`holds_no_round`), which `resume = true` starts afresh."""
    if not config.resume:
        return None
    if holds_no_round(folder, CHECKPOINT):
        log(WARNING, "resume = true, but %s holds no checkpoint and no completed round: starting the run from "
            "round 1", folder)
        return None
    return load_checkpoint(folder, config)


def refuse_to_overwrite(folder: Path) -> None:
    """A folder that holds the results of a run is never reused (a run that stopped before or during
    its first round left none: its results.json says only that and why, and a corrected run may take
    its place)."""
    if holds_results_of_a_run(folder):
        raise ConfigError(f"{folder} already holds the results of a run: set resume = true to continue it, "
                          "or choose another run-name (an empty run-name makes a new timestamped folder)")


def holds_results_of_a_run(folder: Path) -> bool:
    """Whether `folder` holds rounds of a run or its checkpoint: not a folder whose results.json says only
    that a run stopped before training, or before its first round was saved."""
    return (folder / "results.json").exists() and not (_stopped_before_training(folder)
                                                       or holds_no_round(folder, CHECKPOINT))


def _stopped_before_training(folder: Path) -> bool:
    try:
        return json.loads((folder / "results.json").read_text()).get("stopped_before_training") is True
    except (OSError, ValueError, AttributeError):
        return False


def record_stopped_before_training(context: Context, config: RunConfig | None, devices: list[Device],
                                   error: str) -> None:
    """results.json with status "failed", the error, the config and the devices known by then, in the
    run folder; never over the results of a run (`refuse_to_overwrite`'s rule). A config that could not
    be parsed is recorded as given, in the folder its output-dir and run-name name."""
    raw = dict(context.run_config)
    folder = run_folder(config) if config is not None else _raw_run_folder(raw)
    if folder is None:
        log(WARNING, "no results.json written: output-dir and run-name cannot be read from the run config")
        return
    if holds_results_of_a_run(folder):
        return
    try:
        ResultsWriter.stopped_before_training(folder, config.__dict__ if config is not None else raw,
                                              [d.to_dict() for d in devices], error)
    except OSError as exc:
        log(WARNING, "no results.json written in %s: %s", folder, exc)


def _raw_run_folder(raw: dict[str, Any]) -> Path | None:
    """The run folder named by a run config that did not validate (None if it names none)."""
    merged = {**default_run_config(), **raw}
    parts = [merged.get(k) for k in ("output-dir", "run-name", "strategy", "model")]
    if not all(isinstance(p, str) for p in parts):
        return None
    output_dir, name, strategy, model = parts
    name = name or f"{strategy}-{model}-{datetime.now():%Y%m%d-%H%M%S}"
    if "/" in name or name.startswith(".") or not output_dir:
        return None
    return Path(output_dir).expanduser().resolve() / name


def wait_for_min_nodes(grid: Grid, config: RunConfig, wait_s: float = 120.0) -> list[int]:
    """The connected nodes, once `min-nodes` are (or after `wait_s` seconds)."""
    deadline = time.monotonic() + wait_s
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < config.min_nodes and time.monotonic() < deadline:
        time.sleep(1.0)
        node_ids = list(grid.get_node_ids())
    return node_ids


def check_split(dataset: Dataset, config: RunConfig, num_nodes: int) -> None:
    """Refuse, before any node is asked, a federated split that cannot be made: a public-size the
    training set cannot spare, more partitions than private examples, a dirichlet-alpha that leaves
    nodes without data. Every party derives the split alike from the run config (fl_app.data), so the
    server computes it for one partition per connected node, as simulation gives them (a deployment
    sets num-partitions on each node: the same count when every node is connected)."""
    if num_nodes:
        federated_split(dataset, num_nodes, config.partition, config.seed, config.dirichlet_alpha,
                        config.shards_per_client, config.public_size, config.max_client_examples)


def discover_devices(grid: Grid, config: RunConfig, node_ids: list[int], dataset: Dataset,
                     wait_s: float = 120.0) -> tuple[list[Device], set[int]]:
    """Query the connected nodes for their device reports and hold them to the split the server derives
    itself (`server_app.verify.check_partitions`): (devices, the nodes that answered with errors or
    failed the check, never asked again). Identical problems of many nodes are one line; when fewer than
    `min-nodes` remain, NoDevicesError says how many answered, how many answered with errors (and
    which, grouped) and how many did not answer."""
    devices, problems = query_devices(grid, node_ids, timeout=wait_s)
    agreed = agreed_partitions(devices, len(node_ids))
    devices, wrong = check_partitions(devices, agreed, dataset, config)
    problems += wrong
    if len(devices) >= config.min_nodes:
        for line in group_problems(problems):
            log(WARNING, "left out of the run: %s", line)
        return devices, {node for node, _ in problems}
    n, silent = len(node_ids), len(node_ids) - len(devices) - len(problems)
    if not node_ids:
        head = f"no node connected within {wait_s:g} s"
    elif problems and not devices and not silent:
        head = f"all {n} nodes answered the device query with errors"
    else:
        head = (f"{len(devices)} of {n} connected nodes reported their device"
                + (f", {len(problems)} answered with errors" if problems else "")
                + (f", {silent} did not answer within {wait_s:g} s" if silent else ""))
    fix = ("" if problems else
           "; start more SuperNodes (or check that they reach this SuperLink), or lower min-nodes")
    raise NoDevicesError(f"{head}; min-nodes is {config.min_nodes}{fix}"
                         + "".join(f"; {line}" for line in group_problems(problems)))


def group_problems(problems: list[tuple[int, str]]) -> list[str]:
    """One line per distinct problem, in first-seen order: "node 3: <reason>", or for many nodes
    "20 nodes (1, 2, 3, ...): <reason>"."""
    nodes: dict[str, list[int]] = {}
    for node, reason in problems:
        nodes.setdefault(reason, []).append(node)
    return [f"node {ids[0]}: {reason}" if len(ids) == 1 else f"{len(ids)} nodes ({_few_ids(ids)}): {reason}"
            for reason, ids in nodes.items()]


def _few_ids(ids: list[int], limit: int = 3) -> str:
    ids = sorted(ids)
    return ", ".join(map(str, ids[:limit])) + (", ..." if len(ids) > limit else "")


def no_data_reason(config: RunConfig) -> str:
    """Why a node that reported no training examples is left out, with what would give it some."""
    fix = {"shards": "lower shards-per-client, use fewer nodes, or partition = 'iid'",
           "dirichlet": "raise dirichlet-alpha, use fewer nodes, or partition = 'iid'"}.get(
        config.partition, "use fewer nodes or a larger training set")
    return f"holds no training data (0 examples in its partition of the {config.partition} split): {fix}"


def admit_devices(config: RunConfig, devices: list[Device], dataset: Dataset, refused: set[int]) -> Federation:
    """The federation of the devices that hold training data; the others are kept in `idle`: recorded
    every round as left out, never planned for, sent a task, or counted as rejected. `refused`: nodes
    whose device query failed (not asked again)."""
    with_data = [d for d in devices if d.num_examples > 0]
    if not with_data:
        raise NoDevicesError(f"none of the {len(devices)} nodes holds training data; {no_data_reason(config)}")
    return Federation(config, with_data, dataset, numpy_rng(config.seed), refused=set(refused),
                      idle=[d for d in devices if d.num_examples <= 0])


def refresh_devices(grid: Grid, strategy: Strategy, federation: Federation, writer: ResultsWriter) -> None:
    """Track who is online; query nodes that joined since the last round and admit them to the strategy.

    A node that restarts comes back under a new node id: it is queried like any newcomer,
    and since it keeps nothing the strategy sends it everything it needs.
    """
    online = set(grid.get_node_ids())
    known = {d.node_id for d in federation.devices + federation.idle}
    new = sorted(online - known - federation.refused)
    if new:
        devices, problems = query_devices(grid, new, timeout=federation.config.round_timeout or 120.0)
        admitted = federation.devices + federation.idle
        devices, wrong = check_partitions(
            devices, agreed_partitions(admitted, len(online)), federation.dataset, federation.config,
            held={d.partition_id: d.node_id for d in admitted if d.node_id in online})
        problems += wrong
        for line in group_problems(problems):
            log(WARNING, "a joining node was left out: %s", line)
        federation.refused |= set(new) - {d.node_id for d in devices}
        for device in devices:
            if device.num_examples <= 0:
                federation.idle.append(device)
                log(WARNING, "node %d joined but %s", device.node_id, no_data_reason(federation.config))
                continue
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
    """The run's evaluation set (`fl_app.data.evaluation_indices`): the test set, or a seeded random
    `test-size` subset of it, the one the nodes' test shares split."""
    idx = torch.from_numpy(evaluation_indices(len(dataset.y_test), config.test_size, config.seed))
    return Batches(dataset.x_test[idx], dataset.y_test[idx], dataset, batch_size=256, shuffle=False)


def run_round(grid: Grid, strategy: Strategy, federation: Federation, writer: ResultsWriter,
              server_round: int, test: Batches, clock: VirtualClock) -> dict[str, Any]:
    """One round: plan -> send -> validate (`collect_valid_replies`, on the virtual clock) -> aggregate
    -> evaluate -> record."""
    started, started_cpu = time.perf_counter(), time.thread_time()
    round_start_s = clock.now_s
    outcomes, spent, failed, unavailable = collect_valid_replies(grid, strategy, federation, writer, server_round,
                                                                 clock)
    left_out = left_out_reasons(strategy, federation, server_round) | unavailable  # before ProFL moves on
    updates, trust = [o.update for o in outcomes if o.update], None
    if Aggregation.parse(federation.config.aggregation).trust:  # FLTrust: scored against the server's own step
        try:
            updates, trust = scored_updates(strategy, federation, {o.task.node_id: o.task for o in outcomes},
                                            updates)
        except RootStepDiverged as exc:
            raise RoundFailed(f"{exc}. Rounds 1-{server_round - 1} are saved in {writer.folder}; lower lr, then "
                              "continue with resume = true") from None
    extras, accuracy, loss, refused = aggregate_safely(strategy, server_round, updates, test)
    record = round_record(federation, strategy, server_round, accuracy, loss, outcomes, spent, failed, extras,
                          time.perf_counter() - started, unavailable)
    record["aggregate_refused"] = refused
    record["trust"] = trust  # node id -> FLTrust score in [0, 1]; None without fltrust
    record["label_refused"] = label_refused(updates)  # fltrust:labels: node id -> {change, standard_error}
    if refused and not refused["outlier_norm_ratio"] > STANDS_OUT:  # no attacker to blame: the training itself
        raise RoundFailed(f"round {server_round}: the aggregate of the valid replies is unsound ({refused['reason']}) "
                          f"and no update stands out (the largest norm is {refused['outlier_norm_ratio']:.3g} x the "
                          f"median): training diverged; lower lr (it is {federation.config.lr:g}). Rounds "
                          f"1-{server_round - 1} are saved in {writer.folder}; continue with resume = true")
    record.update(emulated_round_s=clock.now_s - round_start_s, emulated_clock_s=clock.now_s,
                  left_out_by_kind=left_out_by_kind(left_out.values()),
                  server_rss_mb=psutil.Process().memory_info().rss / MIB,  # the ServerApp's memory now
                  # CPU seconds of this thread, the ServerApp's own work: in simulation Flower's engine
                  # runs in the same process, and `seconds` (wall) includes it and the clients' training.
                  server_cpu_s=time.thread_time() - started_cpu)
    return record


STANDS_OUT = 100.0  # an update whose norm is this many times the median's is an outlier, not a diverging lr


def aggregate_safely(strategy: Strategy, server_round: int, updates: list[ClientUpdate], test: Batches
                     ) -> tuple[dict[str, Any], float | None, float | None, dict[str, Any] | None]:
    """Aggregate and evaluate; an aggregate that is not sound (`unsound_model`) is never adopted: the
    strategy's state before the round is restored and the refusal names why and the update that
    stands out most (`outlier`). Returns (the strategy's extras, test accuracy, test loss, the refusal
    or None). The honest nodes are never blamed: the next round starts from the last sound model."""
    before = copy.deepcopy(strategy.state_dict())  # deep: strategies load new values into the same tensors
    extras = strategy.aggregate_train(server_round, updates)
    model = strategy.global_model()  # built once: evaluated, then checked
    accuracy, loss, _ = evaluate(model, test)
    problem = unsound_model(model, loss)
    if problem is None:
        return extras, accuracy, loss, None
    strategy.load_state_dict(before)
    accuracy, loss, _ = evaluate(strategy.global_model(), test)
    node, ratio = outlier(updates)
    log(WARNING, "round %d: the aggregate was not adopted (%s); the update of node %s stands out (norm %.3g x the "
        "median); the previous model is kept", server_round, problem, node, ratio)
    return extras, accuracy, loss, {"reason": problem, "outlier_node": node, "outlier_norm_ratio": ratio}


def unsound_model(model: torch.nn.Module, test_loss: float | None) -> str | None:
    """Why a model must not be adopted (None: it may): a float value that is not finite, or finite
    weights so large that its outputs overflow (a non-finite test loss)."""
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not bool(t.isfinite().all())]
    if bad:
        return f"non-finite values in {len(bad)} tensors (e.g. {bad[0]})"
    if test_loss is not None and not math.isfinite(test_loss):
        return f"its test loss is {test_loss}: its outputs overflow"
    return None


def outlier(updates: list[ClientUpdate]) -> tuple[int | None, float]:
    """(the node whose update has the largest norm, that norm over the median of all updates' norms),
    in float64 so that huge values cannot overflow; (None, nan) without updates."""
    if not updates:
        return None, math.nan
    norms = [math.sqrt(sum(float(t.double().square().sum()) for t in u.tensors.values() if t.is_floating_point()))
             for u in updates]
    largest = max(range(len(updates)), key=norms.__getitem__)
    median = statistics.median(norms)
    return updates[largest].node_id, norms[largest] / median if median > 0 else math.inf


def collect_valid_replies(grid: Grid, strategy: Strategy, federation: Federation, writer: ResultsWriter,
                          server_round: int, clock: VirtualClock
                          ) -> tuple[list[TaskOutcome], list[TaskOutcome], list[dict[str, Any]], dict[int, str]]:
    """Plan, send and validate the round, each attempt settled on the virtual clock (emulated deadline,
    dropouts); retry it (`round-retries`) while fewer than `min-successful-clients` replies are valid.
    Returns (the accepted attempt's outcomes, the outcomes of failed attempts, a description of each
    failed attempt, node -> why it was unavailable at the accepted attempt's start); raises RoundFailed.

    A failed attempt is never aggregated; its traffic still counts (it crossed the wire).
    """
    config = federation.config
    failed: list[dict[str, Any]] = []
    spent: list[TaskOutcome] = []
    for attempt in range(1, config.round_retries + 2):
        refresh_devices(grid, strategy, federation, writer)
        unavailable = {node: f"offline at emulated t = {clock.now_s:.1f} s (availability model)"
                       for node in clock.offline_now([d for d in federation.devices if d.node_id in federation.online])}
        federation.online -= set(unavailable)
        outcomes = run_tasks(grid, strategy, federation, server_round)
        clock.advance(federation, outcomes)
        succeeded = sum(1 for o in outcomes if o.update)
        if succeeded >= config.min_successful_clients:
            return outcomes, spent, failed, unavailable
        failed.append({"attempt": attempt, "planned": len(outcomes), "succeeded": succeeded,
                       "errors": {str(o.task.node_id): o.error for o in outcomes if o.error}})
        spent += outcomes
        log(WARNING, "round %d attempt %d: %d of %d clients succeeded, min-successful-clients is %d%s",
            server_round, attempt, succeeded, len(outcomes), config.min_successful_clients,
            "; retrying" if attempt <= config.round_retries else "")
        if len(outcomes) < config.min_successful_clients and attempt <= config.round_retries:
            wait_for_nodes(grid, config.min_successful_clients)
    errors = list(failed[-1]["errors"].values())
    reasons = "; ".join(f"node {n}: {e}" for n, e in failed[-1]["errors"].items()) or "no node could be given work"
    raise RoundFailed(
        f"round {server_round}: fewer than min-successful-clients = {config.min_successful_clients} valid replies "
        f"in each of {len(failed)} attempts (last: {failed[-1]['succeeded']} of {failed[-1]['planned']}; {reasons}). "
        f"Rounds 1-{server_round - 1} are saved in {writer.folder}; {round_failure_advice(errors, config)}, "
        f"then continue with resume = true and run-name = {writer.folder.name!r}")


def round_failure_advice(errors: list[str], config: RunConfig) -> str:
    """What would let a failed round succeed: when every reply was non-finite, training diverged and only a
    lower learning rate helps (more nodes would diverge too); otherwise fix or add nodes."""
    if errors and all("NaN or Inf" in e or "training diverged" in e for e in errors):
        return f"local training diverged on every node; lower lr (it is {config.lr:g})"
    return "fix or add nodes, or lower min-successful-clients"


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
                 extras: dict[str, Any], seconds: float, unavailable: dict[int, str]) -> dict[str, Any]:
    """The round as results.json records it (traffic includes failed attempts: it crossed the wire).
    The strategy's `extras` may add keys but never replace one the loop writes."""
    by_node = {o.task.node_id: o for o in outcomes}
    clients = [client_record(federation, d, by_node.get(d.node_id),
                             strategy.left_out.get(d.node_id) or unavailable.get(d.node_id))
               for d in federation.devices]
    clients += [client_record(federation, d, None, no_data_reason(federation.config)) for d in federation.idle]
    every = outcomes + spent
    record = {"round": server_round, "accuracy": accuracy, "loss": loss,
              "bytes_down": sum(o.bytes_down for o in every), "bytes_up": sum(o.bytes_up for o in every),
              **traffic_by_kind(every), "participants": sum(c["participated"] for c in clients),
              "missed_deadline": sum(o.missed_deadline for o in outcomes),
              "dropped_out": sum(o.dropped_out for o in outcomes),
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
    # Priced once: by the clock when a reply arrived (its emulated arrival), else here for a task that
    # got no reply (an error, a real timeout).
    price = outcome.price or price_task(federation, device, outcome.task, examples, outcome.bytes_down,
                                        outcome.bytes_up)
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
    """The round in one console line: accuracy, traffic, who took part, who was left out by what
    (`left_out_by_kind`), who missed the deadline or dropped out, who failed, wall seconds, the virtual
    clock, and for ProFL the stage and block it trained."""
    missed, dropped = r.get("missed_deadline", 0), r.get("dropped_out", 0)
    failed = sum(1 for c in r["clients"] if c["error"]) - missed - dropped
    late = (f"{missed} missed the deadline; " if missed else "") + (f"{dropped} dropped out; " if dropped else "")
    kinds = r.get("left_out_by_kind") or {}
    left = (f"{sum(kinds.values())} left out: {', '.join(f'{k} {n}' for k, n in kinds.items())}; "
            if kinds else "")
    step = (f"  profl {r['stage']} block {r['active_block']}{' mimic' if r.get('step') == 'mimic' else ''}"
            if "stage" in r and "active_block" in r else "")
    if r.get("stage") == "shrink" and r.get("evaluated"):
        step += f" (evaluated: {r['evaluated']})"
    return (f"round {r['round']}/{total_rounds}  accuracy {_figure(r['accuracy'])}  loss {_figure(r['loss'])}  "
            f"down {r['bytes_down'] / MB:.2f} MB  up {r['bytes_up'] / MB:.2f} MB  "
            f"clients {r['participants']}/{len(r['clients'])} ({left}{late}{failed} failed)  {r['seconds']:.1f} s"
            + (f"  emulated {r['emulated_clock_s']:.1f} s" if "emulated_clock_s" in r else "") + step)


def blocks_instead(federation: Federation, rounds: list[dict[str, Any]]) -> list[str]:
    """ProFL's point, said at the end of a run: which devices cannot train the full model (its
    `Federation.shortfall`) and which blocks each of them trained instead, from the rounds' records."""
    full = federation.cost(federation.full_spec())
    short = {d.node_id: federation.shortfall(full, d) for d in federation.devices}
    trained: dict[int, set[int]] = {node: set() for node in short}
    for r in rounds:
        for c in r["clients"]:
            if c["participated"] and c["error"] is None and c["node_id"] in trained and "active_block" in r:
                trained[c["node_id"]].add(r["active_block"])
    cannot = [node for node, reason in short.items() if reason]
    if not cannot:
        return [f"profl: every device could train the full model as well ({len(short)} devices)"]
    kinds = left_out_by_kind(short[node] for node in cannot)
    helped = [node for node in cannot if trained[node]]
    profile = {d.node_id: d.profile.name for d in federation.devices}
    return [f"profl: {len(cannot)} of {len(short)} devices cannot train the full model "
            f"({', '.join(f'{k} {n}' for k, n in kinds.items())}); {len(helped)} of them trained blocks instead:",
            *(f"  node {node} ({profile[node]}): block{'s' if len(trained[node]) > 1 else ''} "
              f"{', '.join(map(str, sorted(trained[node])))}" for node in helped)]


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def left_out_reasons(strategy: Strategy, federation: Federation, server_round: int) -> dict[int, str]:
    """Node -> why it can get no work in `server_round`: it holds no data, the strategy left it out
    (`Strategy.left_out`), or, for ProFL, its budget does not fit the round's step."""
    reasons = {d.node_id: no_data_reason(federation.config) for d in federation.idle}
    known = {d.node_id for d in federation.devices}
    reasons |= {node: reason for node, reason in strategy.left_out.items() if node in known}
    if isinstance(strategy, ProFL):
        step = strategy.step
        job = strategy.job(server_round, step)
        for d in federation.devices:
            shortfall = None if d.node_id in reasons else federation.job_shortfall(job, d)
            if shortfall:
                reasons[d.node_id] = f"does not fit step {step.stage} {step.block} {step.kind}: {shortfall}"
    return reasons


def left_out_kind(reason: str) -> str:
    """What a left-out reason says falls short: "memory", "deadline", "no data", "offline" (availability
    model), or "other"."""
    if reason.startswith("holds no training data"):
        return "no data"
    if reason.startswith("offline at emulated"):
        return "offline"
    match = re.search(r"\b(memory|deadline): ", reason)  # Federation.shortfall's wording
    return match.group(1) if match else "other"


def left_out_by_kind(reasons: Iterable[str]) -> dict[str, int]:
    """How many were left out by each kind of reason, the most frequent first."""
    return dict(Counter(left_out_kind(r) for r in reasons).most_common())


def device_table(federation: Federation, left_out: dict[int, str], strategy_name: str) -> list[str]:
    """The devices once, at the start: per profile the count, GFLOPS, memory budget range (memory-pool
    budgets vary per node) and how many the strategy leaves out by what; then the grouped reasons,
    each with one node's full text (it names the key that relaxes it)."""
    everyone = federation.devices + federation.idle
    profiles: dict[str, list[Device]] = {}
    for d in everyone:
        profiles.setdefault(d.profile.name, []).append(d)
    width = max(len(name) for name in profiles)
    lines = []
    for name, group in profiles.items():
        gflops = sorted({d.profile.gflops for d in group})
        memory = sorted(d.profile.memory_mb for d in group)
        kinds = left_out_by_kind(left_out[d.node_id] for d in group if d.node_id in left_out)
        lines.append(f"  {name:<{width}}  x{len(group):<3} "
                     f"{_span(gflops, '{:g}')} GFLOPS  memory {_span(memory, '{:.0f}')} MB  "
                     + (f"left out {sum(kinds.values())} ({', '.join(kinds)})" if kinds else "eligible"))
    if left_out:
        examples: dict[str, tuple[int, str]] = {}
        for node, reason in left_out.items():
            examples.setdefault(left_out_kind(reason), (node, reason))
        kinds = left_out_by_kind(left_out.values())
        lines.append(f"{strategy_name} leaves out {len(left_out)} of {len(everyone)} devices: "
                     + "; ".join(f"{kind} {count} (e.g. node {examples[kind][0]}: {examples[kind][1]})"
                                 for kind, count in kinds.items()))
    return lines


def _span(values: list[float], fmt: str) -> str:
    low, high = fmt.format(min(values)), fmt.format(max(values))
    return low if low == high else f"{low}-{high}"


