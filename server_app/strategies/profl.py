"""ProFL (Wu et al., KDD'25): progressive block-wise training under device memory budgets."""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass
from functools import lru_cache
from logging import WARNING
from typing import Any

import torch
from flwr.common.logger import log

from fl_app.job import Job
from fl_app.models import BlockNet, ModelSpec, build_model, num_blocks
from server_app.strategies.base import (ClientUpdate, Device, Federation, Strategy, StrategySetupError, TrainTask,
                                        nobody_fits, weighted_average)

EM_COORDINATES = 10_000  # the authors' scripts track a fixed random sample of at most this many
EM_WINDOWS_RECORDED = (2, 3, 4, 5, 6)  # each growing round records EM over these windows too


@dataclass(frozen=True)
class Step:
    """One step of the schedule: which model is trained, what part of it, and how."""

    stage: str  # "shrink" (back to front) or "grow" (front to back)
    block: int  # 1-based index of the block the step is about
    kind: str  # "train" (cross-entropy) or "mimic" (output module reproduces the model with the block)
    rounds: int = 0  # a shrinking step's length in rounds (growing steps end by EM or their cap)

    @property
    def depth(self) -> int:
        """The depth of the model the step trains: a mimic step trains the shorter model."""
        return self.block - 1 if self.kind == "mimic" else self.block

    def trainable(self, total: int) -> list[int]:
        depth = self.depth
        if self.kind == "mimic":
            return [depth]  # the output module that stands in for `block`
        return [depth - 1] + ([depth] if depth < total else [])  # the block and its output module


