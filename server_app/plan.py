"""Plan before you train: what each strategy would do with a run configuration and a device mix.

    python -m server_app.plan [--run-config "key=value key2='text'"] [--device-mix MIX] [--nodes N]
                              [--measure] [--strategies a,b] [--load-data] [--out DIR]

Nothing trains. The planner builds the devices the way simulated nodes get theirs (profile from
`device-mix` by partition id, memory from `memory-pool`, examples from the federated split), the
`Federation` and strategy objects the ServerApp builds, and calls each strategy's real
`configure_train` round after round. Every planned task is priced by `server_app.pricing.price_task`,
the function the round loop records clients with, and its message and reply are sized as the wire
serializes them (`server_app.rounds.task_content`, `fl_app.wire`). Between rounds the strategy folds
"echo" replies (what each node was sent, every float nudged by the same small step) with the
server's own distillation off: no training anywhere, and ProFL's effective movement stays high,
so each of its blocks grows for its cap (`growth_cap`: an even share of the rounds left, at most
`block-round-cap` when set), the longest schedule.

Known datasets (mnist, fashion-mnist, cifar10, cifar100) are planned from their shapes and sizes
without reading images, unless `--load-data` or partition = dirichlet (whose split needs the labels).
Traffic is in decimal MB (10^6 bytes), memory in MB of 2^20 bytes, time in seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fl_app.config import ConfigError, RunConfig, default_run_config
from fl_app.cost import full_training_peak_mb
from fl_app.data import DataError, Dataset, evaluation_indices, federated_split, load_dataset
from fl_app.job import train_report
from fl_app.models import ModelSpec
from fl_app.profiles import DeviceProfile, ProfileError, parse_device_mix, pooled_profile, profile_for_partition
from fl_app.seeds import numpy_rng
from fl_app.training import check_input_size
from fl_app.units import MB
from fl_app.wire import encode, serialized_bytes
from server_app.clock import VirtualClock
from server_app.pricing import TaskPrice, planned_examples, price_task
from server_app.rounds import expected_tensors, task_content
from server_app.strategies import STRATEGIES
from server_app.strategies.base import ClientUpdate, Device, Federation, Strategy, StrategySetupError, TrainTask
from server_app.strategies.profl import ProFL, Step

# Shapes and sizes of the named datasets (torchvision's splits): planned without reading images.
KNOWN_DATASETS: dict[str, tuple[tuple[int, int, int], int, int, int]] = {
    "mnist": ((1, 28, 28), 10, 60_000, 10_000),
    "fashion-mnist": ((1, 28, 28), 10, 60_000, 10_000),
    "cifar10": ((3, 32, 32), 10, 50_000, 10_000),
    "cifar100": ((3, 32, 32), 100, 50_000, 10_000),
}
ECHO_STEP = 1e-4  # what every float of an echo reply moves by: steady movement, ProFL's EM stays at 1
# Strategies whose planned tasks depend only on the round number, never on what aggregate_train folds
# (the values of weights never change a message's size): their later rounds are planned without
# folding echo replies, which for ResNet-18 costs far more than planning (tests/test_plan.py checks
# that folding would change nothing). Any other strategy, and any new one, is folded.
FOLD_FREE = ("fedavg", "exclusivefl", "allsmall", "heterofl", "fedrolex", "depthfl")
_KIND = re.compile(r"\b(memory|deadline): needs")


class PlanError(ValueError):
    """Input the planner cannot plan for; the message is one line that says what to change."""


# --- what is planned for: config, data, devices ----------------------------------------------


def plan_config(overrides: Mapping[str, Any], strategy: str | None = None) -> RunConfig:
    """The validated run config: pyproject defaults, then `overrides` (as `flwr run --run-config`)."""
    values = {**default_run_config(), **overrides}
    if strategy is not None:
        values["strategy"] = strategy
    config = RunConfig.from_mapping(values, strategies=STRATEGIES)
    # Checked as the run checks it; the plan itself assumes every node online (availability is not planned).
    VirtualClock.for_run(config)
    return config


def shape_only_dataset(image_shape: tuple[int, int, int], num_classes: int, num_train: int,
                       num_test: int) -> Dataset:
    """A dataset with the real one's image shape, class count and split sizes, and no images: the
    images are on the meta device (no memory), the labels all 0. Partition sizes under `iid` and
    `shards` do not depend on the labels, so the planned examples per node are exact."""
    c = image_shape[0]
    return Dataset(torch.empty((num_train, *image_shape), dtype=torch.uint8, device="meta"),
                   torch.zeros(num_train, dtype=torch.int64),
                   torch.empty((num_test, *image_shape), dtype=torch.uint8, device="meta"),
                   torch.zeros(num_test, dtype=torch.int64), num_classes, (0.0,) * c, (1.0,) * c)


def plan_dataset(config: RunConfig, load: bool = False) -> tuple[Dataset, bool]:
    """(the dataset to plan with, whether its images were loaded). Known datasets are shape-only
    unless `load` or a dirichlet partition (its split needs the real labels)."""
    known = KNOWN_DATASETS.get(config.dataset)
    if known is not None and not load and config.partition != "dirichlet":
        return shape_only_dataset(*known), False
    return load_dataset(config.dataset, config.data_dir, config.seed), True


def plan_devices(config: RunConfig, dataset: Dataset, nodes: int,
                 extra: Sequence[DeviceProfile] = ()) -> list[Device]:
    """The devices a simulation of `nodes` nodes (plus one per `extra` profile, after them) reports:
    node i holds partition i-1, its profile from `device-mix` and its memory from `memory-pool`
    (`fl_app.profiles.pooled_profile`, as `client_app.node` draws it), its examples from the split."""
    if nodes < 1:
        raise PlanError(f"--nodes {nodes}: plan for at least one node")
    total = nodes + len(extra)
    c = config
    split = federated_split(dataset, total, c.partition, c.seed, c.dirichlet_alpha, c.shards_per_client,
                            c.public_size, c.max_client_examples)

    def full_mb() -> float:
        return full_training_peak_mb(c.model, dataset.image_shape, dataset.num_classes, c.batch_size)

    devices = []
    for pid in range(total):
        base = profile_for_partition(c.device_mix, pid) if pid < nodes else extra[pid - nodes]
        profile = pooled_profile(base, c.memory_pool, pid, c.seed, full_mb)
        devices.append(Device(pid + 1, pid, profile, int(len(split.clients[pid]))))
    return devices


# --- sizing messages and replies -----------------------------------------------------------


class _Wire:
    """Exact serialized sizes of planned messages and replies, without re-encoding equal layouts.

    A record's serialized size depends only on its tensors' names, shapes, dtypes and the encoding
    (never on the values), and a message's size is the sum of its records' sizes (Protobuf: one
    entry per record), so each layout is encoded and measured once."""

    def __init__(self) -> None:
        self._records: dict[tuple, ArrayRecord] = {}
        self._sizes: dict[tuple[str, int], int] = {}
        self._expected: dict[tuple, dict[str, tuple[tuple[int, ...], bool]]] = {}

    def encode(self, tensors: dict[str, torch.Tensor], encoding: str) -> ArrayRecord:
        """`fl_app.wire.encode`, once per layout (the first tensors of a layout stand for all)."""
        key = (encoding, tuple((k, tuple(v.shape), v.dtype) for k, v in tensors.items()))
        if key not in self._records:
            self._records[key] = encode(tensors, encoding)
        return self._records[key]

    def _encoded_layout(self, layout: dict[str, tuple[tuple[int, ...], torch.dtype]], encoding: str) -> ArrayRecord:
        """The record of zeros in `layout` (name -> shape, dtype), or the record of a message whose
        tensors had that layout (a reply returning what it was sent is measured once)."""
        key = (encoding, tuple((k, shape, dtype) for k, (shape, dtype) in layout.items()))
        if key not in self._records:
            self._records[key] = encode({k: torch.zeros(shape, dtype=dtype) for k, (shape, dtype) in layout.items()},
                                        encoding)
        return self._records[key]

    def size(self, content: RecordDict) -> tuple[int, dict[str, int]]:
        """(bytes of `content` as Flower serializes it, bytes per record)."""
        by_record = {}
        for name, record in content.items():
            key = (name, id(record))
            if isinstance(record, ArrayRecord) and key in self._sizes:
                by_record[name] = self._sizes[key]
                continue
            by_record[name] = serialized_bytes(RecordDict({name: record}))
            if isinstance(record, ArrayRecord):
                self._sizes[key] = by_record[name]  # records are kept in self._records: ids stay unique
        return sum(by_record.values()), by_record

    def expected(self, task: TrainTask, public_size: int) -> dict[str, tuple[tuple[int, ...], bool]]:
        """`server_app.rounds.expected_tensors`, cached per job layout."""
        job = task.job
        key = (job.model.to_json(), None if job.trainable is None else tuple(job.trainable), job.returns,
               public_size)
        if key not in self._expected:
            self._expected[key] = expected_tensors(task, public_size)
        return self._expected[key]

    def message(self, task: TrainTask) -> tuple[int, dict[str, int]]:
        """The bytes of `task`'s message, as the round loop sends it (`task_content`)."""
        return self.size(task_content(task, self.encode))

    def reply(self, task: TrainTask, public_size: int, examples: int, test_share: bool) -> tuple[int, dict[str, int]]:
        """The bytes of a correct reply: the tensors the job returns, in its encoding, and the client's
        report (`fl_app.job.train_report`) for `examples`, with test metrics if the node has a test share."""
        job = task.job
        layout = {k: (shape, torch.float32 if floating else torch.int64)
                  for k, (shape, floating) in self.expected(task, public_size).items()}
        report = train_report(examples, 0.0, 0.0, 0.0, (0.0, 0.0) if job.evaluate and test_share else None)
        return self.size(RecordDict({job.returns: self._encoded_layout(layout, job.encoding),
                                     "report": MetricRecord(report)}))


