"""A job: everything a client needs to run one round's work, and nothing about the strategy.

The server plans jobs; the ClientApp executes them. A job travels as JSON inside a
ConfigRecord, beside the tensors it refers to.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch

from fl_app.models import ModelSpec, full_widths, num_blocks
from fl_app.training import TrainConfig

RETURNS = ("weights", "logits")

# Error codes of a client's error reply, so the server can tell failures apart.
ERROR_OOM, ERROR_BAD_INPUT, ERROR_MISSING_WEIGHTS = 1001, 1002, 1003


_OMITTED_AT_DEFAULT = {"mutual_distillation": 0.0}

# What a client agrees to run whoever asks (`check_bounds`): the server plans jobs, but a device must not
# be told to train for days or to build a model wider than its architecture (issue 22). The run config's
# own checks (fl_app.config) hold local-epochs and batch-size to the same ceilings, so a run that would be
# refused here is refused at its start instead.
MAX_EPOCHS = 100         # local and distillation epochs of one job
MAX_BATCH_SIZE = 4096    # examples per step


class JobError(ValueError):
    """A job that cannot be run as written."""


class MissingWeights(JobError):
    """The job relies on weights this node never received or did not keep."""


@dataclass(frozen=True)
class Job:
    """One unit of client work.

    - `model`: the (sub)model to build; the weights it needs arrive in the "weights" record.
    - `trainable`: block indices to train (None = all); the rest stays frozen.
    - `returns`: "weights" (the trainable part) or "logits" (on the public slice).
    - `enforce_memory`: False lets an emulated device exceed its memory budget (FedAvg's
      upper bound pretends every device fits); True makes it fail as a real one would. Only a
      simulated node (its profile from the run config) obeys False: a SuperNode whose own node
      config names its profile always enforces it (client_app.client_app._train).
    - `distill_epochs`/`temperature`: first distill the "soft-labels" record into the
      model on the public slice (REFT), then train on private data.
    - `keep_state`: the client keeps its model state for later rounds; weights it is
      not sent again come from what it kept (REFT's submodel, ProFL's frozen blocks).
    - `evaluate`: also report the trained model's accuracy on the node's test share.
    - `mimic`: instead of the labels, train to reproduce the logits of this teacher model
      (MSE), built from kept weights plus the "teacher-weights" record (ProFL's shrinking).
    - `mutual_distillation`: for a model with exits (`ModelSpec.exits`), the temperature at which
      its heads distill each other while training (`fl_app.training.exits_loss`, DepthFL's
      mutual self-distillation); 0 = every head learns from the labels alone.

    Fields added later (`_OMITTED_AT_DEFAULT`) are left out of the JSON at their default, so a
    job that does not use them serializes, and counts in a message's bytes, exactly as before.
    """

    round: int
    model: ModelSpec
    train: TrainConfig = field(default_factory=TrainConfig)
    trainable: list[int] | None = None
    returns: str = "weights"
    encoding: str = "fp32"
    enforce_memory: bool = True
    distill_epochs: int = 0
    temperature: float = 1.0
    keep_state: bool = False
    evaluate: bool = False
    mimic: ModelSpec | None = None
    mutual_distillation: float = 0.0

    def to_json(self) -> str:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        d["mimic"] = self.mimic.to_dict() if self.mimic else None
        for name, default in _OMITTED_AT_DEFAULT.items():
            if d[name] == default:
                del d[name]
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Job:
        try:
            d = json.loads(text)
            d["model"] = ModelSpec(**d["model"])
            d["train"] = TrainConfig(**d["train"])
            d["mimic"] = ModelSpec(**d["mimic"]) if d.get("mimic") else None
            job = cls(**d)
        except (TypeError, KeyError, ValueError) as exc:
            raise JobError(f"malformed job: {exc}") from exc
        if job.returns not in RETURNS:
            raise JobError(f"job asks to return {job.returns!r}; valid: {', '.join(RETURNS)}")
        if job.mutual_distillation < 0 or (job.mutual_distillation and not job.model.exits):
            raise JobError(f"mutual_distillation = {job.mutual_distillation}: needs a model with exits and a "
                           "temperature > 0 (0 turns it off)")
        check_bounds(job)
        return job


def check_bounds(job: Job) -> None:
    """Refuse (JobError, one line) a job no client should run, whoever sent it: epochs outside
    [1, MAX_EPOCHS] (distillation: [0, MAX_EPOCHS]), a batch outside [1, MAX_BATCH_SIZE], a learning
    rate, momentum, weight decay or temperature that is not a finite number in its range, a model (or
    mimic teacher) wider than its architecture's full widths or deeper than its blocks, or trainable
    blocks the model does not have."""
    t = job.train
    numbers = {"lr": t.lr, "momentum": t.momentum, "weight_decay": t.weight_decay, "temperature": job.temperature,
               "mutual_distillation": job.mutual_distillation}
    problems = [f"{k} = {v!r} is not a finite number" for k, v in numbers.items()
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)]
    for name, value, low in (("epochs", t.epochs, 1), ("distill_epochs", job.distill_epochs, 0)):
        if not isinstance(value, int) or not low <= value <= MAX_EPOCHS:
            problems.append(f"{name} = {value!r} outside [{low}, {MAX_EPOCHS}]")
    if not isinstance(t.batch_size, int) or not 1 <= t.batch_size <= MAX_BATCH_SIZE:
        problems.append(f"batch_size = {t.batch_size!r} outside [1, {MAX_BATCH_SIZE}]")
    if not problems and not (t.lr > 0 and 0 <= t.momentum < 1 and t.weight_decay >= 0 and job.temperature > 0):
        problems.append(f"lr = {t.lr}, momentum = {t.momentum}, weight_decay = {t.weight_decay}, temperature = "
                        f"{job.temperature}: need lr > 0, 0 <= momentum < 1, weight_decay >= 0, temperature > 0")
    for role, spec in (("model", job.model), ("mimic", job.mimic)):
        if spec is not None:
            problems += _spec_problems(role, spec)
    blocks = _blocks_or_none(job.model)
    if job.trainable is not None and blocks is not None and \
            not all(isinstance(i, int) and 0 <= i < blocks for i in job.trainable):
        problems.append(f"trainable = {job.trainable!r}: block indices of {job.model.name!r} are 0..{blocks - 1}")
    if problems:
        raise JobError("job refused, outside what this client runs: " + "; ".join(problems))


def _blocks_or_none(spec: ModelSpec) -> int | None:
    try:
        return num_blocks(spec.name)
    except ValueError:
        return None


def _spec_problems(role: str, spec: ModelSpec) -> list[str]:
    """Why `spec` is not a (sub)model of its own architecture: unknown name, widths above full, depth."""
    blocks = _blocks_or_none(spec)
    if blocks is None:
        return [f"{role} {spec.name!r} is not a model this client knows"]
    full = full_widths(spec.name)
    problems = [f"{role} width {g} = {w!r} outside [1, {full[g]}]" if g in full else f"{role} has no width group {g!r}"
                for g, w in spec.widths.items()
                if g not in full or not isinstance(w, int) or isinstance(w, bool) or not 1 <= w <= full[g]]
    if not isinstance(spec.depth, int) or not 0 <= spec.depth <= blocks:
        problems.append(f"{role} depth = {spec.depth!r} outside [0, {blocks}]")
    return problems


def reply_state(job: Job, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a "weights" reply to `job` holds: the entries of `state` (a state dict of the job's
    model, names `blocks.<i>.…`) that belong to the trained blocks, all of them if
    `trainable` is None. The client selects its reply with it and the server derives the
    tensors it expects with it, so the two can never disagree."""
    def trained(name: str) -> bool:
        return job.trainable is None or int(name.split(".")[1]) in job.trainable
    return {k: v for k, v in state.items() if trained(k)}


def train_report(num_examples: int, train_loss: float, train_seconds: float, peak_memory_mb: float,
                 test: tuple[float, float] | None = None) -> dict[str, int | float]:
    """The report a client sends beside a train reply (a MetricRecord): examples trained on (epochs
    included), mean training loss, wall seconds of training, measured peak memory (MB = 2^20 bytes)
    and, for a job that evaluates on a node with a test share, (accuracy, loss) on it. The planner
    (server_app.plan) sizes replies with the same keys, so a reply's predicted bytes stay exact."""
    report: dict[str, int | float] = {"num-examples": num_examples, "train-loss": train_loss,
                                      "train-seconds": train_seconds, "peak-memory-mb": peak_memory_mb}
    if test is not None:
        report["test-accuracy"], report["test-loss"] = test
    return report
