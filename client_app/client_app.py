"""The ClientApp. It executes jobs and knows nothing about REFT, ProFL or any baseline.

- query:    reply with this node's device report (profile, partition, data size);
- train:    build the job's model, load its weights (those sent, completed by those it
            kept from earlier rounds), optionally distill soft labels on the public
            slice, train, and send back what the job asks for (and, if the job says so,
            the trained model's accuracy on this node's share of the test set).

The server evaluates the global model itself, so there is no evaluate handler.

Known failures (out of memory on an emulated device, a malformed job, missing data)
come back as error replies that name the problem; the server records them.
"""

from __future__ import annotations

import atexit
import gc
import time

import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.faults import FaultConfigError, faults_for_round
from client_app.node import LocalNode, NodeConfigError
from fl_app import cpu_safety
from fl_app.config import ConfigError
from fl_app.data import Batches, DataError
from fl_app.job import (ERROR_BAD_INPUT, ERROR_MISSING_WEIGHTS, ERROR_OOM, Job, JobError, MissingWeights,
                        reply_state, train_report)
from fl_app.models import ModelSpec, build_model
from fl_app.profiles import ProfileError, profile_report
from fl_app.training import DeviceOutOfMemory, TrainingDiverged, distill, evaluate, predict_logits, train
from fl_app.units import MIB
from fl_app.wire import decode, encode

cpu_safety.apply()  # before any training: one thread on ARMv8.0 cores (Pi 3B+/4), see fl_app/cpu_safety.py

# A deployed node runs every message in a fresh process that exits after replying. With torch (and the
# torch._dynamo its optimizer imports) loaded, the interpreter's final garbage collections over all
# those module objects took 1.3-1.8 s of CPU per message here (benchmarks/results/engines.txt), on a
# device busy with the other nodes' work. Freezing the heap at exit skips them; nothing else changes
# (the reply is already sent, atexit handlers and module teardown still run).
atexit.register(gc.freeze)

app = ClientApp()

_EXPECTED = (DeviceOutOfMemory, JobError, DataError, ProfileError, ConfigError, NodeConfigError, FaultConfigError,
             TrainingDiverged, KeyError)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return _handle(msg, context, _query)


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    return _handle(msg, context, _train)


def _handle(msg: Message, context: Context, fn) -> Message:
    try:
        return Message(fn(msg, LocalNode.from_context(context)), reply_to=msg)
    except _EXPECTED as exc:
        code = (ERROR_OOM if isinstance(exc, DeviceOutOfMemory)
                else ERROR_MISSING_WEIGHTS if isinstance(exc, MissingWeights) else ERROR_BAD_INPUT)
        return Message(Error(code=code, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)


def _query(msg: Message, node: LocalNode) -> RecordDict:
    report = ConfigRecord({
        **profile_report(node.profile),
        "partition_id": node.partition_id, "num_partitions": node.num_partitions,
        "num_examples": node.num_examples,
    })
    for fault in node.faults:  # an attack on the server's trust in what nodes report (client_app/faults.py)
        report = ConfigRecord(fault.damage_query(dict(report)))
    return RecordDict({"device": report})


KEPT = "kept-weights"  # context.state record: the model state a job asked the node to keep


def _load_job_model(msg: Message, node: LocalNode) -> tuple[Job, torch.nn.Module]:
    """The job (refused, one line, outside `fl_app.job.check_bounds` or this node's data) and its model."""
    job = Job.from_json(str(msg.content["job"]["json"]))
    d = node.data
    for spec in filter(None, (job.model, job.mimic)):
        if (spec.num_classes, spec.in_channels) != (d.num_classes, d.image_shape[0]):
            raise JobError(f"job refused: its model has {spec.num_classes} classes and {spec.in_channels} input "
                           f"channels, this node's data {d.num_classes} and {d.image_shape[0]}")
    return job, _assemble(job.model, msg, ("weights",), node.context)


def _assemble(spec: ModelSpec, msg: Message, records: tuple[str, ...], context: Context) -> torch.nn.Module:
    """Build `spec` with the weights in `records` (later ones win), completed by kept ones of the
    same name and shape."""
    model = build_model(spec)
    needed = model.state_dict()
    kept = decode(context.state[KEPT]) if KEPT in context.state else {}
    sent: dict[str, torch.Tensor] = {}
    for record in records:
        if record in msg.content:
            sent |= {k: v for k, v in decode(msg.content[record]).items() if k in needed or record == records[-1]}
    unexpected = sorted(set(sent) - set(needed))
    if unexpected:
        raise JobError(f"weights sent for tensors the job's model does not have: {unexpected[:3]}")
    weights = {k: v for k, v in kept.items() if k in needed and v.shape == needed[k].shape} | sent
    missing = sorted(set(needed) - set(weights))
    if missing:
        raise MissingWeights(f"this node lacks weights for {len(missing)} tensors (e.g. {missing[0]}); "
                             "the server must send them")
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise JobError(f"the weights sent do not fit the job's model: {str(exc)[:300]}") from exc
    return model


def _distill_soft_labels(model: torch.nn.Module, msg: Message, node: LocalNode, job: Job) -> None:
    d = node.data
    teacher = decode(msg.content["soft-labels"])["logits"]
    if teacher.shape != (len(d.x_public), job.model.num_classes):
        raise JobError(f"soft labels have shape {tuple(teacher.shape)}, expected "
                       f"({len(d.x_public)}, {job.model.num_classes}): one row per public example")
    batches = Batches(d.x_public, teacher, d, job.train.batch_size, seed=job.round)
    distill(model, batches, job.train, job.distill_epochs, job.temperature)


def _train(msg: Message, node: LocalNode) -> RecordDict:
    job, model = _load_job_model(msg, node)
    if job.distill_epochs and "soft-labels" in msg.content:
        _distill_soft_labels(model, msg, node, job)
    # The teacher shares the front blocks sent in "weights"; "teacher-weights" holds the rest.
    teacher = _assemble(job.mimic, msg, ("weights", "teacher-weights"), node.context) if job.mimic else None
    limit = node.memory_limit_bytes(job.enforce_memory)
    faults = faults_for_round(node.faults, job.round)
    batches = node.train_batches(job.train.batch_size, job.round)
    before = None
    if faults:  # injected on purpose (client_app/faults.py): what it trains on, and where it started from
        for fault in faults:
            batches.y = fault.flip_labels(batches.y, job.model.num_classes)
        before = {k: v.detach().numpy().copy() for k, v in reply_state(job, model.state_dict()).items()}
    start = time.perf_counter()
    result = train(model, batches, job.train, job.trainable, limit, teacher, job.mutual_distillation)
    if job.keep_state:  # add to what the node keeps; a new tensor of the same name replaces the old
        kept = decode(node.context.state[KEPT]) if KEPT in node.context.state else {}
        node.context.state[KEPT] = encode(kept | model.state_dict())
    content = RecordDict()
    if job.returns == "weights":
        content["weights"] = encode(reply_state(job, model.state_dict()), job.encoding)
    else:
        d = node.data
        public = d.normalize(d.x_public)
        content["logits"] = encode({"logits": predict_logits(model, public)}, job.encoding)
    seconds, test = time.perf_counter() - start, None
    if job.evaluate:
        accuracy, loss, _ = evaluate(model, node.test_batches())
        if accuracy is not None:  # a node without a test share reports no accuracy (recorded as null)
            test = (accuracy, loss)
    content["report"] = MetricRecord(train_report(result.num_examples, result.loss, seconds,
                                                  result.peak_memory_bytes / MIB, test))
    for fault in faults:
        content = fault.damage(content, job.returns, before)
    return content
