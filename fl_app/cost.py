"""The cost model every strategy shares: FLOPs, memory, bytes and emulated device time.

FLOPs and saved activations are counted by PyTorch itself (FlopCounterMode and
saved-tensor hooks) on the meta device, so pricing a model costs no real compute and
uses the same `forward` that clients run. A FLOP here is one multiply or one add of a
matmul/convolution (FlopCounterMode's convention, 2 per multiply-accumulate).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch.utils.flop_counter import FlopCounterMode

from fl_app.models import ModelSpec, build_model
from fl_app.profiles import DeviceProfile
from fl_app.training import forward, freeze_except, split_blocks
from fl_app.units import MIB



@dataclass(frozen=True)
class ModelCost:
    """What one (sub)model costs, per sample where it scales with the batch."""

    params: int
    trainable_params: int
    state_bytes: int  # parameters and buffers, fp32
    forward_macs_per_sample: float
    train_flops_per_sample: float  # forward + backward of the trainable part
    activation_bytes_per_sample: float  # tensors autograd saves for backward; checkpointing: the most
    # held while backward recomputes one unit (kept unit inputs + what that unit saves)
    transient_bytes_per_sample: float  # the largest layer's input + output, alive while it runs
    largest_trainable_bytes: int = 0  # SGD's weight decay allocates a temporary this size on CPU
    # Checkpointing keeps activations channels-last; there a convolution's weight gradient on
    # CPU passes through three weight-sized temporaries (a channels-last copy of the weight, the
    # gradient in that layout, a contiguous copy): three times the largest trainable conv weight.
    # (The default layout makes one; not priced, as before.)
    weight_grad_temporary_bytes: int = 0

    @property
    def size_mb(self) -> float:
        return self.state_bytes / MIB

    def peak_train_bytes(self, batch_size: int, image_shape: tuple[int, ...],
                         optimizer_slots: int = 1) -> int:
        """Peak tensor memory of a training step at `batch_size`.

        Two moments compete: backward (saved activations, gradients being made, and what one
        layer allocates while it runs: as much as the largest layer's input and output, or
        the weight-gradient temporaries if larger) and the optimizer step (gradients +
        optimizer state, e.g. one momentum buffer for SGD).
        Parameters and the batch are alive throughout. The transient term matters most when
        only a small part trains: a frozen prefix saves nothing but still computes its layers.
        """
        grads = 4 * self.trainable_params
        optim = 4 * self.trainable_params * optimizer_slots
        batch = 4 * batch_size * _numel(image_shape)
        layer = max(self.transient_bytes_per_sample * batch_size, self.weight_grad_temporary_bytes)
        backward = self.activation_bytes_per_sample * batch_size + layer + grads
        step = grads + optim + self.largest_trainable_bytes
        return int(self.state_bytes + batch + max(backward, step))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def model_cost(spec: ModelSpec, image_shape: tuple[int, int, int],
               trainable: Collection[int] | None = None, checkpoint: bool = False) -> ModelCost:
    """Price `spec` on `image_shape` inputs, training only the blocks in `trainable` (all if None),
    optionally with activation checkpointing inside the trained blocks. A model with exits
    (`ModelSpec.exits`) is priced with its heads, and without checkpointing, as it trains."""
    key = None if trainable is None else tuple(sorted(trainable))
    checkpoint = checkpoint and not spec.exits
    return _model_cost(spec.to_json(), tuple(image_shape), key, checkpoint)


@lru_cache(maxsize=4096)
def _model_cost(spec_json: str, image_shape: tuple[int, ...], trainable: tuple[int, ...] | None,
                checkpoint: bool) -> ModelCost:
    spec = ModelSpec.from_json(spec_json)
    with torch.device("meta"):
        model = build_model(spec)
    freeze_except(model, trainable)
    params = sum(p.numel() for p in model.parameters())
    trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    # Two batch sizes: the difference is per-sample; what does not scale (weights that
    # autograd also saves) cancels out. With checkpointing, per unit, then the largest.
    flops2, saved2, macs2 = _count(model, image_shape, 2, trainable, checkpoint)
    flops4, saved4, macs4 = _count(model, image_shape, 4, trainable, checkpoint)
    activations = max((s4 - s2) / 2 for s2, s4 in zip(saved2, saved4))
    conv_weights = [4 * m.weight.numel() for m in model.modules()
                    if isinstance(m, torch.nn.Conv2d) and m.weight.requires_grad]
    return ModelCost(params, trainable_params, state_bytes, (macs4 - macs2) / 2,
                     (flops4 - flops2) / 2, activations, _largest_layer_io(model, image_shape),
                     max((4 * p.numel() for p in model.parameters() if p.requires_grad), default=0),
                     3 * max(conv_weights, default=0) if checkpoint else 0)


def _count(model: torch.nn.Module, image_shape: tuple[int, ...], batch: int,
           trainable: tuple[int, ...] | None, checkpoint: bool) -> tuple[float, list[int], float]:
    """(training FLOPs, bytes held for backward, forward MACs) of one batch. Bytes held: one
    figure, or with checkpointing one per recomputed unit (`_checkpointed_held_bytes`)."""
    x = torch.zeros(batch, *image_shape, device="meta")
    with FlopCounterMode(display=False) as fwd_counter:
        with torch.no_grad():
            forward(model, x, trainable)
    with FlopCounterMode(display=False) as counter:  # counts the recomputation too, if any
        out = forward(model, x, trainable, checkpoint)
        if out.requires_grad:
            out.sum().backward()
    held = _checkpointed_held_bytes(model, x, trainable) if checkpoint else [_saved_bytes(
        lambda: forward(model, x, trainable))]
    return float(counter.get_total_flops()), held, fwd_counter.get_total_flops() / 2


def _largest_layer_io(model: torch.nn.Module, image_shape: tuple[int, ...]) -> float:
    """Per sample: the largest input + output of any single layer during a forward pass."""
    largest = 0

    def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal largest
        tensors = [t for t in (*inputs, output) if torch.is_tensor(t)]
        # An in-place layer (ReLU) writes into its input: count that memory once.
        size = sum(t.numel() * t.element_size() for t in {t.data_ptr() if t.device.type != "meta" else id(t): t
                                                             for t in tensors}.values())
        if getattr(module, "inplace", False):
            size = max(t.numel() * t.element_size() for t in tensors)
        largest = max(largest, size)

    handles = [m.register_forward_hook(hook) for m in model.modules() if not any(True for _ in m.children())]
    try:
        with torch.no_grad():
            model(torch.zeros(2, *image_shape, device="meta"))  # 2: a BatchNorm on a 1x1 map needs two values
    finally:
        for h in handles:
            h.remove()
    return largest / 2


def _saved_bytes(run, kept: torch.Tensor | None = None) -> int:
    """Bytes of the distinct tensors autograd saves for backward while `run()` executes,
    other than `kept` (a tensor already held, counted by the caller)."""
    saved: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t is not kept:
            saved[id(t)] = t  # keep a reference so ids stay unique
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(t.numel() * t.element_size() for t in saved.values())


def _checkpointed_held_bytes(model: torch.nn.Module, x: torch.Tensor,
                             trainable: tuple[int, ...] | None) -> list[int]:
    """Per checkpoint unit, what is held while backward recomputes it: the inputs checkpointing
    keeps for it and the units before it (a later unit's input is gone once that unit's backward
    is done), and what recomputing the unit saves for backward."""
    frozen, units = split_blocks(model, trainable, checkpoint=True)
    with torch.no_grad():
        for block in frozen:
            x = block(x)
    inputs, held = 0, []
    for unit in units:
        inputs += x.numel() * x.element_size()
        result: list[torch.Tensor] = []
        held.append(inputs + _saved_bytes(lambda: result.append(unit(x)), kept=x))
        x = result[0]
    return held


def full_training_peak_mb(model: str, image_shape: tuple[int, int, int], num_classes: int, batch_size: int) -> float:
    """Predicted peak memory (MB = 2^20 bytes) of training the full `model` at `batch_size`:
    the reference a `memory-pool` of fractions scales (fl_app.profiles.MemoryPool)."""
    spec = ModelSpec(model, num_classes, image_shape[0])
    return model_cost(spec, image_shape).peak_train_bytes(batch_size, image_shape) / MIB


def job_train_flops(cost: ModelCost, trained_examples: int, distilled_examples: int = 0,
                    predicted_examples: int = 0) -> float:
    """FLOPs one job spends on a client.

    - `trained_examples`: samples of training steps on private data (epochs included);
    - `distilled_examples`: samples of distillation steps on the public slice (REFT's soft
      labels), priced like training steps;
    - `predicted_examples`: samples of forward-only passes (logits on the public slice),
      2 FLOPs per multiply-accumulate.
    """
    return (cost.train_flops_per_sample * (trained_examples + distilled_examples)
            + 2 * cost.forward_macs_per_sample * predicted_examples)


def compute_time_s(profile: DeviceProfile, train_flops: float) -> float:
    """Seconds `profile` computes `train_flops` FLOPs at its sustained GFLOPS."""
    return train_flops / (profile.gflops * 1e9)


def transfer_time_s(profile: DeviceProfile, bytes_down: int, bytes_up: int) -> float:
    """Seconds `profile` receives `bytes_down` and sends `bytes_up` bytes at its link rates (Mbit/s)."""
    return 8 * bytes_down / (profile.downlink_mbps * 1e6) + 8 * bytes_up / (profile.uplink_mbps * 1e6)


def device_time_s(profile: DeviceProfile, train_flops: float, bytes_down: int, bytes_up: int) -> float:
    """Emulated wall time on `profile`, in seconds: compute at its sustained GFLOPS plus transfers."""
    return compute_time_s(profile, train_flops) + transfer_time_s(profile, bytes_down, bytes_up)
