"""Local training, evaluation and distillation, plus a measurement of a real step's peak memory.

The same `forward` runs on clients and inside the cost model, so what the cost model
prices (FLOPs, saved activations) is what a client actually executes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.autograd.profiler import profile
from torch.optim.sgd import sgd

from fl_app.data import Batches, DataError
from fl_app.models import ModelSpec, build_model, checkpoint_units
from fl_app.units import MIB


def accelerator() -> torch.device:
    """Where training, distillation and evaluation run: a CUDA device when one is present (paper-scale
    runs), else the CPU. Models come back to the CPU after each call, so weights, wire encoding and
    aggregation never see device tensors."""
    return _ACCELERATOR


_ACCELERATOR = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = False
    checkpoint: bool = False  # recompute activations inside trained blocks (less memory, more compute)


def freeze_except(model: nn.Module, trainable: Collection[int] | None) -> None:
    """Make only the blocks in `trainable` (all if None) learnable.

    Frozen blocks go to eval mode so their BatchNorm statistics stop drifting. A block's exit
    head (`ModelSpec.exits`) learns or stays frozen with its block.
    """
    exits = getattr(model, "exits", None) or []
    for i, block in enumerate(model.blocks):  # type: ignore[attr-defined]
        learn = trainable is None or i in trainable
        for part in (block, exits[i]) if i < len(exits) else (block,):
            part.train(learn)
            for p in part.parameters():
                p.requires_grad_(learn)


def forward(model: nn.Module, x: torch.Tensor, trainable: Collection[int] | None = None,
            checkpoint: bool = False) -> torch.Tensor:
    """Run the blocks; the frozen prefix runs without autograd, so it stores no activations.

    With `checkpoint`, the blocks after it run unit by unit (`fl_app.models.checkpoint_units`)
    keeping only each unit's input: backward recomputes one unit at a time, trading compute
    for activation memory. Activations are then also kept channels-last, the layout in which
    the CPU convolution's backward makes no activation-sized layout copies (it makes two
    weight-sized ones instead; `fl_app.cost` prices both).

    A model with exits (`ModelSpec.exits`) returns every head's logits, (heads, batch, classes),
    and runs without checkpointing (`fl_app.cost` prices it so too).
    """
    if getattr(model, "exits", None) is not None:
        return _exits_forward(model, x, trainable)
    frozen, rest = split_blocks(model, trainable, checkpoint)
    if checkpoint:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for block in frozen:
            x = block(x)
    for part in rest:
        if checkpoint and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(part, x, use_reentrant=False,
                                                  context_fn=partial(_recompute_context, part))
        else:
            x = part(x)
    return x


def _exits_forward(model: nn.Module, x: torch.Tensor, trainable: Collection[int] | None) -> torch.Tensor:
    """Every head's logits, (heads, batch, classes); the frozen prefix (blocks and their heads) runs
    without autograd."""
    frozen, _ = split_blocks(model, trainable)
    exits, outs = model.exits, []  # type: ignore[attr-defined]
    for i, block in enumerate(model.blocks):  # type: ignore[attr-defined]
        with torch.no_grad() if i < len(frozen) else nullcontext():
            x = block(x)
            outs.append(exits[i](x) if i < len(exits) else x)
    return torch.stack(outs)


def exits_loss(temperature: float = 0.0) -> Loss:
    """DepthFL's loss for (heads, batch, classes) logits and (batch,) labels (Kim et al., "DepthFL:
    Depthwise Federated Learning for Heterogeneous Clients", ICLR 2023, Sec. 3.2, mutual
    self-distillation): every head's cross-entropy on the labels plus, for every head, the mean
    over the other heads of KL(softmax(other / T), detached || softmax(head / T)). The KL is
    scaled by T^2, as `distillation_loss` is, so its gradients keep their size across T.
    `temperature` 0 (or a single head): the cross-entropies alone."""
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        heads = logits.shape[0]
        total = sum(F.cross_entropy(head, labels) for head in logits)
        if not temperature or heads < 2:
            return total
        log_p = F.log_softmax(logits / temperature, dim=-1)
        targets = log_p.detach()
        for i in range(heads):
            total = total + sum(F.kl_div(log_p[i], targets[j], reduction="batchmean", log_target=True)
                                for j in range(heads) if j != i) * temperature ** 2 / (heads - 1)
        return total
    return loss


def split_blocks(model: nn.Module, trainable: Collection[int] | None,
                 checkpoint: bool = False) -> tuple[list[nn.Module], list[nn.Module]]:
    """(the blocks in front of the first trainable one, which need no gradients; what runs after
    them: the remaining blocks, or with `checkpoint` their checkpoint units)."""
    blocks = list(model.blocks)  # type: ignore[attr-defined]
    first = 0 if trainable is None else min(trainable, default=len(blocks))
    rest = blocks[first:]
    if checkpoint:
        rest = [unit for block in rest for unit in checkpoint_units(block)]
    return blocks[:first], rest


def _recompute_context(unit: nn.Module) -> tuple[AbstractContextManager, AbstractContextManager]:
    """Checkpointing's (forward, recompute) contexts: the recompute in backward reruns BatchNorm
    in training mode, which would update its running statistics a second time."""
    return nullcontext(), _buffers_kept(unit)


@contextmanager
def _buffers_kept(unit: nn.Module) -> Iterator[None]:
    """Put the unit's buffers (BatchNorm running statistics) back as they were before."""
    buffers = list(unit.buffers())
    before = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in zip(buffers, before):
                b.copy_(value)


