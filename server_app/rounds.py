"""Talking to nodes: the device query, and sending a round's tasks with every reply validated.

Nothing a client sends reaches a strategy unchecked: a reply must be what its job
asked for (the record, the tensor names and shapes the job's model implies) with
finite values and a sane report; otherwise it is rejected and recorded against that
client, and the round goes on with the others.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fl_app.models import build_model
from fl_app.profiles import ProfileError, profile_from_dict
from fl_app.wire import decode, encode, serialized_bytes
from server_app.strategies.base import ClientUpdate, Device, TrainTask


class ReplyRejected(ValueError):
    """A reply that does not match its job."""


@dataclass
class TaskOutcome:
    task: TrainTask
    bytes_down: int  # the whole message content, exactly as serialized
    bytes_down_by_record: dict[str, int]  # the same, per record ("weights", "soft-labels", ...)
    bytes_up: int = 0
    bytes_up_by_record: dict[str, int] = field(default_factory=dict)
    update: ClientUpdate | None = None
    error: str | None = None
    error_code: int | None = None  # as the client sent it, for errors the client reported


def query_devices(grid: Grid, node_ids: Iterable[int], timeout: float) -> tuple[list[Device], list[str]]:
    """Ask every node for its device report; (devices, problems with the nodes left out)."""
    messages = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in node_ids]
    devices, problems = [], []
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            problems.append(f"node {node}: {reply.error.reason}")
            continue
        try:
            r = dict(reply.content["device"])
            profile = profile_from_dict({"name": r["profile"], **{k: r[k] for k in (
                "gflops", "memory_mb", "uplink_mbps", "downlink_mbps")}}, f"reported by node {node}")
            devices.append(Device(node, int(r["partition_id"]), profile, int(r["num_examples"])))
        except (KeyError, TypeError, ValueError, ProfileError) as exc:
            problems.append(f"node {node}: malformed device report ({exc})")
    return sorted(devices, key=lambda d: d.partition_id), problems


def run_train_tasks(grid: Grid, tasks: list[TrainTask], public_size: int,
                    timeout: float | None = None) -> list[TaskOutcome]:
    """Send every task, wait for the replies, and validate each against its job."""
    outcomes: dict[int, TaskOutcome] = {}
    messages = []
    for task in tasks:
        content = RecordDict({"job": ConfigRecord({"json": task.job.to_json()})})
        for name, tensors in {"weights": task.weights, **task.extra}.items():
            if tensors:
                content[name] = encode(tensors, task.job.encoding)
        outcomes[task.node_id] = TaskOutcome(task, serialized_bytes(content), _bytes_by_record(content))
        messages.append(Message(content, dst_node_id=task.node_id, message_type="train"))
    for reply in grid.send_and_receive(messages, timeout=timeout):
        outcome = outcomes.get(reply.metadata.src_node_id)
        if outcome is None:
            log(WARNING, "ignoring a reply from node %s, which was sent no task", reply.metadata.src_node_id)
            continue
        if reply.has_error():
            outcome.error, outcome.error_code = reply.error.reason, reply.error.code
            continue
        outcome.bytes_up = serialized_bytes(reply.content)
        outcome.bytes_up_by_record = _bytes_by_record(reply.content)
        try:
            outcome.update = validate_reply(outcome.task, reply.content, public_size)
        except ReplyRejected as exc:
            outcome.error = f"rejected: {exc}"
            log(WARNING, "round %d: rejected the reply of node %d: %s", outcome.task.job.round,
                outcome.task.node_id, exc)
    for outcome in outcomes.values():
        if outcome.update is None and outcome.error is None:
            outcome.error = "no reply"
    return list(outcomes.values())


def _bytes_by_record(content: RecordDict) -> dict[str, int]:
    return {name: serialized_bytes(RecordDict({name: record})) for name, record in content.items()}


def expected_shapes(task: TrainTask, public_size: int) -> dict[str, tuple[int, ...]]:
    """The tensors a correct reply to `task` holds: the trained blocks' state, or public-slice logits."""
    job = task.job
    if job.returns == "logits":
        return {"logits": (public_size, job.model.num_classes)}
    with torch.device("meta"):
        model = build_model(job.model)
    blocks = set(range(len(model.blocks))) if job.trainable is None else set(job.trainable)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if int(k.split(".")[1]) in blocks}


def validate_reply(task: TrainTask, content: RecordDict, public_size: int) -> ClientUpdate:
    record_name = task.job.returns
    if record_name not in content or "report" not in content:
        raise ReplyRejected(f"expected records {record_name!r} and 'report', got {sorted(content.keys())}")
    try:
        tensors = decode(content[record_name])
    except Exception as exc:  # any undecodable payload is the client's fault, not ours
        raise ReplyRejected(f"undecodable {record_name!r} record ({type(exc).__name__}: {exc})") from exc
    expected = expected_shapes(task, public_size)
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ReplyRejected(f"wrong tensor names: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != expected[name]:
            raise ReplyRejected(f"{name}: shape {tuple(tensor.shape)}, expected {expected[name]}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ReplyRejected(f"{name}: contains NaN or Inf")
    metrics = dict(content["report"])
    n = metrics.get("num-examples")
    if not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0:
        raise ReplyRejected(f"report num-examples = {n!r}, expected a positive number")
    return ClientUpdate(task.node_id, task.job, tensors, int(n), _floats(metrics))


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