# --- planning one strategy ---------------------------------------------------------------------


@dataclass
class TaskPlan:
    """One device's planned task in one round."""

    round: int
    node_id: int
    bytes_down: int  # the message, exactly as serialized
    bytes_up: int  # a correct reply, exactly as serialized
    bytes_down_by_record: dict[str, int]
    price: TaskPrice
    info: dict[str, Any]  # the strategy's facts (keep_ratio, depth, stage, ...)
    label: str = ""  # what the device trains: "keep 0.531", "depth 3", "shrink 4 mimic", "grow 1"

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "trains": self.label, "bytes_down": self.bytes_down, "bytes_up": self.bytes_up,
                "bytes_down_by_record": self.bytes_down_by_record, **asdict(self.price),
                "device_time_s": self.price.device_time_s,
                "info": {k: v for k, v in self.info.items() if isinstance(v, (int, float, str, bool))}}


@dataclass
class StrategyPlan:
    """One strategy's plan over the configured rounds."""

    name: str
    error: str | None = None  # the strategy cannot run here (StrategySetupError), and why
    rounds: list[list[TaskPlan]] = field(default_factory=list)  # per round, the planned tasks
    absent: list[dict[int, str]] = field(default_factory=list)  # per round, node -> why it has no task
    profl_steps: dict[int, list[tuple[str, str | None]]] = field(default_factory=dict)  # node -> (step, shortfall)
    deadline_s: float = 0.0  # run-config emulated-deadline: emulated seconds, 0 = none

    def task(self, node_id: int, server_round: int = 1) -> TaskPlan | None:
        return next((t for t in self.rounds[server_round - 1] if t.node_id == node_id), None) if self.rounds else None

    def round_summary(self, server_round: int) -> dict[str, Any]:
        """Participants, traffic and duration of a round: the slowest participant's device time, and
        under `emulated-deadline` the deadline (devices slower than it miss the round, as the run's
        virtual clock, server_app/clock.py, decides)."""
        tasks = self.rounds[server_round - 1]
        slowest = max(tasks, key=lambda t: t.price.device_time_s, default=None)
        seconds = slowest.price.device_time_s if slowest else 0.0
        missed = [t.node_id for t in tasks if self.deadline_s and t.price.device_time_s > self.deadline_s]
        return {"round": server_round, "participants": len(tasks),
                "bytes_down": sum(t.bytes_down for t in tasks), "bytes_up": sum(t.bytes_up for t in tasks),
                "seconds": seconds, "slowest_node": slowest.node_id if slowest else None,
                "seconds_under_deadline": (min(seconds, self.deadline_s) if self.deadline_s else None),
                "missed_deadline": missed,
                "step": next((t.label for t in tasks if "stage" in t.info), None)}

    def summary(self) -> dict[str, Any]:
        rounds = [self.round_summary(r) for r in range(1, len(self.rounds) + 1)]
        later = rounds[1:]
        key = "seconds_under_deadline" if self.deadline_s else "seconds"
        return {
            "rounds": rounds,
            "traffic_after_setup": None if not later else {
                "bytes_down": sum(r["bytes_down"] for r in later) / len(later),
                "bytes_up": sum(r["bytes_up"] for r in later) / len(later)},
            "total": {"bytes_down": sum(r["bytes_down"] for r in rounds),
                      "bytes_up": sum(r["bytes_up"] for r in rounds),
                      "seconds": sum(r[key] for r in rounds)}}