class SGD:
    """SGD with momentum and weight decay: torch.optim.SGD's update, through its own functional
    `torch.optim.sgd.sgd` (dampening 0, no Nesterov), without `torch.optim.Optimizer`.

    Why: constructing any `torch.optim.Optimizer` imports torch._dynamo (its methods are wrapped by
    `torch._disable_dynamo`, which imports it at first call): 1.4-4 s of every deployed message, since
    Flower's deployment engine starts a fresh ClientApp process per message. The parameters and
    momentum buffers it produces are bit-identical to torch.optim.SGD's (tests/test_training.py).

    `state[p]["momentum_buffer"]` holds the momentum buffer of parameter `p` (same shape) once `p`
    has had a gradient, as in torch.optim.SGD; parameters whose `grad` is None are skipped.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        self.params = list(params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        params = [p for p in self.params if p.grad is not None]
        buffers = [self.state.get(p, {}).get("momentum_buffer") for p in params]
        sgd(params, [p.grad for p in params], buffers, weight_decay=self.weight_decay,
            momentum=self.momentum, lr=self.lr, dampening=0.0, nesterov=False, maximize=False,
            has_sparse_grad=any(p.grad.is_sparse for p in params))
        if self.momentum != 0:
            for p, buffer in zip(params, buffers, strict=True):
                self.state[p] = {"momentum_buffer": buffer}


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> SGD:
    """SGD over the model's trainable parameters at the config's lr, momentum and weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    return SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def train_step(model: nn.Module, optimizer: SGD, x: torch.Tensor, target: torch.Tensor,
               trainable: Collection[int] | None = None, loss_fn: Loss = F.cross_entropy,
               checkpoint: bool = False) -> float:
    """One SGD step on `loss_fn(logits, target)`: labels for cross-entropy, logits for distillation."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(forward(model, x, trainable, checkpoint), target)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def distillation_loss(temperature: float) -> Loss:
    """Hinton's KL(teacher || student) at temperature T, scaled by T^2; targets are teacher logits."""
    def loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        t = temperature
        return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                        reduction="batchmean", log_target=True) * t * t
    return loss


@dataclass
class TrainResult:
    num_examples: int
    loss: float
    peak_memory_bytes: int


class TrainingDiverged(ValueError):
    """The training loss became NaN or infinite: the model is useless from here on, so nothing is sent."""


def _finite(loss: float, seen: int, cfg: TrainConfig) -> float:
    if not math.isfinite(loss):
        raise TrainingDiverged(f"training diverged: loss {loss} after {seen} examples at lr {cfg.lr:g}; "
                               "lower lr")
    return loss


