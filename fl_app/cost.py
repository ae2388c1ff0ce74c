"""The cost model every strategy shares: FLOPs, memory, bytes and emulated device time.

FLOPs and saved activations are counted by PyTorch itself (FlopCounterMode's FLOP formulas
and saved-tensor hooks) on the meta device, so pricing a model costs no real compute and
uses the same `forward` that clients run. A FLOP here is one multiply or one add of a
matmul/convolution (FlopCounterMode's convention, 2 per multiply-accumulate).
Every distinct pricing is computed once per process (`_model_cost`), and meta kernels are
memoized while pricing (`_MetaKernelCache`); both bounded.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Collection, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch._C import DispatchKey
from torch.utils.flop_counter import flop_registry

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
    state_tensors: int = 0  # entries of the state dict: each costs a message some framing bytes
    # model_cost's (spec, image shape, trainable blocks): lets `with_checkpointing` price the same
    # model again, e.g. to tell whether `checkpoint = true` would make a refused job fit.
    priced_as: tuple[ModelSpec, tuple[int, ...], tuple[int, ...] | None] | None = \
        field(default=None, repr=False, compare=False)

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

    def with_checkpointing(self) -> ModelCost:
        """The same model priced with activation checkpointing in its trained blocks, as training with
        run-config `checkpoint = true` runs it (itself for a model with exits, which trains without)."""
        if self.priced_as is None:
            raise ValueError("this ModelCost was not made by model_cost: nothing to price again")
        spec, image_shape, trainable = self.priced_as
        return model_cost(spec, image_shape, trainable, checkpoint=True)

    def largest_batch_within(self, budget_bytes: float, image_shape: tuple[int, ...]) -> int:
        """The largest batch size (>= 1) whose `peak_train_bytes` fits `budget_bytes`; 0 if not even 1.
        The peak grows with the batch, so this is a bisection over 1..2**20."""
        low, high = 0, 1 << 20
        while low < high:
            mid = (low + high + 1) // 2
            if self.peak_train_bytes(mid, image_shape) <= budget_bytes:
                low = mid
            else:
                high = mid - 1
        return low


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
    return _model_cost(_widths_spelled_out(spec.to_json()), tuple(image_shape), key, checkpoint)


@lru_cache(maxsize=4096)
def _widths_spelled_out(spec_json: str) -> str:
    """The spec with every group's width named, so a full-width spec and one naming every full width
    price once (at most 4096 specs remembered)."""
    spec = ModelSpec.from_json(spec_json)
    return spec.with_widths(spec.resolved_widths()).to_json()


# Every distinct (spec, input shape, trainable blocks, checkpointing) is priced once per process:
# the planner and the ServerApp size the same submodels many times (fit_ratio's bisection, every
# strategy, every round). The key is all `_model_cost` reads, so a hit is exactly what pricing again
# would give. At most 4096 entries (a ModelCost and its key, about 1 kB each: a few MB).
@lru_cache(maxsize=4096)
def _model_cost(spec_json: str, image_shape: tuple[int, ...], trainable: tuple[int, ...] | None,
                checkpoint: bool) -> ModelCost:
    spec = ModelSpec.from_json(spec_json)
    return replace(_price(spec, image_shape, trainable, checkpoint), priced_as=(spec, image_shape, trainable))


def _price(spec: ModelSpec, image_shape: tuple[int, ...], trainable: tuple[int, ...] | None,
           checkpoint: bool, memoize_kernels: bool = True) -> ModelCost:
    with torch.device("meta"):
        model = build_model(spec)
    freeze_except(model, trainable)
    with _MetaKernelCache() if memoize_kernels else nullcontext():
        return _measure(model, image_shape, trainable, checkpoint)


def _measure(model: torch.nn.Module, image_shape: tuple[int, ...], trainable: tuple[int, ...] | None,
             checkpoint: bool) -> ModelCost:
    params = sum(p.numel() for p in model.parameters())
    trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    # Two batch sizes: the difference is per-sample; what does not scale (weights that
    # autograd also saves) cancels out. With checkpointing, per unit, then the largest.
    layer_io: list[int] = []
    flops2, saved2, macs2 = _count(model, image_shape, 2, trainable, checkpoint, layer_io)
    flops4, saved4, macs4 = _count(model, image_shape, 4, trainable, checkpoint)
    activations = max((s4 - s2) / 2 for s2, s4 in zip(saved2, saved4))
    conv_weights = [4 * m.weight.numel() for m in model.modules()
                    if isinstance(m, torch.nn.Conv2d) and m.weight.requires_grad]
    return ModelCost(params, trainable_params, state_bytes, (macs4 - macs2) / 2,
                     (flops4 - flops2) / 2, activations, max(layer_io, default=0) / 2,
                     max((4 * p.numel() for p in model.parameters() if p.requires_grad), default=0),
                     3 * max(conv_weights, default=0) if checkpoint else 0, len(model.state_dict()))


def _count(model: torch.nn.Module, image_shape: tuple[int, ...], batch: int, trainable: tuple[int, ...] | None,
           checkpoint: bool, layer_io: list[int] | None = None) -> tuple[float, list[int], float]:
    """(training FLOPs, bytes held for backward, forward MACs) of one training step on one batch.
    Bytes held: one figure, or with checkpointing one per recomputed unit (`_checkpointed_held_bytes`).
    With `layer_io`, every layer's input + output bytes in the forward are appended to it.

    The forward and the backward are counted apart: the forward's FLOPs are twice the forward MACs,
    both together the training FLOPs (with checkpointing, the recomputation in backward included).
    Autograd does not change which counted ops (convolutions, matrix products) the forward runs, so
    this forward counts what one without gradients would."""
    x = torch.zeros(batch, *image_shape, device="meta")
    saved: dict[int, torch.Tensor] = {}
    # Without checkpointing, what this forward saves for backward is the figure held.
    with (_FlopCount() as fwd_counter,
          nullcontext() if checkpoint else _saving(saved),
          nullcontext() if layer_io is None else _layer_io(model, layer_io)):
        out = forward(model, x, trainable, checkpoint)
    with _FlopCount() as bwd_counter:
        if out.requires_grad:
            out.sum().backward()
    held = _checkpointed_held_bytes(model, x, trainable) if checkpoint else [_nbytes(saved)]
    return float(fwd_counter.flops + bwd_counter.flops), held, fwd_counter.flops / 2


_METADATA_QUERIES = {torch.ops.aten.sym_is_contiguous.default, torch.ops.aten.is_contiguous.default,
                     torch.ops.aten.is_contiguous.memory_format, torch.ops.aten.is_strides_like_format.default,
                     torch.ops.aten.is_non_overlapping_and_dense.default, torch.ops.aten.size.default,
                     torch.ops.aten.sym_size.default, torch.ops.aten.stride.default, torch.ops.aten.sym_stride.default,
                     torch.ops.aten.storage_offset.default, torch.ops.aten.sym_storage_offset.default,
                     torch.ops.aten.numel.default, torch.ops.aten.sym_numel.default, torch.ops.aten.dim.default,
                     torch.ops.prim.layout.default}


class _FlopCount(TorchDispatchMode):
    """The FLOPs of what runs inside it (`flops`), counted as torch.utils.flop_counter.FlopCounterMode
    counts them, without its per-module table: FlopCounterMode hooks every module call to attribute
    FLOPs to modules and re-enters itself around every op to try a decomposition, which took half of
    pricing a model. Its rule, kept here: shape queries pass through; an op without a formula in
    PyTorch's registry (`flop_registry`) runs as its CompositeImplicitAutograd decomposition when it
    has one; anything else runs and adds its registered formula. tests/test_cost.py checks the totals
    against FlopCounterMode for every model."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA_QUERIES:
            return NotImplemented
        if func not in flop_registry and func is not torch.ops.prim.device.default and (
                DispatchKey.CompositeImplicitAutograd in func.py_kernels
                or torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), DispatchKey.CompositeImplicitAutograd)):
            with self:
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


