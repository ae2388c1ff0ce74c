"""Talking to nodes: the device query, and sending a round's tasks with every reply validated.

Nothing a client sends reaches a strategy unchecked: a reply must be what its job
asked for (the record, the tensor names and shapes the job's model implies) with
finite values and a sane report; otherwise it is rejected and recorded against that
client, and the round goes on with the others.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fl_app.job import reply_state
from fl_app.models import build_model
from fl_app.profiles import ProfileError, profile_from_report
from fl_app.wire import decode, encode, serialized_bytes
from server_app.flower_errors import describe
from server_app.pricing import TaskPrice
from server_app.strategies.base import ClientUpdate, Device, TrainTask
from server_app.verify import QUERY_REPLY_BOUND, REASON_LIMIT, node_text, payload_bytes


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
    missed_deadline: bool = False  # no reply before the round deadline, real or emulated (server_app.clock)
    rejected: bool = False  # replied, but the reply failed validation
    dropped_out: bool = False  # its node went offline before the reply was due (server_app.clock)
    price: TaskPrice | None = None  # the task priced as its reply arrived (set by the clock; device_time_s)


def query_devices(grid: Grid, node_ids: Iterable[int],
                  timeout: float) -> tuple[list[Device], list[tuple[int, str]]]:
    """Ask every node for its device report; (devices, (node, problem) of each node that answered
    with an error or a malformed report). A node that does not answer within `timeout` is in neither."""
    messages = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in node_ids]
    devices, problems = [], []
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    to_node = destinations(messages)
    for reply in replies:
        node = to_node.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        if reply.has_error():
            problems.append((node, describe(reply.error.code, node_text(reply.error.reason, REASON_LIMIT))))
            continue
        size = payload_bytes(reply.content)  # from metadata, before anything is read
        if size > QUERY_REPLY_BOUND:
            problems.append((node, f"device report of {size} bytes exceeds the {QUERY_REPLY_BOUND} a report can take"))
            continue
        try:
            r = dict(reply.content["device"])
            if "profile" in r:  # a name that reaches logs and results.json
                r["profile"] = node_text(r["profile"])
            profile = profile_from_report(r, f"of node {node}")
            devices.append(Device(node, int(r["partition_id"]), profile, int(r["num_examples"]),
                                  int(r["num_partitions"])))
        except (KeyError, TypeError, ValueError, ProfileError) as exc:
            problems.append((node, f"malformed device report ({node_text(exc, REASON_LIMIT)})"))
    return sorted(devices, key=lambda d: d.partition_id), problems


def run_train_tasks(grid: Grid, tasks: list[TrainTask], public_size: int,
                    timeout: float | None = None) -> list[TaskOutcome]:
    """Send every task, wait up to `timeout` seconds for the replies, and validate each against its job.

    Replies that arrive after the deadline are never read: those nodes are recorded
    as having missed it (Flower drops the late replies with the expired messages).
    """
    outcomes: dict[int, TaskOutcome] = {}
    messages = []
    for task in tasks:
        content = task_content(task)
        outcomes[task.node_id] = TaskOutcome(task, serialized_bytes(content), _bytes_by_record(content))
        messages.append(Message(content, dst_node_id=task.node_id, message_type="train"))
    answered: set[int] = set()
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    to_node = destinations(messages)
    for reply in replies:
        node = to_node.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        outcome = outcomes.get(node)
        if outcome is None or node in answered:
            log(WARNING, "ignoring a reply from node %s, which was sent no task or already replied", node)
            continue
        answered.add(node)
        if reply.has_error():
            outcome.error = describe(reply.error.code, node_text(reply.error.reason, REASON_LIMIT))
            outcome.error_code = reply.error.code
            continue
        # Sized from metadata first: a reply larger than its job can produce is never copied to be counted.
        size = payload_bytes(reply.content)
        within = size <= reply_size_bound(expected_tensors(outcome.task, public_size))
        outcome.bytes_up = serialized_bytes(reply.content) if within else size
        outcome.bytes_up_by_record = _bytes_by_record(reply.content) if within else {}
        try:
            if reply.metadata.message_type != "train":
                raise ReplyRejected(f"message type {node_text(reply.metadata.message_type)!r}, expected 'train'")
            outcome.update = validate_reply(outcome.task, reply.content, public_size, size)
        except ReplyRejected as exc:
            outcome.error, outcome.rejected = f"rejected: {exc}", True
            log(WARNING, "round %d: rejected the reply of node %d: %s", outcome.task.job.round, node, exc)
    for outcome in outcomes.values():
        if outcome.task.node_id not in answered:
            outcome.missed_deadline = timeout is not None
            outcome.error = f"no reply within the round deadline ({timeout:g} s)" if timeout else "no reply"
    return list(outcomes.values())


def task_content(task: TrainTask,
                 encoder: Callable[[dict[str, torch.Tensor], str], ArrayRecord] = encode) -> RecordDict:
    """The content of `task`'s message: the job as JSON, and each non-empty tensor record ("weights",
    then the task's extras) encoded by `encoder` in the job's encoding. The planner (server_app.plan)
    sizes planned messages through this too, with an encoder that reuses records of equal layout."""
    content = RecordDict({"job": ConfigRecord({"json": task.job.to_json()})})
    for name, tensors in {"weights": task.weights, **task.extra}.items():
        if tensors:
            content[name] = encoder(tensors, task.job.encoding)
    return content


def destinations(sent: list[Message]) -> dict[str, int]:
    """Message id -> the node it went to (ids are set when the grid pushes the messages).

    A reply answers for the destination of the message it replies to, not simply its
    sender: when a node is unavailable the SuperLink itself sends the error reply, from
    its own node id."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}