def _echo_update(task: TrainTask, device: Device, public_size: int, wire: _Wire) -> ClientUpdate:
    """A stand-in reply with no training behind it: the tensors the job returns as they were sent
    (zeros where nothing was sent, e.g. logits), every float moved by ECHO_STEP."""
    tensors = {}
    for name, (shape, floating) in wire.expected(task, public_size).items():
        sent = task.weights.get(name)
        if sent is not None and tuple(sent.shape) == shape:
            tensors[name] = sent + ECHO_STEP if sent.is_floating_point() else sent.clone()
        else:
            tensors[name] = torch.zeros(shape, dtype=torch.float32 if floating else torch.int64)
    return ClientUpdate(task.node_id, task.job, tensors, planned_examples(device, task.job), {})


def _fold(strategy: Strategy, federation: Federation, server_round: int, updates: list[ClientUpdate]) -> None:
    """The strategy's own aggregate_train on echo replies, with the server's distillation off
    (REFT's; it changes values, never what travels next)."""
    config = federation.config
    federation.config = replace(config, server_distill_epochs=0)
    try:
        strategy.aggregate_train(server_round, updates)
    finally:
        federation.config = config


def _profl_steps(strategy: ProFL) -> list[Step]:
    """Every step of ProFL's schedule, in order: the shrinking steps, then growing each block."""
    steps = [strategy.step, *strategy.schedule, *(Step("grow", b, "train") for b in range(1, strategy.total + 1))]
    return list(dict.fromkeys(steps))


