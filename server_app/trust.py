"""FLTrust's root updates: the server runs each weight job itself on its root dataset and scores the replies.

FLTrust (Cao, Fang, Liu and Gong, "FLTrust: Byzantine-robust Federated Learning via Trust Bootstrapping",
NDSS 2021) gives the server a small clean dataset and trusts a client's update as far as it points where
the server's own update on that data points. Here the root dataset is the public slice (held out of every
client's data; its labels are the server's) and the server's update is the client's own job — the same
submodel, trainable blocks, teacher and start weights — so a width-scaled, depth-scaled or block-wise
client is compared with exactly the step it was asked to take. The score and normalisation are
`fl_app.aggregation.trust_normalised`; strategies then fold with the score as the update's weight. REFT's
clients send predictions on the root dataset itself, scored against its labels (`label_trust`).
`fltrust:labels` also refuses an update one local step along which gives the root set's labels less
probability (`label_shift`; our extension).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from fl_app.aggregation import LABEL_CHECK_Z, Aggregation, label_probability_change, label_trust, trust_normalised
from fl_app.data import Batches
from fl_app.job import Job, reply_state
from fl_app.models import ModelSpec, build_model
from fl_app.seeds import torch_generator
from fl_app.training import TrainingDiverged, predict_logits, train
from server_app.strategies.base import ClientUpdate, Device, Federation, Strategy, TrainTask


class RootStepDiverged(RuntimeError):
    """The server's own training on the public slice diverged: the run's learning rate is too high."""


def scored_updates(strategy: Strategy, federation: Federation, tasks: dict[int, TrainTask],
                   updates: list[ClientUpdate]) -> tuple[list[ClientUpdate], dict[str, float]]:
    """Each weight update scored and normalised against the root update of its own task (`tasks`: node
    id -> the task it answered); logit updates (REFT's predictions on the public slice) are scored by
    `label_trust`. Tasks with the same job, start weights and node example count share one root run.
    Returns (the updates, node id as text -> trust in [0, 1])."""
    roots: dict[Any, dict[str, torch.Tensor]] = {}
    before: dict[Any, torch.Tensor] = {}  # fltrust:labels: the root set's logits at the job's start weights
    scored, scores = [], {}
    labels = federation.public_labels()
    aggregation = Aggregation.parse(federation.config.aggregation)
    root_set = RootSet.of(federation, labels) if aggregation.labels else None
    for update in updates:
        task = tasks[update.node_id]
        if task.job.returns == "logits":  # predictions on the root dataset itself: scored by its labels
            trust = label_trust(update.tensors["logits"], labels)
            scores[str(update.node_id)] = round(trust, 4)
            scored.append(replace(update, trust=trust))
            continue
        start = strategy.start_weights(task, task.job.model)
        device = federation.device(task.node_id)
        key = (task.job.to_json(), device.num_examples if device else None,
               tuple(sorted((k, v.data_ptr()) for k, v in start.items())))
        if key not in roots:
            roots[key] = root_update(strategy, federation, task, start)
            if root_set:  # the predictions every update of this job moves from
                before[key] = root_set.logits(task.job.model, start)
        trust, tensors = trust_normalised(start, update.tensors, roots[key])
        shift = label_shift(root_set, task, device, start, update.tensors, before[key]) if root_set else None
        if shift is not None and label_refusal(shift):
            trust = 0.0
        scores[str(update.node_id)] = round(trust, 4)
        scored.append(replace(update, tensors=tensors, trust=trust, label_shift=shift))
    return scored, scores


@dataclass(frozen=True)
class RootSet:
    """The root dataset as fltrust:labels evaluates on it, derived once per round: the public slice's
    normalised inputs `x` [P, C, H, W] and its labels [P] (the order of `Federation.public_labels`)."""

    x: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def of(cls, federation: Federation, labels: torch.Tensor) -> RootSet:
        return cls(federation.dataset.normalize(federation.public_batches(labels).x), labels)

    def logits(self, spec: ModelSpec, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """The [P, classes] logits of the model `spec` at `weights` on the root set, in eval mode."""
        return predict_logits(_built(spec, weights), self.x)


def label_shift(root_set: RootSet, task: TrainTask, device: Device | None, start: dict[str, torch.Tensor],
                sent: dict[str, torch.Tensor], before: torch.Tensor) -> tuple[float, float]:
    """fltrust:labels's measurement of one reply: (mean, standard error) of the change in the probability
    the job's submodel gives the root set's labels (`label_probability_change`), from `before` (its
    [P, C] logits at `start`) to one local step along `sent` (`one_local_step`; `device`: the node's, for
    its verified example count). ProFL's mimic jobs are measured against the labels too: their target is
    the server's own teacher, whose predictions the labels judge."""
    step = one_local_step(task, start, sent, device)
    return label_probability_change(before, root_set.logits(task.job.model, step), root_set.labels)


def one_local_step(task: TrainTask, start: dict[str, torch.Tensor], update: dict[str, torch.Tensor],
                   device: Device | None) -> dict[str, torch.Tensor]:
    """`start` moved along `update` (as sent) by one local SGD step's share of it: 1 / the steps the job
    took (batches of its batch size over the node's verified examples, times its epochs), for every float
    tensor the update holds; integer tensors stay at `start`. fltrust:labels scores this point, the
    update's direction at the start, as Zeno scores a small step along a gradient: a whole local epoch
    evaluated alone overshoots (honest FedAvg clients' own models, MNIST, 300 images, lr 0.05, gave the
    root set's labels 0.1-0.3 less probability from round 4 on, while their fold improved the model)."""
    examples = device.num_examples if device else 1
    share = 1.0 / (max(1, -(-examples // task.job.train.batch_size)) * max(1, task.job.train.epochs))
    moved = {k: (start[k].double() + share * (t.double() - start[k].double())).to(t.dtype)
             for k, t in update.items() if t.is_floating_point()}
    return {**start, **moved}


def label_refusal(shift: tuple[float, float]) -> bool:
    """fltrust:labels's rule on (mean, standard error) from `label_probability_change`: refused when the
    update lowers the probability of the root set's labels by more than LABEL_CHECK_Z standard errors."""
    change, error = shift
    return change < -LABEL_CHECK_Z * error


def label_refused(updates: list[ClientUpdate]) -> dict[str, dict[str, float]]:
    """Under fltrust:labels, node id as text -> {"change", "standard_error"} (`label_probability_change`)
    for each update refused because it lowered the probability of the root set's labels. Empty otherwise."""
    return {str(u.node_id): {"change": round(u.label_shift[0], 4), "standard_error": round(u.label_shift[1], 4)}
            for u in updates if u.label_shift is not None and label_refusal(u.label_shift)}


def root_update(strategy: Strategy, federation: Federation, task: TrainTask,
                start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`task`'s job run by the server on the public slice with its labels, from `start` (the weights the
    node started from): the reply an honest client holding the root dataset would send. It trains on as
    many examples per epoch as the node holds (the public slice cycled or cut to that count; the count is
    the server's own, `Device.num_examples`), so the root step is as long as the client's: FLTrust gives
    every update the root step's norm, and a root trained for more steps than the clients makes every
    round's step larger (public-size 500 against 300-image clients: ExclusiveFL fell from 0.88 to 0.43).
    Raises RootStepDiverged (one line) when the server's own training diverges."""
    job: Job = task.job
    model = _built(job.model, start)
    teacher = _built(job.mimic, strategy.start_weights(task, job.mimic)) if job.mimic else None
    try:
        train(model, root_batches(federation, task), job.train, job.trainable, None, teacher,
              job.mutual_distillation)
    except TrainingDiverged as exc:
        raise RootStepDiverged(f"round {job.round}: fltrust's root step on the public slice diverged ({exc}); "
                               f"the clients' steps will too at lr {job.train.lr:g}") from None
    return reply_state(job, model.state_dict())


def root_batches(federation: Federation, task: TrainTask) -> Batches:
    """The public slice with its labels, cycled or cut to the examples per epoch `task`'s node holds
    (a fresh draw each round, so the whole slice serves over the rounds)."""
    public = federation.public_batches(federation.public_labels(), task.job.train.batch_size, seed=task.job.round)
    device = federation.device(task.node_id)
    count = device.num_examples if device else len(public)
    order = torch.randperm(len(public), generator=torch_generator(task.job.round))
    index = order[torch.arange(count) % len(public)]
    return Batches(public.x[index], public.y[index], public.dataset, public.batch_size, seed=public.seed)


def _built(spec: ModelSpec, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = build_model(spec)
    model.load_state_dict({k: weights[k] for k in model.state_dict()}, strict=True)
    return model