def shrink_schedule(blocks: int, rounds: int, share: float) -> list[Step]:
    """The shrinking stage for a model of `blocks` blocks in a run of `rounds` rounds: its steps (train
    block t, then mimic it with output module t-1, for t = blocks..2) share floor(`share` x `rounds`)
    rounds as evenly as possible, earlier steps first; a step left with no round is skipped. At least
    one round per block is always left for growing, so every run trains every block and ends by
    evaluating the full model."""
    steps = [(t, kind) for t in range(blocks, 1, -1) for kind in ("train", "mimic")]
    budget = max(0, min(math.floor(share * rounds + 1e-9), rounds - blocks))
    lengths = [budget // len(steps) + (i < budget % len(steps)) for i in range(len(steps))] if steps else []
    return [Step("shrink", t, kind, n) for (t, kind), n in zip(steps, lengths) if n > 0]


def growth_cap(rounds_left: int, blocks_left: int, cap: int) -> int:
    """Rounds block t may grow before it is frozen whatever its effective movement: an even share of the
    rounds left (this one included) among the blocks left (this one included), so every block is trained
    by the end of any run; at most `cap` when `block-round-cap` sets one (> 0)."""
    share = max(1, rounds_left // max(1, blocks_left))
    return min(share, cap) if cap > 0 else share


def part_of(name: str) -> str:
    """The unit of versioning a state-dict entry belongs to: a block, or an output module."""
    _, index, kind, *_ = name.split(".")
    return f"output{index}" if kind in ("basic", "head") else f"block{index}"


def effective_movement(history: list[torch.Tensor], window: int) -> float | None:
    """EM = ||a_i - a_(i-W)||_1 / sum_(k<W) ||a_(i-k) - a_(i-k-1)||_1, in [0, 1].

    Near 1: the parameters move steadily in one direction; near 0: they oscillate in
    place, i.e. the block has converged. None until W+1 snapshots exist: the block as its
    growing step started, and after each of its first W rounds.
    """
    if len(history) <= window:
        return None
    recent = history[-window - 1:]
    path = sum(float((b - a).abs().sum()) for a, b in zip(recent, recent[1:]))
    return float((recent[-1] - recent[0]).abs().sum()) / path if path > 0 else 0.0


class ProFL(Strategy):
    """Progressive training: every round trains one block, so weak devices fit and take part.

    Shrinking (blocks T..2, `shrink_schedule`: `profl-shrink-share` of the rounds): train block t
    with its output module while the blocks in front stay frozen at their initialisation, then
    train the output module of t-1, whose first basic layer replaces block t, to mimic the model
    that still has block t (MSE on logits). This yields initial weights for every block and an
    output module for each. The model evaluated meanwhile is the step's: blocks 1..t (those in
    front still at their initialisation) and output module t; each round's record says so.
    Growing (blocks 1..T): train block t with its output module, the blocks in front frozen;
    freeze it when its effective movement stays below `em-threshold` for `em-patience` rounds, or
    after its cap (`growth_cap`: an even share of the rounds left), then move on. The last block
    trains until the run ends, so every run ends with every block trained and the full model
    evaluated.

    Each round only devices whose memory (and, with `emulated-deadline`, device time) fits the
    step are sampled (`Federation.job_shortfall`). A frozen block travels to a device once; the
    device keeps it.
    """

    name = "profl"

    def __init__(self, federation: Federation) -> None:
        super().__init__(federation)
        config = federation.config
        spec = federation.full_spec()
        self.total = num_blocks(spec.name)
        if config.num_server_rounds < self.total:  # a smoke test may be this short; say what it leaves out
            first = config.num_server_rounds + 1
            left = f"block {first}" if first == self.total else f"blocks {first}-{self.total}"
            log(WARNING, "profl grows one block per round at least and %s has %d blocks: %d rounds leave %s "
                "untrained and the full model never evaluated; set num-server-rounds to at least %d",
                spec.name, self.total, config.num_server_rounds, left, self.total)
        torch.manual_seed(config.seed)
        self.weights: dict[str, torch.Tensor] = dict(build_model(spec).state_dict())
        for depth in range(1, self.total):  # every output module, freshly initialised
            self.weights.update({k: v for k, v in build_model(spec.with_depth(depth)).state_dict().items()
                                 if part_of(k) == f"output{depth}"})
        self.schedule = shrink_schedule(self.total, config.num_server_rounds, config.profl_shrink_share)
        self.grow_block = 1
        self.rounds_in_block = 0
        self.cap = 0  # the growing block's cap, set as it starts (growth_cap)
        self.calm_rounds = 0
        self.history: list[torch.Tensor] = []
        self.sample_index: torch.Tensor | None = None
        self.version: dict[str, int] = {}  # part -> version of the server's copy
        self.held: dict[int, dict[str, int]] = {}  # node -> part -> version it keeps (-1: its own local copy)
        self.step = self._next_step()
        self.trained_step: Step | None = None  # the step of the last round folded: what global_model() is
        self.eligible: list[Device] = []
        if not any(self._fits(d, self.step) for d in federation.devices):
            job = self.job(0, self.step)
            raise StrategySetupError(nobody_fits("profl", f"its first step ({self.step.stage} block {self.step.block})",
                                                 {d.node_id: federation.job_shortfall(job, d) or ""
                                                  for d in federation.devices}))

    # --- schedule ---------------------------------------------------------------------------

    def _next_step(self) -> Step:
        if self.schedule:
            return self.schedule.pop(0)
        return Step("grow", self.grow_block, "train")

    def spec(self, step: Step) -> ModelSpec:
        return self.federation.full_spec().with_depth(step.depth)

    def job(self, server_round: int, step: Step) -> Job:
        teacher = self.federation.full_spec().with_depth(step.block) if step.kind == "mimic" else None
        return Job(round=server_round, model=self.spec(step), train=self.federation.train_config(),
                   trainable=step.trainable(self.total), encoding=self.federation.config.encoding,
                   keep_state=True, mimic=teacher)

    def _fits(self, device: Device, step: Step) -> bool:
        """Whether `device` can run `step` under the federation's one fitting rule (memory, deadline)."""
        return self.federation.job_shortfall(self.job(0, step), device) is None

    # --- the round ----------------------------------------------------------------------------

    def configure_train(self, server_round: int) -> list[TrainTask]:
        step = self.step
        if step.kind == "mimic" and self.rounds_in_block == 0:
            self._init_output_module(step.block - 1)
        if step.stage == "grow" and not self.history:  # EM's first point: the block as growing starts
            self.history.append(self._active_parameters())
            self.cap = growth_cap(self.federation.config.num_server_rounds - server_round + 1,
                                  self.total - step.block + 1, self.federation.config.block_round_cap)
        self.eligible = [d for d in self.federation.devices if self._fits(d, step)]
        job = self.job(server_round, step)
        return [self._task(d.node_id, job) for d in self.federation.sample(self.eligible)]

    def _task(self, node: int, job: Job) -> TrainTask:
        trainable = {part_of(k) for k in build_model_keys(job.model) if int(k.split(".")[1]) in job.trainable}
        weights = self._missing(node, build_model_keys(job.model), always=trainable)
        extra = {}
        if job.mimic is not None:
            extra["teacher-weights"] = self._missing(node, build_model_keys(job.mimic), always=set(),
                                                     skip=set(weights))
        return TrainTask(node, job, weights, extra, info={"stage": self.step.stage, "active_block": self.step.block})

    def _missing(self, node: int, keys: list[str], always: set[str], skip: set[str] = frozenset()) -> dict:
        """The entries of `keys` the node does not hold at the server's version (plus `always` parts)."""
        held = self.held.get(node, {})
        return {k: self.weights[k] for k in keys if k not in skip
                and (part_of(k) in always or held.get(part_of(k)) != self.version.get(part_of(k), 0))}

    def start_weights(self, task: TrainTask, spec: ModelSpec) -> dict[str, torch.Tensor]:
        """A node holds every part it is not sent at the server's version (`_missing`), so the job starts
        from the server's weights for all of `spec`."""
        return {k: self.weights[k] for k in build_model_keys(spec)}

    def resend(self, task: TrainTask) -> TrainTask:
        """The node lost what it kept: forget our record of it and send everything the job needs."""
        self.held.pop(task.node_id, None)
        return self._task(task.node_id, task.job)

    def aggregate_train(self, server_round: int, updates: list[ClientUpdate]) -> dict[str, Any]:
        step = self.trained_step = self.step
        for u in updates:  # what each node now keeps: its model as sent, and its own copy of what it trained
            held = self.held.setdefault(u.node_id, {})
            for k in build_model_keys(u.job.model):
                held[part_of(k)] = self.version.get(part_of(k), 0)
            for k in u.tensors:
                held[part_of(k)] = -1
        if updates:
            averaged = weighted_average([u.tensors for u in updates], [u.fold_weight for u in updates],
                                        self.weights, self.federation.config.aggregation)
            self.weights.update(averaged)
            for part in {part_of(k) for k in averaged}:
                self.version[part] = self.version.get(part, 0) + 1
        self.rounds_in_block += 1
        record = {"stage": step.stage, "active_block": step.block, "step": step.kind,
                  "evaluated": evaluated_model(step, self.total),
                  "eligible": len(self.eligible), "eligible_nodes": [d.node_id for d in self.eligible],
                  "effective_movement": None, "frozen": False, "freeze_reason": None, "em_at_freeze": None,
                  "block_cap": self.cap if step.stage == "grow" else None}
        if step.stage == "grow":
            record.update(self._track_movement(updates))
        elif self.rounds_in_block >= step.rounds:
            self._advance()
        return record

    def _active_parameters(self) -> torch.Tensor:
        """The active block's trainable parameters (not BatchNorm's running statistics), at a fixed
        random sample of at most EM_COORDINATES coordinates, as the authors' scripts track them."""
        block = f"block{self.step.block - 1}"
        names = [k for k in parameter_keys(self.spec(self.step)) if part_of(k) == block]
        active = torch.cat([self.weights[k].flatten().float() for k in names])
        if self.sample_index is None:
            g = torch.Generator().manual_seed(self.federation.config.seed + self.step.block)
            self.sample_index = torch.randperm(len(active), generator=g)[:EM_COORDINATES]
        return active[self.sample_index].clone()

    def _track_movement(self, updates: list[ClientUpdate]) -> dict[str, Any]:
        """Append the active block's position, compute EM and decide a freeze: by EM when it stayed below
        `em-threshold` for `em-patience` rounds in a row, else by `block-round-cap`. The record says which."""
        config = self.federation.config
        self.history.append(self._active_parameters())
        em = effective_movement(self.history, config.em_window)
        self.calm_rounds = self.calm_rounds + 1 if em is not None and em < config.em_threshold else 0
        by_em = self.calm_rounds >= config.em_patience
        by_cap = self.rounds_in_block >= self.cap
        freeze = self.step.block < self.total and (by_em or by_cap)  # the last block trains to the end
        reason = ("em" if by_em else "cap") if freeze else None
        # EM over other windows from the same positions: what choosing em-window is measured with
        by_window = {w: effective_movement(self.history, w) for w in EM_WINDOWS_RECORDED}
        if freeze:
            self.grow_block += 1
            self._advance()
        return {"effective_movement": em, "frozen": freeze, "freeze_reason": reason,
                "em_at_freeze": em if freeze else None, "em_by_window": by_window}

    def _advance(self) -> None:
        self.step = self._next_step()
        self.rounds_in_block, self.calm_rounds = 0, 0
        self.history, self.sample_index = [], None

    def _init_output_module(self, depth: int) -> None:
        """Output module `depth` = a fresh basic layer for block depth+1, then output module depth+1's layers."""
        later = f"blocks.{depth + 1}."
        for key in [k for k in self.weights if part_of(k) == f"output{depth}"]:
            _, _, kind, *rest = key.split(".")
            if kind == "basic" and rest[0] == "0":
                continue  # the new basic layer keeps its fresh initialisation
            source = later + (f"basic.{int(rest[0]) - 1}." + ".".join(rest[1:]) if kind == "basic"
                              else "head." + ".".join(rest))
            if source in self.weights and self.weights[source].shape == self.weights[key].shape:
                self.weights[key] = self.weights[source].clone()
        self.version[f"output{depth}"] = self.version.get(f"output{depth}", 0) + 1

    def state_dict(self) -> dict[str, Any]:
        """Weights, schedule position and EM history; not `held` (a resumed run's nodes keep nothing)."""
        return {"weights": self.weights, "step": list(astuple(self.step)),
                "schedule": [list(astuple(s)) for s in self.schedule], "grow_block": self.grow_block,
                "rounds_in_block": self.rounds_in_block, "calm_rounds": self.calm_rounds, "cap": self.cap,
                "history": self.history, "sample_index": self.sample_index, "version": self.version,
                "trained_step": list(astuple(self.trained_step)) if self.trained_step else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights = dict(state["weights"])
        self.step = Step(*state["step"])
        self.schedule = [Step(*s) for s in state["schedule"]]
        self.grow_block, self.rounds_in_block = state["grow_block"], state["rounds_in_block"]
        self.calm_rounds, self.history = state["calm_rounds"], list(state["history"])
        self.cap = state["cap"]
        self.trained_step = Step(*state["trained_step"]) if state["trained_step"] else None
        self.sample_index, self.version = state["sample_index"], dict(state["version"])
        self.held = {}

    def global_model(self) -> BlockNet:
        """The model of the step the last round trained (before any round: the first step's), so a round
        that freezes block t is evaluated on what it trained, not on block t+1 at its initialisation."""
        model = build_model(self.spec(self.trained_step or self.step))
        model.load_state_dict({k: self.weights[k] for k in model.state_dict()})
        return model


def evaluated_model(step: Step, total: int) -> str:
    """What the server evaluates after a round of `step`, in words for the record: the step's model, and
    during shrinking which of its blocks are still at their initialisation."""
    def span(last: int) -> str:
        return "block 1" if last == 1 else f"blocks 1-{last}"
    depth = step.depth
    text = span(depth)
    untrained = (step.block - 1) if step.stage == "shrink" else 0  # shrinking: every block in front of t
    if untrained:
        text += " (at initialisation)" if untrained >= depth else f" ({span(untrained)} at initialisation)"
    return text + (f" + output module {depth}" if depth < total else "")


@lru_cache(maxsize=256)
def _keys(spec_json: str) -> tuple[str, ...]:
    with torch.device("meta"):
        return tuple(build_model(ModelSpec.from_json(spec_json)).state_dict())


@lru_cache(maxsize=256)
def _parameter_keys(spec_json: str) -> tuple[str, ...]:
    with torch.device("meta"):
        return tuple(name for name, _ in build_model(ModelSpec.from_json(spec_json)).named_parameters())


def parameter_keys(spec: ModelSpec) -> list[str]:
    """The state-dict names of `spec`'s trainable parameters (no buffers), meta device."""
    return list(_parameter_keys(spec.to_json()))


def build_model_keys(spec: ModelSpec) -> list[str]:
    """The state-dict names of `spec`'s model (built on the meta device: no memory, no compute)."""
    return list(_keys(spec.to_json()))