def step_label(step: Step) -> str:
    """A ProFL step as the plan names it: "shrink 4", "shrink 4 mimic", "grow 1"."""
    return f"{step.stage} {step.block}" + (" mimic" if step.kind == "mimic" else "")


def _label(task: TrainTask) -> str:
    """What a task trains, from its job and the strategy's facts about it."""
    info = task.info
    if "depth" in info:
        return f"depth {info['depth']}"
    if "stage" in info:
        return f"{info['stage']} {info['active_block']}" + (" mimic" if task.job.mimic else "")
    return f"keep {info.get('keep_ratio', 1.0):.3f}"


def _absent_reason(strategy: Strategy, federation: Federation, device: Device, server_round: int) -> str:
    """Why `device` has no task this round, in the strategy's own words where it has them, with the
    resource that falls short and the run-config key that would change it (Federation.shortfall)."""
    reason = strategy.left_out.get(device.node_id)  # DepthFL's already names the shortfall (DepthFL.admit)
    if reason is None and isinstance(strategy, ProFL) and device not in strategy.eligible:
        reason = (f"does not fit step {step_label(strategy.step)}: "
                  f"{federation.job_shortfall(strategy.job(server_round, strategy.step), device)}")
    return reason or "eligible, not sampled this round (fraction-train)"


def plan_strategy(name: str, config: RunConfig, devices: list[Device], dataset: Dataset,
                  wire: _Wire | None = None, fold: bool | None = None) -> StrategyPlan:
    """Plan `num-server-rounds` rounds of strategy `name` on `devices`: the strategy object the
    ServerApp builds, its real configure_train each round, every task priced and sized; echo
    replies folded in between (nothing trains) unless `fold` is False (default: unless FOLD_FREE)."""
    fold = name not in FOLD_FREE if fold is None else fold
    wire = wire or _Wire()
    config = replace(config, strategy=name)
    plan = StrategyPlan(name, deadline_s=config.emulated_deadline)
    federation = Federation(config, list(devices), dataset, numpy_rng(config.seed))
    try:
        strategy = STRATEGIES[name](federation)
    except StrategySetupError as exc:
        plan.error = str(exc)
        return plan
    if isinstance(strategy, ProFL):
        for d in devices:
            plan.profl_steps[d.node_id] = [(step_label(s), federation.job_shortfall(strategy.job(0, s), d))
                                           for s in _profl_steps(strategy)]
    evaluated = evaluation_indices(len(dataset.y_test), config.test_size, config.seed)
    by_id = {d.node_id: d for d in devices}
    for server_round in range(1, config.num_server_rounds + 1):
        tasks = strategy.configure_train(server_round)
        planned, updates = [], []
        for task in tasks:
            device = by_id[task.node_id]
            examples = planned_examples(device, task.job)
            down, down_by_record = wire.message(task)
            has_test = len(evaluated[device.partition_id::len(devices)]) > 0
            up, _ = wire.reply(task, config.public_size, examples, has_test)
            price = price_task(federation, device, task, examples, down, up)
            planned.append(TaskPlan(server_round, task.node_id, down, up, down_by_record, price, dict(task.info),
                                    _label(task)))
            if fold:
                updates.append(_echo_update(task, device, config.public_size, wire))
        plan.rounds.append(planned)
        sent = {t.node_id for t in tasks}
        plan.absent.append({d.node_id: _absent_reason(strategy, federation, d, server_round)
                            for d in devices if d.node_id not in sent})
        if fold and server_round < config.num_server_rounds:
            _fold(strategy, federation, server_round, updates)
    return plan