@contextmanager
def _layer_io(model: torch.nn.Module, sizes: list[int]) -> Iterator[None]:
    """Within it, every layer (leaf module) that runs appends to `sizes` the bytes of its input +
    output, in-place layers (ReLU) their one tensor: a layer's working memory while it runs."""
    def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        tensors = [t for t in (*inputs, output) if torch.is_tensor(t)]
        # An in-place layer (ReLU) writes into its input: count that memory once.
        size = sum(t.numel() * t.element_size() for t in {t.data_ptr() if t.device.type != "meta" else id(t): t
                                                             for t in tensors}.values())
        if getattr(module, "inplace", False):
            size = max(t.numel() * t.element_size() for t in tensors)
        sizes.append(size)

    handles = [m.register_forward_hook(hook) for m in model.modules() if not any(True for _ in m.children())]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _saving(saved: dict[int, torch.Tensor], kept: torch.Tensor | None = None) -> AbstractContextManager:
    """Within it, every distinct tensor autograd saves for backward lands in `saved` (by id),
    other than `kept` (a tensor already held, counted by the caller)."""
    def pack(t: torch.Tensor) -> torch.Tensor:
        if t is not kept:
            saved[id(t)] = t  # keep a reference so ids stay unique
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def _nbytes(tensors: dict[int, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _saved_bytes(run, kept: torch.Tensor | None = None) -> int:
    """Bytes of the distinct tensors autograd saves for backward while `run()` executes,
    other than `kept` (a tensor already held, counted by the caller)."""
    saved: dict[int, torch.Tensor] = {}
    with _saving(saved, kept):
        run()
    return _nbytes(saved)


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


# --- meta kernels, memoized ---------------------------------------------------------------------
#
# Pricing runs every layer on the meta device, where many kernels (BatchNorm forward and backward,
# ReLU's backward, ...) are Python decompositions that cost milliseconds per call, for a result that
# is only shapes: a meta kernel's outputs (shape, strides, dtype) are a function of its inputs'
# metadata and its other arguments, as there is no data to depend on. So while a model is priced,
# ops whose outputs are new tensors are looked up by that metadata and answered with new empty
# meta tensors of the remembered layout; everything else (views, in-place ops, anything unusual)
# runs as usual. The FLOP counter and autograd sit above this cache and see the same ops and
# tensors either way, so every count is unchanged (tests/test_cost.py compares with and without).

_KERNEL_CACHE_SIZE = 4096  # entries, least recently used dropped first; one is an op's input metadata and
# output layouts, about 2 kB (at most 6 kB seen): a ResNet-18 plan of every strategy fills 856 (1.9 MB)
_kernel_outputs: OrderedDict[tuple, Any] = OrderedDict()
_kernel_lock = threading.Lock()
_UNCACHEABLE = object()  # a key whose op returned something the cache cannot rebuild: always run it
_fresh_outputs: dict[Any, bool] = {}  # op -> whether it returns new tensors (one entry per op used)
_ATOMS = (type(None), bool, int, float, str, torch.dtype, torch.device, torch.layout, torch.memory_format)


class _NotCacheable(Exception):
    pass


def _meta_key(value: Any) -> Any:
    """A hashable stand-in for an op argument: a tensor by its metadata, plain values as they are."""
    if isinstance(value, torch.Tensor):  # only meta tensors: a real tensor's values could matter
        if type(value) not in (torch.Tensor, torch.nn.Parameter) or value.device.type != "meta" \
                or value.layout != torch.strided or value.is_conj() or value.is_neg():
            raise _NotCacheable
        return ("tensor", tuple(value.shape), value.stride(), value.storage_offset(), value.dtype)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_meta_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _meta_key(v)) for k, v in value.items()))
    if type(value) in _ATOMS:
        return (type(value), value)
    raise _NotCacheable


