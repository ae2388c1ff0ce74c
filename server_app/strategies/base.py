"""What every strategy shares: the federation it plans for, the task it emits, the update it folds.

A strategy has two verbs. `configure_train(round)` plans one `TrainTask` per chosen
node (which model, which weights, what to train and send back); `aggregate_train`
folds the validated `ClientUpdate`s into the global state. Sending, validating,
counting bytes, evaluating and recording are done once, by the round loop.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch

from fl_app.aggregation import Aggregation, fold_states
from fl_app.config import RunConfig
from fl_app.cost import ModelCost, Workload, model_cost
from fl_app.data import Batches, Dataset, split_public
from fl_app.job import Job
from fl_app.models import BlockNet, ModelSpec, build_model
from fl_app.profiles import DeviceProfile, parse_memory_pool, profile_report
from fl_app.training import TrainConfig
from fl_app.units import MIB
from fl_app.width import Widths, fit_ratio, widths_at_ratio


class StrategySetupError(ValueError):
    """The strategy cannot run on this federation (e.g. no device fits); the message says what to change."""


@dataclass(frozen=True)
class Device:
    """A node as the server sees it after the query."""

    node_id: int
    partition_id: int
    profile: DeviceProfile
    num_examples: int
    num_partitions: int | None = None  # as the node reported it (server_app.verify holds it to the run's)

    def to_dict(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "partition_id": self.partition_id, **profile_report(self.profile),
                "num_examples": self.num_examples}


@dataclass
class TrainTask:
    """One node's work this round: the job, and the tensors that travel with it."""

    node_id: int
    job: Job
    weights: dict[str, torch.Tensor]  # may be empty: the client uses the weights it kept
    extra: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # more records, by name
    info: dict[str, Any] = field(default_factory=dict)  # strategy facts for the client's record
    max_examples: int | None = None  # the most examples a reply may claim (set by the round loop)


@dataclass
class ClientUpdate:
    """A validated reply: the tensors the job asked for, and the client's report."""

    node_id: int
    job: Job
    tensors: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float]
    trust: float | None = None  # FLTrust's score in [0, 1] (`server_app.trust`), when aggregation scores updates
    label_shift: tuple[float, float] | None = None  # fltrust:labels: (mean, standard error) (`server_app.trust`)

    @property
    def fold_weight(self) -> float:
        """This update's weight in the fold: its FLTrust score when scored, else its example count."""
        return float(self.num_examples) if self.trust is None else self.trust