# --- the whole plan -----------------------------------------------------------------------------


@dataclass
class Plan:
    config: RunConfig
    dataset: Dataset
    dataset_loaded: bool
    devices: list[Device]
    strategies: list[StrategyPlan]
    command: str = ""

    def device_status(self, plan: StrategyPlan, device: Device) -> dict[str, Any]:
        """Whether `device` takes part in `plan` (in round 1, or from a later round), and if not why:
        `kind` is the resource that falls short ("memory", "deadline"), "sampling" or None."""
        if plan.error:
            return {"status": "strategy cannot run", "kind": None, "reason": plan.error, "first_round": None}
        rounds = [r for r in range(1, len(plan.rounds) + 1) if plan.task(device.node_id, r)]
        if rounds:
            task = plan.task(device.node_id, rounds[0])
            over = not task.price.fits_memory
            status = "trains" if rounds[0] == 1 else f"trains from round {rounds[0]}"
            return {"status": status + (" (over its memory budget)" if over else ""), "kind": "over" if over else None,
                    "reason": None, "first_round": rounds[0]}
        reason = plan.absent[0].get(device.node_id, "") if plan.absent else ""
        match = _KIND.search(reason)
        kind = match.group(1) if match else ("sampling" if "not sampled" in reason else "other")
        return {"status": "left out" if kind != "sampling" else "not sampled", "kind": kind, "reason": reason,
                "first_round": None}

    def to_dict(self) -> dict[str, Any]:
        d = self.dataset
        out: dict[str, Any] = {
            "command": self.command, "trained": False, "config": self.config.__dict__,
            "dataset": {"name": self.config.dataset, "image_shape": list(d.image_shape), "num_classes": d.num_classes,
                        "train_images": len(d.y_train), "test_images": len(d.y_test), "images_loaded": self.dataset_loaded},
            "devices": [dev.to_dict() for dev in self.devices], "strategies": {}}
        for plan in self.strategies:
            entry: dict[str, Any] = {"error": plan.error}
            if not plan.error:
                entry.update(plan.summary())
                entry["participants_round_1"] = len(plan.rounds[0]) if plan.rounds else 0
            entry["devices"] = []
            for dev in self.devices:
                row = {"node_id": dev.node_id, "profile": dev.profile.name, "memory_budget_mb": dev.profile.memory_mb,
                       **self.device_status(plan, dev)}
                if plan.profl_steps:
                    row["profl_steps"] = [{"step": s, "fits": why is None, "shortfall": why}
                                          for s, why in plan.profl_steps[dev.node_id]]
                row["rounds"] = [t.to_dict() for r in range(1, len(plan.rounds) + 1)
                                 if (t := plan.task(dev.node_id, r)) is not None]
                entry["devices"].append(row)
            out["strategies"][plan.name] = entry
        return out


def make_plan(overrides: Mapping[str, Any], device_mix: str | None = None, nodes: int | None = None,
              measure: bool = False, strategies: Sequence[str] | None = None, load_data: bool = False,
              measured_profile: Callable[[], DeviceProfile] | None = None) -> Plan:
    """Plan every strategy in `strategies` (default: all of STRATEGIES) for the run config `overrides`
    (over pyproject's defaults), on `nodes` simulated nodes of `device_mix` (default: the run config's
    device-mix, one node per entry), plus this machine measured if `measure`. Raises ConfigError,
    ProfileError, DataError or PlanError on input it cannot plan for."""
    overrides = dict(overrides)
    if device_mix is not None:
        overrides["device-mix"] = device_mix
    names = list(strategies or STRATEGIES)
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        raise PlanError(f"--strategies: unknown {', '.join(unknown)}; valid: {', '.join(STRATEGIES)}")
    config = plan_config(overrides, names[0])
    dataset, loaded = plan_dataset(config, load_data)
    check_input_size(ModelSpec(config.model, dataset.num_classes, dataset.image_shape[0]), dataset.image_shape,
                     config.batch_size)
    extra = []
    if measure:
        if measured_profile is None:
            from fl_app.measure import DEFAULT_DOWNLINK_MBPS, DEFAULT_UPLINK_MBPS, measure_profile

            def measured_profile() -> DeviceProfile:
                return measure_profile("this-machine", DEFAULT_UPLINK_MBPS, DEFAULT_DOWNLINK_MBPS)
        extra.append(measured_profile())
    devices = plan_devices(config, dataset, len(parse_device_mix(config.device_mix)) if nodes is None else nodes,
                           extra)
    wire = _Wire()
    plans = [plan_strategy(n, config, devices, dataset, wire) for n in names]
    return Plan(config, dataset, loaded, devices, plans)