def _layout(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.stride(), t.dtype


def _new_empty(layout: tuple) -> torch.Tensor:
    shape, stride, dtype = layout
    return torch.empty_strided(shape, stride, dtype=dtype, device="meta")


def _describe_outputs(out: Any, inputs: list[torch.Tensor]) -> Any:
    """What a cache hit rebuilds `out` from, or _UNCACHEABLE unless every output is a fresh, plain,
    dense meta tensor (or None) that a new empty tensor of its layout reproduces exactly."""
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    storages = set()
    layouts = []
    for t in outs:
        if t is None:
            layouts.append(None)
            continue
        if type(t) is not torch.Tensor or t.device.type != "meta" or t.layout != torch.strided \
                or t.is_conj() or t.is_neg() or t.requires_grad or t.storage_offset() != 0 \
                or any(t is i for i in inputs):
            return _UNCACHEABLE
        storage = t.untyped_storage()
        if storage._cdata in storages or storage.nbytes() != _new_empty(_layout(t)).untyped_storage().nbytes():
            return _UNCACHEABLE
        storages.add(storage._cdata)
        layouts.append(_layout(t))
    return (type(out) if isinstance(out, (tuple, list)) else None, tuple(layouts))


def _rebuild(described: tuple) -> Any:
    kind, layouts = described
    outs = [None if layout is None else _new_empty(layout) for layout in layouts]
    return outs[0] if kind is None else kind(outs)


class _MetaKernelCache(TorchDispatchMode):
    """Answers repeated meta-device ops from the outputs' remembered layouts (see above)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        fresh = _fresh_outputs.get(func)
        if fresh is None:  # outputs are new tensors: no aliasing annotation on any return
            fresh = _fresh_outputs[func] = isinstance(func, torch._ops.OpOverload) and bool(func._schema.returns) \
                and all(r.alias_info is None for r in func._schema.returns)
        if not fresh:
            return func(*args, **kwargs)
        try:
            key = (func, _meta_key(args), _meta_key(kwargs))
        except _NotCacheable:
            return func(*args, **kwargs)
        with _kernel_lock:
            described = _kernel_outputs.get(key)
            if described is not None:
                _kernel_outputs.move_to_end(key)
        if described is _UNCACHEABLE:
            return func(*args, **kwargs)
        if described is not None:
            return _rebuild(described)
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        before = [_meta_key(t) for t in inputs]
        out = func(*args, **kwargs)
        # An op that changed an input's metadata (a resize) is not a function of its inputs' metadata.
        unchanged = before == [_meta_key(t) for t in inputs]
        with _kernel_lock:
            _kernel_outputs[key] = _describe_outputs(out, inputs) if unchanged else _UNCACHEABLE
            if len(_kernel_outputs) > _KERNEL_CACHE_SIZE:
                _kernel_outputs.popitem(last=False)
        return out


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


# Upper bounds on what Flower's serialization adds to the tensor data (measured on cnn, resnet18 and
# vgg16-fc4096 with flwr 1.41: about 200 bytes per fp32/fp16 tensor, 380 per int8 tensor with its
# quantization parameters, and the job's JSON, about 1.5 kB): see tests/test_cost.py.
TENSOR_FRAMING_BYTES = 512
MESSAGE_FRAMING_BYTES = 16 * 1024
BYTES_PER_VALUE = {"fp32": 4, "fp16": 2, "int8": 1}


def message_bytes_bound(values: float, tensors: int, encoding: str = "fp32", extra_bytes: float = 0.0) -> float:
    """An upper bound on a message's serialized bytes: `values` tensor values in `encoding`, `tensors`
    tensors' framing, the message's framing and `extra_bytes` (other records, e.g. fp32 logits)."""
    return values * BYTES_PER_VALUE[encoding] + tensors * TENSOR_FRAMING_BYTES + MESSAGE_FRAMING_BYTES + extra_bytes


@dataclass(frozen=True)
class Workload:
    """One round of a device's work, all but the model's shape: what turns a `ModelCost` into emulated
    device seconds, the virtual clock's price (server_app.clock) with message bytes bounded from above.

    - `trained_examples`: private samples trained on (epochs included);
    - `distilled_examples` / `predicted_examples`: public samples distilled / passed forward only (REFT);
    - `weights_down`: the model's whole state travels down (worst case: a node that holds nothing yet);
    - `weights_up`: the trained part travels up (False: only `extra_up_bytes`, e.g. REFT's logits);
    - `extra_down_bytes` / `extra_up_bytes`: other records (soft labels, logits, a teacher's weights).
    """

    trained_examples: int
    distilled_examples: int = 0
    predicted_examples: int = 0
    weights_down: bool = True
    weights_up: bool = True
    extra_down_bytes: float = 0.0
    extra_up_bytes: float = 0.0
    encoding: str = "fp32"

    def bytes_down(self, cost: ModelCost) -> float:
        values = cost.state_bytes / 4 if self.weights_down else 0
        return message_bytes_bound(values, cost.state_tensors if self.weights_down else 0, self.encoding,
                                   self.extra_down_bytes)

    def bytes_up(self, cost: ModelCost) -> float:
        values = cost.trainable_params if self.weights_up else 0
        return message_bytes_bound(values, cost.state_tensors if self.weights_up else 0, self.encoding,
                                   self.extra_up_bytes)

    def train_flops(self, cost: ModelCost) -> float:
        return job_train_flops(cost, self.trained_examples, self.distilled_examples, self.predicted_examples)

    def compute_s(self, profile: DeviceProfile, cost: ModelCost) -> float:
        """Seconds of compute at `profile`'s sustained GFLOPS."""
        return compute_time_s(profile, self.train_flops(cost))

    def transfer_s(self, profile: DeviceProfile, cost: ModelCost) -> float:
        """Seconds of transfers (bytes bounded from above) at `profile`'s link rates."""
        return transfer_time_s(profile, self.bytes_down(cost), self.bytes_up(cost))  # type: ignore[arg-type]

    def device_time_s(self, profile: DeviceProfile, cost: ModelCost) -> float:
        """Predicted emulated seconds on `profile`: compute plus transfers (never below the clock's price)."""
        return self.compute_s(profile, cost) + self.transfer_s(profile, cost)