@dataclass
class Federation:
    """The environment strategies plan in: run config, devices, data shape, budgets, sampling.

    `devices` holds every node seen in the run that holds training data, in the order they
    joined (`idle` those that hold none); `online` the ids
    of those reachable now. Strategies may plan for any device, but `sample` only ever
    picks online ones, so a node that drops out is skipped until it comes back.
    """

    config: RunConfig
    devices: list[Device]
    dataset: Dataset
    rng: np.random.Generator
    online: set[int] = field(default_factory=set)
    refused: set[int] = field(default_factory=set)  # nodes whose device query failed: not asked again
    # Nodes that reported no training data: recorded by the round loop, never in `devices`, so no
    # strategy plans, samples, sizes or averages for them (server_app.server_app.admit_devices).
    idle: list[Device] = field(default_factory=list)
    _ratios: dict[tuple[Any, ...], float | None] = field(default_factory=dict, init=False, repr=False)
    _by_id: dict[int, Device] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.online = self.online or {d.node_id for d in self.devices}

    def device(self, node_id: int) -> Device | None:
        """The device of `node_id` (None if it holds no data or is unknown); O(1): called per task."""
        if len(self._by_id) != len(self.devices):  # devices only ever grow (nodes that join)
            self._by_id = {d.node_id: d for d in self.devices}
        return self._by_id.get(node_id)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.dataset.image_shape

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    def public_batches(self, targets: torch.Tensor, batch_size: int | None = None, seed: int | None = None) -> Batches:
        """The public slice (derived, never shipped) paired with `targets`, e.g. teacher logits, in batches of
        `batch_size` (default: the run's) shuffled by `seed` (default: the run's)."""
        public, _ = split_public(len(self.dataset.y_train), self.config.public_size, self.config.seed)
        x = self.dataset.x_train[torch.from_numpy(public)]
        return Batches(x, targets, self.dataset, batch_size or self.config.batch_size,
                       seed=self.config.seed if seed is None else seed)

    def public_labels(self) -> torch.Tensor:
        """The true labels of the public slice, (public_size,): what REFT's ensemble is scored against."""
        public, _ = split_public(len(self.dataset.y_train), self.config.public_size, self.config.seed)
        return torch.as_tensor(self.dataset.y_train)[torch.from_numpy(public)]

    def full_spec(self) -> ModelSpec:
        return ModelSpec(self.config.model, self.num_classes, self.image_shape[0])

    def train_config(self) -> TrainConfig:
        c = self.config
        return TrainConfig(c.local_epochs, c.batch_size, c.lr, c.momentum, c.weight_decay, c.augment, c.checkpoint)

    def cost(self, spec: ModelSpec, trainable: list[int] | None = None, checkpoint: bool | None = None) -> ModelCost:
        """The price of training `spec` (only `trainable` blocks, if given) on this run's inputs; with
        activation checkpointing as run-config `checkpoint` says, as the jobs train, unless `checkpoint`."""
        return model_cost(spec, self.image_shape, trainable,
                          self.config.checkpoint if checkpoint is None else checkpoint)

    def peak_memory_mb(self, cost: ModelCost) -> float:
        return cost.peak_train_bytes(self.config.batch_size, self.image_shape) / MIB

    def job_cost(self, job: Job) -> ModelCost:
        return self.cost(job.model, job.trainable, job.train.checkpoint)

    def job_peak_memory_mb(self, job: Job) -> float:
        """Predicted peak memory of a job: its training step, plus the teacher it mimics, if any."""
        teacher = self.cost(job.mimic).state_bytes / MIB if job.mimic else 0.0
        return self.job_cost(job).peak_train_bytes(job.train.batch_size, self.image_shape) / MIB + teacher

    def workload(self, device: Device, **changes: Any) -> Workload:
        """One round of `device`'s work for a strategy that sends a model and gets its trained part back:
        its examples times `local-epochs`, in the run's encoding; `changes` adjust it (REFT: logits)."""
        base = Workload(device.num_examples * self.config.local_epochs, encoding=self.config.encoding)
        return replace(base, **changes) if changes else base

    def memory_budget_bytes(self, device: Device) -> float:
        """The device's memory budget in bytes (its profile's, or its draw from `memory-pool`)."""
        return device.profile.memory_mb * MIB

    def shortfall(self, cost: ModelCost, device: Device, extra_bytes: float = 0.0,
                  workload: Workload | None = None) -> str | None:
        """Why `device` cannot train a model of `cost` in a round (None: it can): the one fitting rule of
        every strategy but FedAvg (shared/docs/ALGORITHMS.md, "Constraints are physical").

        - memory, always: predicted peak training memory at `batch-size` (+ `extra_bytes`, e.g. a
          teacher held beside it) within the device's memory budget;
        - time, when `emulated-deadline` is set: predicted device time of one round (`workload`, default
          `self.workload(device)`: compute at its GFLOPS + message bytes bounded from above at its link
          rates, the virtual clock's price) within the deadline.
        The text starts with the resource ("memory: " or "deadline: ") and names the key that relaxes it.
        """
        over = self._exceeded(cost, device, extra_bytes, workload)
        if over is None:
            return None
        if over[0] == "memory":
            return (f"memory: needs {over[1] / MIB:.1f} MB at batch {self.config.batch_size}, has "
                    f"{device.profile.memory_mb:.1f} MB ({self.memory_advice(cost, device, extra_bytes)})")
        compute, transfer, deadline = over[1], over[2], self.config.emulated_deadline
        return (f"deadline: needs {compute + transfer:.3g} s of device time (compute {compute:.3g} s at "
                f"{device.profile.gflops:g} GFLOPS, transfers {transfer:.3g} s), emulated-deadline = "
                f"{deadline:g} s (raise emulated-deadline, or lower local-epochs or max-client-examples)")

    def _exceeded(self, cost: ModelCost, device: Device, extra_bytes: float,
                  workload: Workload | None) -> tuple[str, float, float] | None:
        """The first limit a job of `cost` breaks on `device`: ("memory", peak bytes, budget bytes),
        ("deadline", compute s, transfer s), or None. `shortfall` words it; `fits` needs only this."""
        peak = cost.peak_train_bytes(self.config.batch_size, self.image_shape) + extra_bytes
        if peak > self.memory_budget_bytes(device):
            return "memory", peak, self.memory_budget_bytes(device)
        if self.config.emulated_deadline > 0:
            work = workload or self.workload(device)
            compute, transfer = work.compute_s(device.profile, cost), work.transfer_s(device.profile, cost)
            if compute + transfer > self.config.emulated_deadline:
                return "deadline", compute, transfer
        return None

    def memory_advice(self, cost: ModelCost, device: Device, extra_bytes: float = 0.0) -> str:
        """What would let `device` hold a job of `cost` (+ `extra_bytes`), each change priced by the same
        rule before it is offered: the largest batch-size that fits (not under a "uniform-fraction" pool,
        whose budgets scale with the batch), `checkpoint = true`, or a fraction pool whose lower bound
        covers the need; otherwise that none of these would."""
        c, budget = self.config, self.memory_budget_bytes(device) - extra_bytes
        pool = parse_memory_pool(c.memory_pool)
        fixes = []
        if pool is None or pool.unit == "MB":
            batch = cost.largest_batch_within(budget, self.image_shape)
            if 0 < batch < c.batch_size:
                fixes.append(f"lower batch-size to {batch}")
        if not c.checkpoint and cost.with_checkpointing().peak_train_bytes(c.batch_size, self.image_shape) <= budget:
            fixes.append("set checkpoint = true")
        if pool is not None and pool.unit == "fraction":
            need = (cost.peak_train_bytes(c.batch_size, self.image_shape) + extra_bytes) / self.full_peak_bytes
            low = math.ceil(need * 100) / 100
            fixes.append(f"memory-pool = 'uniform-fraction:{low:g}-{max(low, pool.high):g}'")
        return ", or ".join(fixes) or "no batch-size or checkpointing fits it: a device with more memory"

    @property
    def full_peak_bytes(self) -> float:
        """Predicted peak bytes of training the full model at `batch-size` without checkpointing: the
        reference of a "uniform-fraction" memory pool (fl_app.cost.full_training_peak_mb)."""
        cost = self.cost(self.full_spec(), checkpoint=False)
        return float(cost.peak_train_bytes(self.config.batch_size, self.image_shape))

    def fits(self, cost: ModelCost, device: Device, workload: Workload | None = None) -> bool:
        """Whether `device` can afford training a model of `cost` in a round (`shortfall` would be None;
        checked without wording or pricing advice, as the planner's searches call this often)."""
        return self._exceeded(cost, device, 0.0, workload) is None

    def job_workload(self, job: Job, device: Device) -> Workload:
        """`job`'s round on `device`: what it trains, distills and predicts, and what travels (the whole
        model down, as to a node that holds nothing yet; the teacher's state too for a mimic job)."""
        public, logits = self.config.public_size, self.public_logits_bytes
        teacher = self.cost(job.mimic).state_bytes if job.mimic else 0.0
        return self.workload(device, trained_examples=device.num_examples * job.train.epochs,
                             distilled_examples=job.distill_epochs * public,
                             predicted_examples=public if job.returns == "logits" else 0,
                             weights_up=job.returns == "weights",
                             extra_down_bytes=teacher + (logits if job.distill_epochs else 0.0),
                             extra_up_bytes=logits if job.returns == "logits" else 0.0, encoding=job.encoding)

    @property
    def public_logits_bytes(self) -> float:
        """Bytes of fp32 logits on the public slice: what REFT sends up, and down as soft labels."""
        return 4.0 * self.config.public_size * self.num_classes

    def job_shortfall(self, job: Job, device: Device) -> str | None:
        """`shortfall` of a planned job: its model and trainable blocks, plus the teacher it mimics."""
        teacher = self.cost(job.mimic).state_bytes if job.mimic else 0.0
        return self.shortfall(self.job_cost(job), device, teacher, self.job_workload(job, device))

    def affordable_ratio(self, device: Device, workload: Workload | None = None,
                         widths_at: Widths | None = None) -> float | None:
        """The largest pruning level of the full model `device` can afford in a round (`shortfall`):
        uniform width scaling (HeteroFL, FedRolex, AllSmall) unless `widths_at` gives other levels
        (REFT's global pruning, whose levels start at 0: every group at its floor). None: not even the
        `min-keep-ratio` floor fits."""
        work = workload or self.workload(device)

        def fit(levels: Widths | None, floor: float) -> float | None:
            return fit_ratio(self.full_spec(), self.image_shape, lambda c: self.fits(c, device, work), floor, levels)

        if widths_at is not None:  # ranked from the current weights: nothing to reuse
            return fit(widths_at, 0.0)
        p = device.profile
        key = (p.gflops, p.memory_mb, p.uplink_mbps, p.downlink_mbps, work)  # uniform levels: each budget once
        if key not in self._ratios:
            self._ratios[key] = fit(None, self.config.min_keep_ratio)
        return self._ratios[key]

    def smallest_submodel_shortfall(self, device: Device, workload: Workload | None = None) -> str:
        """Why `device` cannot afford even the `min-keep-ratio` floor, and what to change: lowering
        min-keep-ratio is advised only when a submodel of one channel per layer would fit."""
        full = self.full_spec()
        floor = full.with_widths(widths_at_ratio(full, self.config.min_keep_ratio))
        shortfall = self.shortfall(self.cost(floor), device, workload=workload)
        thinnest = full.with_widths({g: 1 for g in full.resolved_widths()})
        advice = ("; or lower min-keep-ratio (a thinner submodel fits)"
                  if self.fits(self.cost(thinnest), device, workload) else "")
        return (f"cannot afford even the smallest submodel (min-keep-ratio {self.config.min_keep_ratio}): "
                f"{shortfall}{advice}")

    def affordable_ratios(self, devices: list[Device] | None = None) -> tuple[dict[int, float], dict[int, str]]:
        """(node id -> affordable channel ratio, node id -> why it cannot afford even the floor)."""
        ratios, left_out = {}, {}
        for d in self.devices if devices is None else devices:
            ratio = self.affordable_ratio(d)
            if ratio is None:
                left_out[d.node_id] = self.smallest_submodel_shortfall(d)
            else:
                ratios[d.node_id] = ratio
        return ratios, left_out

    def sample(self, candidates: list[Device]) -> list[Device]:
        """`fraction-train` of the online candidates (at least one), seeded."""
        candidates = [d for d in candidates if d.node_id in self.online]
        k = max(1, round(self.config.fraction_train * len(candidates))) if candidates else 0
        picked = self.rng.choice(len(candidates), size=k, replace=False) if k else []
        return sorted((candidates[i] for i in picked), key=lambda d: d.node_id)