def check_someone_trains(plan: Plan) -> None:
    """PlanError (one line) when no strategy has a device that can train: every strategy fails to set
    up, or plans only jobs whose predicted peak exceeds the device's memory (FedAvg ignores limits)."""
    for s in plan.strategies:
        if not s.error and any(t.price.fits_memory for tasks in s.rounds for t in tasks):
            return
    reasons = "; ".join(f"{s.name}: {s.error or 'every planned job exceeds its device memory'}"
                        for s in plan.strategies)
    raise PlanError(f"no device of this mix can train under any strategy ({reasons})")


# --- text ----------------------------------------------------------------------------------------


def _ranges(ids: list[int]) -> str:
    out, start = [], ids[0]
    for a, b in zip(ids, ids[1:] + [None]):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)


def _group(rows: list[tuple[Device, tuple]]) -> list[tuple[list[Device], tuple]]:
    """Consecutive devices whose rows are the same, as one group."""
    groups: list[tuple[list[Device], tuple]] = []
    for device, key in rows:
        if groups and groups[-1][1] == key:
            groups[-1][0].append(device)
        else:
            groups.append(([device], key))
    return groups


def _mb(n: float) -> str:
    return f"{n / MB:.2f}" if n < 10 * MB else f"{n / MB:.1f}"


def _count(n: float) -> str:
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k" if n >= 1e3 else f"{n:.0f}"


def _sec(s: float) -> str:
    return f"{s:.3g}" if s < 100 else f"{s:.0f}"


def _model(task: TaskPlan) -> str:
    return f"{task.label} {_count(task.price.model_params)} {task.price.model_size_mb:.3g}MB"


def format_plan(plan: Plan) -> str:
    """The plan as text: devices, then per strategy a summary, rounds and a row per group of devices."""
    c, d = plan.config, plan.dataset
    shape = "x".join(map(str, d.image_shape))
    lines = [
        f"Plan (nothing trained): {c.model} on {c.dataset} {shape}, {d.num_classes} classes, "
        f"{len(d.y_train)} train images ({'loaded' if plan.dataset_loaded else 'known sizes, images not read'}); "
        f"{len(plan.devices)} nodes, {c.num_server_rounds} rounds, {c.local_epochs} local epoch(s), batch {c.batch_size}, "
        f"encoding {c.encoding}, reft pruning {c.pruning}"
        + (f", memory-pool {c.memory_pool}" if c.memory_pool else "")
        + (f", emulated-deadline {c.emulated_deadline:g} s" if c.emulated_deadline else ""),
        "Traffic in MB of 10^6 bytes, memory in MB of 2^20 bytes, times in seconds (emulated device time).",
        "", f"{'nodes':<9}{'profile':<24}{'GFLOPS':>8}{'memory MB':>11}{'down/up Mbit/s':>16}{'examples':>10}"]
    for group, _ in _group([(dev, (dev.profile.name, dev.profile.memory_mb)) for dev in plan.devices]):
        p = group[0].profile
        ex = sorted({dev.num_examples for dev in group})
        lines.append(f"{_ranges([x.node_id for x in group]):<9}{p.name:<24}{p.gflops:>8g}{p.memory_mb:>11.0f}"
                     f"{f'{p.downlink_mbps:g}/{p.uplink_mbps:g}':>16}"
                     f"{(str(ex[0]) if len(ex) == 1 else f'{ex[0]}-{ex[-1]}'):>10}")
    for s in plan.strategies:
        lines += ["", *_format_strategy(plan, s)]
    return "\n".join(lines)


