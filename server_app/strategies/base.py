"""What every strategy shares: the federation it plans for, the task it emits, the update it folds.

A strategy has two verbs. `configure_train(round)` plans one `TrainTask` per chosen
node (which model, which weights, what to train and send back); `aggregate_train`
folds the validated `ClientUpdate`s into the global state. Sending, validating,
counting bytes, evaluating and recording are done once, by the round loop.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from fl_app.aggregation import Aggregation, fold_states
from fl_app.config import RunConfig
from fl_app.cost import ModelCost, model_cost
from fl_app.data import Batches, Dataset, split_public
from fl_app.job import Job
from fl_app.models import BlockNet, ModelSpec, build_model
from fl_app.profiles import DeviceProfile, profile_report
from fl_app.training import TrainConfig
from fl_app.units import MIB
from fl_app.width import fit_ratio, widths_at_ratio


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
    _ratios: dict[tuple[float, float], float | None] = field(default_factory=dict, init=False, repr=False)
    _by_id: dict[int, Device] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.online = self.online or {d.node_id for d in self.devices}
        # Compute budgets are shares of the strongest device at setup; a stronger late joiner
        # simply gets the full model, and the budgets of the others stay as they were.
        self.reference_gflops = max((d.profile.gflops for d in self.devices), default=1.0)

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

    def public_batches(self, targets: torch.Tensor) -> Batches:
        """The public slice (derived, never shipped) paired with `targets`, e.g. teacher logits."""
        public, _ = split_public(len(self.dataset.y_train), self.config.public_size, self.config.seed)
        x = self.dataset.x_train[torch.from_numpy(public)]
        return Batches(x, targets, self.dataset, self.config.batch_size, seed=self.config.seed)

    def full_spec(self) -> ModelSpec:
        return ModelSpec(self.config.model, self.num_classes, self.image_shape[0])

    def train_config(self) -> TrainConfig:
        c = self.config
        return TrainConfig(c.local_epochs, c.batch_size, c.lr, c.momentum, c.weight_decay, c.augment, c.checkpoint)

    def cost(self, spec: ModelSpec, trainable: list[int] | None = None, checkpoint: bool = False) -> ModelCost:
        return model_cost(spec, self.image_shape, trainable, checkpoint)

    def peak_memory_mb(self, cost: ModelCost) -> float:
        return cost.peak_train_bytes(self.config.batch_size, self.image_shape) / MIB

    def job_cost(self, job: Job) -> ModelCost:
        return self.cost(job.model, job.trainable, job.train.checkpoint)

    def job_peak_memory_mb(self, job: Job) -> float:
        """Predicted peak memory of a job: its training step, plus the teacher it mimics, if any."""
        teacher = self.cost(job.mimic).state_bytes / MIB if job.mimic else 0.0
        return self.job_cost(job).peak_train_bytes(job.train.batch_size, self.image_shape) / MIB + teacher

    def flops_budget(self, device: Device) -> float:
        """Training FLOPs per sample `device` may spend: its share of the full model's.

        The share is its GFLOPS over the strongest device's, times `compute-slack`
        (1.0: a device gets the model it trains in the time the strongest trains the
        full one), capped at the full model. Infinite when `constraints` leaves compute out.
        """
        if "compute" not in self.config.constraints:
            return math.inf
        full = self.cost(self.full_spec()).train_flops_per_sample
        return full * min(1.0, self.config.compute_slack * device.profile.gflops / self.reference_gflops)

    def memory_budget_bytes(self, device: Device) -> float:
        """The device's memory budget in bytes; infinite when `constraints` leaves memory out."""
        return device.profile.memory_mb * MIB if "memory" in self.config.constraints else math.inf

    def affordable_ratio(self, device: Device) -> float | None:
        """The largest uniform channel ratio of the full model `device` can afford (None: not even the floor)."""
        key = (device.profile.gflops, device.profile.memory_mb)
        if key not in self._ratios:  # budgets depend on the profile only: price each one once
            self._ratios[key] = fit_ratio(self.full_spec(), self.image_shape, self.config.batch_size,
                                          self.flops_budget(device), self.memory_budget_bytes(device),
                                          self.config.min_keep_ratio)
        return self._ratios[key]

    def shortfall(self, cost: ModelCost, device: Device, extra_bytes: float = 0.0) -> str | None:
        """Why `device` cannot train a model of `cost` under the `constraints` policy (None: it can).

        The one fitting rule every strategy uses: predicted peak training memory at `batch-size`
        (+ `extra_bytes`, e.g. a teacher held beside it) within the memory budget, and training
        FLOPs per sample within the compute budget (`flops_budget`), each only when
        `constraints` includes it. The text names the resource and the key that relaxes it.
        """
        peak = cost.peak_train_bytes(self.config.batch_size, self.image_shape) + extra_bytes
        if peak > self.memory_budget_bytes(device):
            return (f"memory: needs {peak / MIB:.1f} MB at batch {self.config.batch_size}, has "
                    f"{device.profile.memory_mb:.1f} MB (lower batch-size, or constraints = 'compute')")
        if cost.train_flops_per_sample > self.flops_budget(device) * (1 + 1e-9):
            return (f"compute: needs {cost.train_flops_per_sample / 1e6:.1f} MFLOPs per sample, its share is "
                    f"{self.flops_budget(device) / 1e6:.1f} (raise compute-slack, or constraints = 'memory')")
        return None

    def fits(self, cost: ModelCost, device: Device) -> bool:
        """Whether `device` can afford training a model of `cost` (`shortfall` is None)."""
        return self.shortfall(cost, device) is None

    def job_shortfall(self, job: Job, device: Device) -> str | None:
        """`shortfall` of a planned job: its model and trainable blocks, plus the teacher it mimics."""
        teacher = self.cost(job.mimic).state_bytes if job.mimic else 0.0
        return self.shortfall(self.job_cost(job), device, teacher)

    def affordable_ratios(self, devices: list[Device] | None = None) -> tuple[dict[int, float], dict[int, str]]:
        """(node id -> affordable channel ratio, node id -> why it cannot afford even the floor)."""
        ratios, left_out = {}, {}
        for d in self.devices if devices is None else devices:
            ratio = self.affordable_ratio(d)
            if ratio is None:
                floor = self.full_spec().with_widths(widths_at_ratio(self.full_spec(), self.config.min_keep_ratio))
                left_out[d.node_id] = (f"cannot afford even the smallest submodel (min-keep-ratio "
                                       f"{self.config.min_keep_ratio}): {self.shortfall(self.cost(floor), d)}")
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
            raise StrategySetupError(f"{self.name}: no device can afford even the smallest submodel "
                                     f"(min-keep-ratio {self.federation.config.min_keep_ratio}); lower it")
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


def weighted_average(states: list[dict[str, torch.Tensor]], weights: list[float],
                     reference: dict[str, torch.Tensor], aggregation: str = "mean") -> dict[str, torch.Tensor]:
    """Fold whole-tensor states held by every client into `reference` (the current global state, the
    origin of clipping) by run-config `aggregation` (`fl_app.aggregation`; "mean": the `weights`-weighted
    average); integer counters take the maximum. Returns the names the states hold."""
    folded = fold_states(reference, states, weights, Aggregation.parse(aggregation))
    return {name: folded[name] for name in states[0]}