class Strategy(ABC):
    """A federated training method: plan the round's tasks, fold the replies."""

    name: ClassVar[str]

    def __init__(self, federation: Federation) -> None:
        self.federation = federation
        self.left_out: dict[int, str] = {}  # node id -> why this strategy never gives it work

    @abstractmethod
    def configure_train(self, server_round: int) -> list[TrainTask]:
        """The tasks of this round, one per chosen node."""

    @abstractmethod
    def aggregate_train(self, server_round: int, updates: list[ClientUpdate]) -> dict[str, Any]:
        """Fold validated updates into the global state; return extras for the round's record."""

    @abstractmethod
    def global_model(self) -> BlockNet:
        """The model the server evaluates after the round."""

    def resend(self, task: TrainTask) -> TrainTask | None:
        """The task again with every weight it needs, for a node that lost what it kept (None: cannot)."""
        return None

    def start_weights(self, task: TrainTask, spec: ModelSpec) -> dict[str, torch.Tensor]:
        """Every weight `spec` (the task's model, or the teacher it mimics) starts from on the node: what
        the task sends, plus what the node keeps from earlier rounds at the server's version. The
        server re-runs a job from these (FLTrust's root update, `server_app.trust`). The default suits
        strategies that send every weight a job needs."""
        return {**task.weights, **task.extra.get("teacher-weights", {})}

    def admit(self, device: Device) -> None:
        """A node joined mid-run (already in `federation.devices`): decide whether and how it takes part.

        The default suits strategies that choose among all devices every round."""

    def size_submodels(self, devices: list[Device] | None = None) -> dict[int, float]:
        """Each device's affordable channel ratio (all devices, or `devices`); those that cannot
        afford even the `min-keep-ratio` floor are recorded in `left_out`. At setup (no `devices`
        given), a federation where nobody can afford the floor stops the run before training."""
        ratios, left_out = self.federation.affordable_ratios(devices)
        self.left_out |= left_out
        if devices is None and not ratios:
            raise StrategySetupError(nobody_fits(self.name, "even the smallest submodel", left_out))
        return ratios

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The global state needed to continue the run (tensors and plain data: it is checkpointed).

        Per-node records of what a node keeps are left out: a resumed run's nodes keep nothing."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`'s output."""


class GlobalModelStrategy(Strategy):
    """A strategy whose global state is one model, `self.model`: built from `initial_spec()` with the
    run's seed, evaluated as it stands, checkpointed as its state dict. FedAvg's family, the width
    strategies, DepthFL and REFT (which adds its ensemble to the state) build on it."""

    def __init__(self, federation: Federation) -> None:
        super().__init__(federation)
        torch.manual_seed(federation.config.seed)
        self.model = build_model(self.initial_spec())

    def initial_spec(self) -> ModelSpec:
        """The global model's architecture (default: the run's full model)."""
        return self.federation.full_spec()

    def global_model(self) -> BlockNet:
        return self.model

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])


def nobody_fits(strategy: str, what: str, left_out: dict[int, str]) -> str:
    """The setup error of a strategy no device can run: the reason of the device closest to fitting (the
    smallest shortfall's first number, e.g. the least memory missing) and the advice that would help:
    the binding resource's own keys, never a setting that cannot change the outcome."""
    def over(reason: str) -> float:  # needs / has, from Federation.shortfall's wording
        number = r"([0-9.]+(?:e[-+]?[0-9]+)?)"
        match = re.search(rf"needs {number} .*?(?:has|emulated-deadline =) {number}", reason)
        return float(match.group(1)) / float(match.group(2)) if match and float(match.group(2)) else math.inf
    node, reason = min(left_out.items(), key=lambda item: over(item[1]), default=(None, "no devices"))
    return f"{strategy}: no device can train {what}; closest, node {node}: {reason}"


def weighted_average(states: list[dict[str, torch.Tensor]], weights: list[float],
                     reference: dict[str, torch.Tensor], aggregation: str = "mean") -> dict[str, torch.Tensor]:
    """Fold whole-tensor states held by every client into `reference` (the current global state, the
    origin of clipping) by run-config `aggregation` (`fl_app.aggregation`; "mean": the `weights`-weighted
    average); integer counters take the maximum. Returns the names the states hold."""
    folded = fold_states(reference, states, weights, Aggregation.parse(aggregation))
    return {name: folded[name] for name in states[0]}