def _format_strategy(plan: Plan, s: StrategyPlan) -> list[str]:
    if s.error:
        return [f"== {s.name}: cannot run: {s.error}"]
    summary = s.summary()
    first = summary["rounds"][0]
    slow = plan.devices[[dev.node_id for dev in plan.devices].index(first["slowest_node"])] if first["slowest_node"] \
        else None
    taking = sum(1 for dev in plan.devices if plan.device_status(s, dev)["first_round"] is not None)
    head = (f"== {s.name}: {taking}/{len(plan.devices)} devices take part ({first['participants']} in round 1); "
            f"round 1 takes {_sec(first['seconds'])} s on the slowest"
            + (f" (node {slow.node_id}, {slow.profile.name})" if slow else ""))
    if s.deadline_s:
        missing = first["missed_deadline"]
        head += (f"; with emulated-deadline {s.deadline_s:g} s it lasts {_sec(first['seconds_under_deadline'])} s and "
                 + (f"nodes {_ranges(missing)} would miss it" if missing else "nobody misses it"))
    after = summary["traffic_after_setup"]
    total = summary["total"]
    lines = [head,
             f"   traffic: round 1 {_mb(first['bytes_down'])} MB down, {_mb(first['bytes_up'])} MB up"
             + (f"; after setup {_mb(after['bytes_down'])} down, {_mb(after['bytes_up'])} up per round" if after else "")
             + f"; {len(summary['rounds'])} rounds {_mb(total['bytes_down'])} MB down, {_mb(total['bytes_up'])} MB up, "
             f"{_sec(total['seconds'])} s",
             "   rounds: " + "; ".join(f"{r['round']}: {r['participants']} dev {_sec(r['seconds'])} s"
                                      + (f" [{r['step']}]" if r["step"] else "") for r in summary["rounds"])]
    lines.append(f"   {'nodes':<8}{'profile':<22}{'status':<10}{'model':<28}{'MFLOP/img':>10}{'peak/budget MB':>17}"
                 f"{'compute s':>11}{'comm s':>9}{'down MB':>9}{'up MB':>8}")
    rows, notes = [], {}
    for dev in plan.devices:
        st = plan.device_status(s, dev)
        t = s.task(dev.node_id, st["first_round"]) if st["first_round"] else None
        if t is None:
            short = {"memory": "no: mem", "deadline": "no: late", "sampling": "unsampled"}.get(st["kind"], "no")
            key = (dev.profile.name, short, st["reason"], None)
        else:
            short = "yes" if st["first_round"] == 1 else f"from r{st['first_round']}"
            short += "!" if st["kind"] == "over" else ""
            key = (dev.profile.name, short, _model(t), f"{t.price.train_flops_per_sample / 1e6:.2f}",
                   f"{t.price.predicted_peak_memory_mb:.1f}/{dev.profile.memory_mb:.0f}")
        rows.append((dev, key))
    for group, key in _group(rows):
        ids = [dev.node_id for dev in group]
        label = _ranges(ids)
        if key[3] is None:
            notes.setdefault(key[2], []).extend(ids)
            lines.append(f"   {label:<8}{key[0]:<22}{key[1]:<10}(see below)")
            continue
        tasks = [s.task(dev.node_id, plan.device_status(s, dev)["first_round"]) for dev in group]
        compute = max(t.price.compute_s for t in tasks)
        comm = max(t.price.transfer_s for t in tasks)
        down = max(t.bytes_down for t in tasks)
        up = max(t.bytes_up for t in tasks)
        lines.append(f"   {label:<8}{key[0]:<22}{key[1]:<10}{key[2]:<28}{key[3]:>10}{key[4]:>17}"
                     f"{_sec(compute):>11}{_sec(comm):>9}{_mb(down):>9}{_mb(up):>8}")
    for reason, ids in notes.items():
        lines.append(f"   nodes {_ranges(sorted(ids))}: {reason}")
    if s.profl_steps:
        steps = {}
        for dev in plan.devices:
            fits = [label for label, why in s.profl_steps[dev.node_id] if why is None]
            steps.setdefault((dev.profile.name, dev.profile.memory_mb, tuple(fits), len(s.profl_steps[dev.node_id])),
                             []).append(dev.node_id)
        for (name, _, fits, n), ids in steps.items():
            lines.append(f"   steps nodes {_ranges(ids)} ({name}) fit {len(fits)}/{n}: "
                         + (", ".join(fits) if fits else "none"))
    return lines


# --- figure ----------------------------------------------------------------------------------


_COLORS = {"fits": "#4caf50", "over": "#ffd54f", "memory": "#e57373", "deadline": "#ffb74d",
           "sampling": "#cfd8dc", "other": "#b0bec5", "error": "#616161"}