def _bytes_by_record(content: RecordDict) -> dict[str, int]:
    return {name: serialized_bytes(RecordDict({name: record})) for name, record in content.items()}


def expected_tensors(task: TrainTask, public_size: int) -> dict[str, tuple[tuple[int, ...], bool]]:
    """The tensors a correct reply to `task` holds, name -> (shape, is floating point): the trained
    blocks' state (`fl_app.job.reply_state`, the rule the client follows too), or public-slice logits."""
    job = task.job
    if job.returns == "logits":
        return {"logits": ((public_size, job.model.num_classes), True)}
    with torch.device("meta"):
        model = build_model(job.model)
    return {k: (tuple(v.shape), v.is_floating_point()) for k, v in reply_state(job, model.state_dict()).items()}


def reply_size_bound(expected: dict[str, tuple[tuple[int, ...], bool]]) -> int:
    """The most bytes a correct reply can take: every tensor at 8 bytes per value, plus the report and
    framing (generous: fp32 replies take half of it; the point is to refuse before decoding)."""
    return 8 * sum(math.prod(shape) for shape, _ in expected.values()) + 64 * len(expected) + 65536


def validate_reply(task: TrainTask, content: RecordDict, public_size: int, size: int | None = None) -> ClientUpdate:
    """The reply as an update, or ReplyRejected naming what is wrong: records, size, tensor names,
    shapes, dtypes, finite values, and a report whose num-examples is within what the node holds."""
    record_name = task.job.returns
    if record_name not in content or "report" not in content:
        raise ReplyRejected(f"expected records {record_name!r} and 'report', got "
                            f"{[node_text(k) for k in sorted(content.keys())[:5]]}")
    expected = expected_tensors(task, public_size)
    bound = reply_size_bound(expected)
    if size is not None and size > bound:
        raise ReplyRejected(f"reply of {size} bytes exceeds the {bound} bytes its job can produce")
    try:
        tensors = decode(content[record_name])
    except Exception as exc:  # any undecodable payload is the client's fault, not ours
        raise ReplyRejected(f"undecodable {record_name!r} record ({type(exc).__name__}: "
                            f"{node_text(exc, REASON_LIMIT)})") from exc
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ReplyRejected(f"wrong tensor names: missing {missing[:3]}, "
                            f"unexpected {[node_text(e) for e in extra[:3]]}")
    for name, tensor in tensors.items():
        shape, floating = expected[name]
        if tuple(tensor.shape) != shape:
            raise ReplyRejected(f"{name}: shape {tuple(tensor.shape)}, expected {shape}")
        if tensor.is_floating_point() != floating or tensor.is_complex() or tensor.dtype == torch.bool:
            raise ReplyRejected(f"{name}: dtype {tensor.dtype}, expected {'a float' if floating else 'an integer'}")
        if floating and not bool(torch.isfinite(tensor).all()):
            raise ReplyRejected(f"{name}: contains NaN or Inf")
    try:
        metrics = dict(content["report"])
    except Exception as exc:  # a record of the wrong kind under the report's name
        raise ReplyRejected(f"unreadable report ({type(exc).__name__})") from exc
    n = metrics.get("num-examples")
    if not isinstance(n, (int, float)) or isinstance(n, bool) or not math.isfinite(n) or n <= 0:
        raise ReplyRejected(f"report num-examples = {n!r}, expected a positive number")
    if task.max_examples is not None and n > task.max_examples:
        raise ReplyRejected(f"report num-examples = {n!r} exceeds the {task.max_examples} this node can have "
                            "trained on (its reported data times the job's epochs)")
    return ClientUpdate(task.node_id, task.job, tensors, int(n), _floats(metrics))


REPORT_KEYS = ("num-examples", "train-loss", "train-seconds", "peak-memory-mb", "test-accuracy", "test-loss")


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    """The report's known keys (`fl_app.job.train_report`) with finite numbers; anything else a node adds is dropped."""
    return {k: float(v) for k, v in metrics.items()
            if k in REPORT_KEYS and isinstance(v, (int, float)) and math.isfinite(v)}