def train(model: nn.Module, batches: Batches, cfg: TrainConfig, trainable: Collection[int] | None = None,
          memory_limit_bytes: int | None = None, teacher: nn.Module | None = None,
          mutual_distillation: float = 0.0) -> TrainResult:
    """Train for `cfg.epochs` on the labels, or to mimic `teacher`'s logits (MSE) when given.

    A model with exits trains every head on the labels (`exits_loss`), the heads distilling
    each other at temperature `mutual_distillation` (0: they do not).
    The first step is measured for peak memory. With `memory_limit_bytes`, a first step
    that needs more raises `DeviceOutOfMemory` before any further work, as a device with
    that much memory would fail.
    """
    freeze_except(model, trainable)
    optimizer = make_optimizer(model, cfg)
    loss_fn: Loss = F.cross_entropy if teacher is None else F.mse_loss
    if getattr(model, "exits", None) is not None:
        if teacher is not None:
            raise ValueError("a model with exits trains on labels; it cannot mimic a teacher")
        loss_fn = exits_loss(mutual_distillation)
    if teacher is not None:
        teacher.eval().to(accelerator())
    model.to(accelerator())
    seen, loss_sum, peak = 0, 0.0, 0
    pairs = needs_pairs(model, tuple(batches.x.shape[1:]))
    for epoch in range(cfg.epochs):
        for x, y in batches.epoch(epoch, augment=cfg.augment):
            x, y = x.to(accelerator()), y.to(accelerator())
            if pairs and len(x) == 1:  # a trailing single example: BatchNorm cannot train on it
                continue
            target = y if teacher is None else _logits(teacher, x)
            if peak == 0:
                loss, peak = measure_step(model, optimizer, x, target, trainable, loss_fn, cfg.checkpoint)
                if memory_limit_bytes is not None and peak > memory_limit_bytes:
                    raise DeviceOutOfMemory(peak, memory_limit_bytes)
            else:
                loss = train_step(model, optimizer, x, target, trainable, loss_fn, cfg.checkpoint)
            seen += len(x)
            loss_sum += _finite(loss, seen, cfg) * len(x)
    _check_trained(model, batches, seen, cfg.epochs)
    model.cpu()
    return TrainResult(seen, loss_sum / max(seen, 1), peak)


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def distill(model: nn.Module, batches: Batches, cfg: TrainConfig, epochs: int, temperature: float) -> float:
    """Train `model` to match teacher logits (the batches' targets) at `temperature`; mean loss."""
    freeze_except(model, None)
    optimizer = make_optimizer(model, cfg)
    loss_fn = distillation_loss(temperature)
    loss_sum, seen = 0.0, 0
    pairs = needs_pairs(model, tuple(batches.x.shape[1:]))
    model.to(accelerator())
    for epoch in range(epochs):
        for x, teacher_logits in batches.epoch(epoch, augment=False):
            x, teacher_logits = x.to(accelerator()), teacher_logits.to(accelerator())
            if pairs and len(x) == 1:  # a trailing single example: BatchNorm cannot train on it
                continue
            loss_sum += train_step(model, optimizer, x, teacher_logits, None, loss_fn) * len(x)
            seen += len(x)
    _check_trained(model, batches, seen, epochs)
    model.cpu()
    return loss_sum / max(seen, 1)


# --- BatchNorm needs more than one value per channel -------------------------------------------


def needs_pairs(model: nn.Module, image_shape: tuple[int, ...]) -> bool:
    """Whether a BatchNorm that trains (one in training mode: call after `freeze_except`) sees a single
    value per channel from one example (a 1x1 map): such a model cannot train on a batch of one, so
    training skips a trailing batch of one.

    Found by one forward pass of a single zero image in eval mode (no statistics change, no autograd),
    on the model's own device: a pass on the meta device would import torch._dynamo (its decompositions
    do), 1.4-4 s of every deployed message.
    """
    training = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if not training:
        return False
    fewest = [math.inf]

    def hook(module: nn.Module, inputs: tuple) -> None:
        x = inputs[0]
        fewest[0] = min(fewest[0], x.numel() // max(x.shape[0] * x.shape[1], 1))

    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_pre_hook(hook) for m in training]
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *image_shape, device=device))
    except (RuntimeError, ValueError):
        return False  # an input the model cannot take at all: the ServerApp's `check_input_size` names it
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return fewest[0] <= 1


def _check_trained(model: nn.Module, batches: Batches, seen: int, epochs: int) -> None:
    if seen or not len(batches) or not epochs:
        return
    name = getattr(getattr(model, "spec", None), "name", "the model")
    h, w = batches.x.shape[-2:]
    if batches.batch_size == 1:
        raise DataError(f"batch-size 1: {name} on {h}x{w} images gives a BatchNorm one value per channel, "
                        "which cannot train; use batch-size 2 or more")
    raise DataError(f"this node holds {len(batches)} example: {name} on {h}x{w} images cannot train on a "
                    "single example (a BatchNorm would see one value per channel); give the node 2 or more")


def _accepts(spec: ModelSpec, image_shape: tuple[int, ...], batch_size: int) -> bool:
    """Whether `spec` trains on `image_shape` inputs at `batch_size` (a forward pass on meta)."""
    with torch.device("meta"):
        model = build_model(spec)
    model.train()
    try:
        with torch.no_grad():
            model(torch.zeros(batch_size, *image_shape, device="meta"))
    except (RuntimeError, ValueError):
        return False
    return True