def plot_plan(plan: Plan, path: Path) -> None:
    """Devices x strategies heatmap: fits (green), over its memory budget (FedAvg, yellow), left out
    for memory (red) or the emulated deadline (orange), not sampled (grey), strategy cannot run (dark grey);
    annotated with the predicted device time of its first round, in seconds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    kinds = list(_COLORS)
    cells = []
    for dev in plan.devices:
        row = []
        for s in plan.strategies:
            st = plan.device_status(s, dev)
            kind = "error" if s.error else "over" if st["kind"] == "over" else "fits" if st["first_round"] \
                else st["kind"]
            t = s.task(dev.node_id, st["first_round"]) if st["first_round"] else None
            text = _sec(t.price.device_time_s) if t else {"memory": "mem", "deadline": "late"}.get(kind, "")
            row.append((kind, text))
        cells.append((dev, tuple(row)))
    groups = _group([(dev, (dev.profile.name, dev.profile.memory_mb, row)) for dev, row in cells])
    grid = np.array([[kinds.index(k) for k, _ in key[2]] for _, key in groups])
    fig, ax = plt.subplots(figsize=(1.3 * len(plan.strategies) + 3, 0.42 * len(groups) + 2.2))
    ax.imshow(grid, cmap=ListedColormap([_COLORS[k] for k in kinds]), vmin=0, vmax=len(kinds) - 1, aspect="auto")
    for i, (_, key) in enumerate(groups):
        for j, (_, text) in enumerate(key[2]):
            ax.text(j, i, text, ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(plan.strategies)), [s.name for s in plan.strategies], rotation=30, ha="right")
    ax.set_yticks(range(len(groups)), [f"{_ranges([d.node_id for d in g])} {key[0]}" for g, key in groups], fontsize=8)
    c = plan.config
    ax.set_title(f"{c.model} on {c.dataset}, batch {c.batch_size}: who trains, and predicted device seconds of its "
                 "first round", fontsize=9)
    labels = {"fits": "trains", "over": "trains over its memory", "memory": "left out: memory",
              "deadline": "left out: deadline", "sampling": "not sampled", "other": "left out", "error": "cannot run"}
    used = {k for _, key in groups for k, _ in key[2]}
    ax.legend(handles=[Patch(color=_COLORS[k], label=labels[k]) for k in kinds if k in used],
              loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.02 * len(plan.strategies)), ncol=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- command line ------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_run_config(texts: Sequence[str] | None) -> dict[str, Any]:
    """`--run-config` values as `flwr run` reads them ("key=value key2='text'", or one .toml file)."""
    from flwr.common.config import parse_config_args

    try:
        return parse_config_args(list(texts) if texts else None)
    except Exception as exc:  # click.ClickException, tomli errors, a missing .toml file
        message = getattr(exc, "message", None) or str(exc)
        raise PlanError(f"--run-config: {message}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print the plan; with --out, write plan.json and plan.png there. Exit 2 on bad input."""
    parser = _Parser(prog="python -m server_app.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-config", action="append", metavar="\"key=value ...\"",
                        help="run-config overrides, as for flwr run (repeatable; or one .toml file)")
    parser.add_argument("--device-mix", help="profile names or .toml files with counts, e.g. "
                        "\"raspberry-pi-3b-plus:20,jetson-nano:5,laptop:1\" (default: the run config's device-mix)")
    parser.add_argument("--nodes", type=int, help="number of simulated nodes (default: the mix's length)")
    parser.add_argument("--measure", action="store_true", help="add this machine as one more node, measured")
    parser.add_argument("--strategies", help=f"comma-separated subset of {','.join(STRATEGIES)} (default: all)")
    parser.add_argument("--load-data", action="store_true",
                        help="read the dataset even when its shape and sizes are known")
    parser.add_argument("--out", type=Path, help="folder for plan.json and plan.png")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.strategies.split(",") if n.strip()] if args.strategies else None
    try:
        plan = make_plan(parse_run_config(args.run_config), args.device_mix, args.nodes, args.measure, names,
                         args.load_data)
        check_someone_trains(plan)
    except (ConfigError, ProfileError, DataError, PlanError) as exc:
        parser.exit(2, f"{parser.prog}: error: {' '.join(str(exc).split())}\n")
    plan.command = " ".join(["python -m server_app.plan", *(_quote(a) for a in (argv if argv is not None
                                                                                  else sys.argv[1:]))])
    print(format_plan(plan))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "plan.json").write_text(json.dumps(plan.to_dict(), indent=1, default=_json_default) + "\n")
        plot_plan(plan, args.out / "plan.png")
        print(f"\nwrote {args.out / 'plan.json'} and {args.out / 'plan.png'}")
    return 0


def _quote(arg: str) -> str:
    return arg if re.fullmatch(r"[\w./:,=@+-]+", arg) else "'" + arg.replace("'", "'\"'\"'") + "'"


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


if __name__ == "__main__":
    raise SystemExit(main())