def smallest_input_size(spec: ModelSpec, batch_size: int, limit: int = 512) -> int | None:
    """The smallest square input side `spec` trains on at `batch-size` (training skips a trailing
    batch of one, so any batch-size of 2 or more behaves as 2); None if none up to `limit`."""
    b = min(batch_size, 2)
    return next((s for s in range(1, limit + 1) if _accepts(spec, (spec.in_channels, s, s), b)), None)


def check_input_size(spec: ModelSpec, image_shape: tuple[int, ...], batch_size: int) -> None:
    """Refuse, before any training, a model and input size that cannot work together (one line that
    names the smallest input size the model accepts)."""
    if _accepts(spec, tuple(image_shape), min(batch_size, 2)):
        return
    h, w = image_shape[-2:]
    smallest = smallest_input_size(spec, batch_size)
    need = f"images of at least {smallest}x{smallest}" if smallest else "larger images"
    if batch_size == 1 and _accepts(spec, tuple(image_shape), 2):
        raise DataError(f"model {spec.name!r} cannot train on {h}x{w} images at batch-size 1 (a BatchNorm would "
                        f"see one value per channel); it needs {need} at batch-size 1, or batch-size >= 2")
    raise DataError(f"model {spec.name!r} cannot take {h}x{w} images (its downsampling leaves nothing); it needs "
                    f"{need}: resize the images or choose another model")


class DeviceOutOfMemory(RuntimeError):
    """A training step needed more memory than the (emulated) device has."""

    def __init__(self, needed: int, available: int) -> None:
        super().__init__(f"out of memory: the training step needs {needed / MIB:.1f} MB, "
                         f"the device has {available / MIB:.1f} MB for training")
        self.needed, self.available = needed, available


def measure_step(model: nn.Module, optimizer: SGD, x: torch.Tensor, target: torch.Tensor,
                 trainable: Collection[int] | None = None, loss_fn: Loss = F.cross_entropy,
                 checkpoint: bool = False) -> tuple[float, int]:
    """Run one real training step and return (loss, peak bytes of tensor memory).

    Peak = what was alive before the step (parameters, buffers, optimizer state, the
    batch) + the highest point of the allocations made during it (activations,
    gradients, new optimizer state), read from the PyTorch profiler's allocator
    events. On CUDA the allocator's own peak counter is used instead.
    """
    before = _live_bytes(model, optimizer) + x.numel() * x.element_size()
    if x.is_cuda:
        torch.cuda.reset_peak_memory_stats(x.device)
        base = torch.cuda.memory_allocated(x.device)
        loss = train_step(model, optimizer, x, target, trainable, loss_fn, checkpoint)
        return loss, before + torch.cuda.max_memory_allocated(x.device) - base
    # The autograd profiler that torch.profiler.profile wraps, the same allocator events: torch.profiler's
    # own start imports torch._inductor (and torch._dynamo), 1.4-4 s of a deployed message.
    with profile(profile_memory=True) as prof:
        loss = train_step(model, optimizer, x, target, trainable, loss_fn, checkpoint)
    events = [e for e in prof.kineto_results.events() if e.name() == "[memory]"]
    current = highest = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        highest = max(highest, current)
    return loss, before + highest


def _live_bytes(model: nn.Module, optimizer: SGD) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    for state in optimizer.state.values():
        tensors += [t for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches) -> tuple[float | None, float | None, int]:
    """(accuracy, mean cross-entropy, examples) over `batches` in eval mode; (None, None, 0) when
    `batches` is empty: an accuracy is never reported for zero examples."""
    model.eval().to(accelerator())
    correct, loss_sum, n = 0, 0.0, 0
    for x, y in batches.epoch(0, augment=False):
        x, y = x.to(accelerator()), y.to(accelerator())
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
    model.cpu()
    if n == 0:  # nothing to score: no accuracy, rather than a 0.0 that reads as a measurement
        return None, None, 0
    return correct / n, loss_sum / n, n


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits of `x` (already normalized) in eval mode, batched to bound memory."""
    model.eval().to(accelerator())
    logits = [model(chunk.to(accelerator())).cpu() for chunk in _chunks(x, batch_size)]
    model.cpu()
    return torch.cat(logits) if len(x) else torch.empty(0)


def _chunks(x: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(x), size):
        yield x[i:i + size]
