"""One routine for every strategy that shrinks a model: pick channels, slice, scatter back.

A `ChannelMap` says, for every width group, which channels of the global model a
submodel keeps (sorted indices). From it:

- `slice_state` cuts the global state dict down to the submodel's shapes;
- `global_index` places a submodel's tensors back at their global positions (HeteroFL's and
  FedRolex's channel-wise folds, `fl_app.aggregation.fold_states`);
- `select_channels` builds the map, by weight magnitude (REFT's structured pruning)
  or by taking the first k channels (HeteroFL's static width scaling);
- `fit_ratio` finds the largest submodel that fits a device's budgets (memory, device time),
  pruned uniformly (`uniform_widths`) or by one global ranking of channels (`global_widths`,
  REFT), and `extract` cuts it from the global model.

The shapes come from the `width_axes` tags the model builders put on every layer, so
this file knows no model by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import lru_cache

import torch
from torch import nn

from fl_app.cost import ModelCost, model_cost
from fl_app.models import Axis, ModelSpec, build_model

ChannelMap = dict[str, list[int]]

_BN_STATS = ("weight", "bias", "running_mean", "running_var")


def param_axes(model: nn.Module) -> dict[str, tuple[Axis, ...]]:
    """For every state-dict entry, the width group indexing each of its dimensions."""
    axes: dict[str, tuple[Axis, ...]] = {}
    for prefix, module in model.named_modules():
        groups = getattr(module, "width_axes", None)
        if groups is None:
            continue
        if isinstance(module, nn.BatchNorm2d):
            for name in _BN_STATS:
                axes[f"{prefix}.{name}"] = (groups[0],)
            axes[f"{prefix}.num_batches_tracked"] = ()
        else:
            axes[f"{prefix}.weight"] = tuple(groups)
            if module.bias is not None:
                axes[f"{prefix}.bias"] = (groups[0],)
    missing = set(model.state_dict()) - set(axes)
    if missing:
        raise ValueError(f"untagged tensors (no width_axes): {sorted(missing)[:5]}")
    return axes


def _positions(axis: Axis, keep: ChannelMap) -> torch.Tensor:
    """Global positions along one dimension: the kept channels, each spanning `repeat` features."""
    group, repeat = (axis, 1) if isinstance(axis, str) else axis  # type: ignore[misc]
    channels = torch.as_tensor(keep[group], dtype=torch.long)
    return (channels[:, None] * repeat + torch.arange(repeat)).flatten()


def _indexed_dims(axes: tuple[Axis, ...]) -> Iterator[tuple[int, Axis]]:
    return ((dim, a) for dim, a in enumerate(axes) if a is not None)


def _span(positions: torch.Tensor) -> tuple[int, int] | None:
    """(start, length) when `positions` are consecutive ascending (first-k, an unwrapped window)."""
    n = len(positions)
    start = int(positions[0]) if n else 0
    return (start, n) if n and torch.equal(positions, torch.arange(start, start + n)) else None


def slice_state(state: dict[str, torch.Tensor], axes: dict[str, tuple[Axis, ...]],
                keep: ChannelMap) -> dict[str, torch.Tensor]:
    """The global `state` cut down to the channels in `keep` (a copy; sliced tensors contiguous).

    Each width group's positions are computed once. A tensor's first indexed dimension is narrowed
    (a view, no copy) when its kept positions are one consecutive run (first-k, an unwrapped rolling
    window); every other indexed dimension is gathered. Gathering the inner dimension of a view
    narrowed along the outer one copies whole runs: cutting ResNet-18 five ways took 50 ms so, 220-270
    ms copying a view narrowed along both, 480-670 ms gathering both and copying (2 threads, 2 loaded
    cores)."""
    where: dict[Axis, tuple[torch.Tensor, tuple[int, int] | None]] = {}
    out = {}
    for name, tensor in state.items():
        narrowed = gathered = False
        for i, (dim, axis) in enumerate(_indexed_dims(axes[name])):
            if axis not in where:
                positions = _positions(axis, keep)
                where[axis] = positions, _span(positions)
            positions, span = where[axis]
            if i == 0 and span is not None:
                tensor, narrowed = tensor.narrow(dim, *span), True
            else:
                tensor, gathered = tensor.index_select(dim, positions), True
        out[name] = (tensor if gathered else tensor.clone(memory_format=torch.contiguous_format) if narrowed
                     else tensor.clone())
    return out


def global_index(axes: tuple[Axis, ...], keep: ChannelMap,
                 shape: torch.Size) -> tuple[torch.Tensor, ...]:
    """An advanced index (an open mesh) placing a submodel tensor into its global tensor of `shape`:
    `global_tensor[global_index(...)]` has the submodel tensor's shape. Kept indices are unique."""
    index = []
    for dim, size in enumerate(shape):
        axis = axes[dim] if dim < len(axes) else None
        positions = _positions(axis, keep) if axis is not None else torch.arange(size)
        view = [1] * len(shape)
        view[dim] = -1
        index.append(positions.view(view))
    return tuple(index)


def full_map(spec: ModelSpec) -> ChannelMap:
    return {g: list(range(c)) for g, c in spec.resolved_widths().items()}


def channel_importance(model: nn.Module) -> dict[str, torch.Tensor]:
    """L2 norm of every weight slice that produces a channel, summed over a group's layers.

    A channel of a coupled group (a residual stage) is produced by several layers:
    its importance adds them up, so a stage is pruned consistently everywhere.
    """
    scores: dict[str, torch.Tensor] = {}
    for module in model.modules():
        groups = getattr(module, "width_axes", None)
        if not groups or groups[0] is None or isinstance(module, nn.BatchNorm2d):
            continue
        w = module.weight.detach()
        norm = w.flatten(1).pow(2).sum(1).sqrt()
        scores[groups[0]] = scores.get(groups[0], 0) + norm
    return scores


def widths_at_ratio(spec: ModelSpec, ratio: float, min_ratio: float = 0.0) -> dict[str, int]:
    """Every group kept at `ratio` of its full width (at least `min_ratio`, at least 1)."""
    r = max(ratio, min_ratio)
    return {g: max(1, min(c, math.ceil(r * c))) for g, c in full_widths_of(spec).items()}


def full_widths_of(spec: ModelSpec) -> dict[str, int]:
    return ModelSpec(spec.name, spec.num_classes, spec.in_channels).resolved_widths()


def select_channels(model: nn.Module, widths: dict[str, int], by: str = "magnitude") -> ChannelMap:
    """Which channels to keep for `widths`: the largest by magnitude, or the first k."""
    if by == "first":
        return {g: list(range(k)) for g, k in widths.items()}
    if by != "magnitude":
        raise ValueError(f"unknown channel selection {by!r}; valid: magnitude, first")
    scores = channel_importance(model)
    keep = {}
    for g, k in widths.items():
        top = torch.topk(scores[g], k).indices
        keep[g] = sorted(top.tolist())
    return keep


# --- fitting a budget ------------------------------------------------------------------------


@dataclass(frozen=True)
class Submodel:
    """A physically smaller model cut from a global one: its spec, kept channels and weights."""

    spec: ModelSpec
    keep: ChannelMap
    state: dict[str, torch.Tensor]
    ratio: float  # the pruning level: the uniform share of channels (uniform) or of prunable channels (global)


Widths = Callable[[float], dict[str, int]]  # a pruning level in [0, 1] -> every group's width, growing with it
Fits = Callable[[ModelCost], bool]  # whether a submodel of this cost fits a device's budgets


def uniform_widths(spec: ModelSpec) -> Widths:
    """Uniform width scaling: level r keeps r of every group's channels (HeteroFL, FedRolex, AllSmall)."""
    return lambda ratio: widths_at_ratio(spec, ratio)


def fit_ratio(spec: ModelSpec, image_shape: tuple[int, int, int], fits: Fits, min_ratio: float,
              widths_at: Widths | None = None) -> float | None:
    """The largest pruning level in [min_ratio, 1] whose submodel `fits`; None if not even `min_ratio` fits.

    `widths_at(level)` gives the submodel at a level (default `uniform_widths`); a higher level never
    keeps fewer channels in any group, so its cost (training FLOPs, peak memory, bytes, device time)
    never falls, and a bisection finds the level (to 1/1000); each candidate is priced by the cost
    model, no training needed.

    Most candidates need no pricing. A priced level that fits settles every smaller one, and one that
    does not every larger one. The bisection is first run on predicted costs (each field interpolated
    between priced levels along per-layer proxies, `_predicted`) and only its final bracket is priced:
    when the low end fits and the high end does not, every decision on the way follows from those two,
    so the result is the bisection's own. Otherwise the next try predicts from the new prices too;
    after the last, the bisection prices every candidate the priced ones do not settle. Usually 2
    pricings, not ~10.
    """
    widths_at = widths_at or uniform_widths(spec)
    costs: dict[float, ModelCost] = {}  # priced level -> its cost

    def priced(level: float) -> bool:
        if level not in costs:
            costs[level] = model_cost(spec.with_widths(widths_at(level)), image_shape)
        return fits(costs[level])

    def settled(level: float) -> bool | None:
        """What the priced levels imply for `level`; None: nothing."""
        if any(r >= level and fits(c) for r, c in costs.items()):
            return True
        if any(r <= level and not fits(c) for r, c in costs.items()):
            return False
        return None

    def decide(level: float, otherwise: Callable[[float], bool]) -> bool:
        known = settled(level)
        return otherwise(level) if known is None else known

    def guessed(level: float) -> bool:
        return fits(_predicted(spec, image_shape, widths_at, costs, level))

    if priced(1.0):
        return 1.0
    if not priced(min_ratio):
        return None
    for _ in range(_TRIES):
        low, high = _bisect(min_ratio, lambda r: decide(r, guessed))
        if priced(low) and not priced(high):
            return low
    return _bisect(min_ratio, lambda r: decide(r, priced))[0]


_TRIES = 3  # predicted bisections fit_ratio verifies before it bisects pricing what is not settled


def _bisect(min_ratio: float, decide: Callable[[float], bool]) -> tuple[float, float]:
    """fit_ratio's bisection over [min_ratio, 1] to 1/1000 with `decide` as the fit test: (low, high)."""
    low, high = min_ratio, 1.0
    while high - low > 1e-3:
        mid = (low + high) / 2
        low, high = (mid, high) if decide(mid) else (low, mid)
    return low, high


# ModelCost fields by the proxy they scale with (`_predicted`).
_FLOPS_FIELDS = ("forward_macs_per_sample", "train_flops_per_sample")
_ACTIVATION_FIELDS = ("activation_bytes_per_sample", "transient_bytes_per_sample")
_PARAMETER_FIELDS = ("params", "trainable_params", "state_bytes", "largest_trainable_bytes",
                     "weight_grad_temporary_bytes")


def _predicted(spec: ModelSpec, image_shape: tuple[int, ...], widths_at: Widths, costs: dict[float, ModelCost],
               level: float) -> ModelCost:
    """A guess at the cost at `level`, never a result: each field interpolated between the nearest priced
    levels around it, linearly in a proxy that follows the channel counts at that level: the sum over
    layers of weight size x output positions for FLOPs, of output channels x output positions for
    activation memory, of weight size for parameters and bytes."""
    layers = _weight_layers(replace(spec, widths={}).to_json(), tuple(image_shape))

    def proxies(r: float) -> tuple[int, int, int]:
        widths = widths_at(r)
        sizes = [[d if isinstance(d, int) else widths[d[0]] * d[1] for d in dims] for _, dims in layers]
        return (sum(positions * math.prod(s) for (positions, _), s in zip(layers, sizes)),
                sum(positions * s[0] for (positions, _), s in zip(layers, sizes)),
                sum(math.prod(s) for s in sizes))

    below, above = max(r for r in costs if r < level), min(r for r in costs if r > level)
    at, lo, hi = proxies(level), proxies(below), proxies(above)
    guess = {}
    for i, names in enumerate((_FLOPS_FIELDS, _ACTIVATION_FIELDS, _PARAMETER_FIELDS)):
        share = (at[i] - lo[i]) / (hi[i] - lo[i]) if hi[i] != lo[i] else 0.0
        for name in names:
            a, b = getattr(costs[below], name), getattr(costs[above], name)
            guess[name] = type(a)(a + (b - a) * share)
    return replace(costs[below], **guess)


@lru_cache(maxsize=64)
def _weight_layers(spec_json: str, image_shape: tuple[int, ...]) -> tuple[tuple[int, tuple], ...]:
    """Per convolution and linear layer of a model, at any width: its output positions per sample
    (H x W; 1 for a linear layer) and its weight's dimensions, each a size or the (group, repeat) it
    scales with. From one forward pass on the meta device; at most 64 architectures and input shapes."""
    with torch.device("meta"):
        model = build_model(ModelSpec.from_json(spec_json))
    layers: list[tuple[int, tuple]] = []

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        axes = tuple(module.width_axes) + (None,) * (module.weight.dim() - len(module.width_axes))
        dims = tuple(size if axis is None else (axis, 1) if isinstance(axis, str) else axis
                     for size, axis in zip(module.weight.shape, axes))
        layers.append((output.numel() // (output.shape[0] * output.shape[1]), dims))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and getattr(m, "width_axes", None) is not None]
    try:
        with torch.no_grad():
            model(torch.zeros(2, *image_shape, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return tuple(layers)


# --- global structured pruning (REFT) -----------------------------------------------------------


RESOURCES = ("parameters", "memory")  # what a channel's cost is counted in (`channel_costs`)


def channel_costs(spec: ModelSpec, image_shape: tuple[int, int, int], batch_size: int,
                  resource: str) -> dict[str, float]:
    """What one channel of each width group costs at full width, in `resource`: "parameters" (bytes of
    parameters and buffers: what travels and what is held) or "memory" (bytes of predicted peak training
    memory at `batch_size`: parameters, gradients, optimizer state and saved activations). Priced by the
    cost model as the full model minus the model with one channel fewer in that group (a group of width 1
    cannot lose one and costs nothing here)."""
    if resource not in RESOURCES:
        raise ValueError(f"unknown resource {resource!r}; valid: {', '.join(RESOURCES)}")

    def amount(s: ModelSpec) -> float:
        cost = model_cost(s, image_shape)
        return cost.state_bytes if resource == "parameters" else cost.peak_train_bytes(batch_size, image_shape)

    widths, full = spec.resolved_widths(), amount(spec)
    return {g: max(full - amount(spec.with_widths({**widths, g: w - 1})), 1.0) if w > 1 else 1.0
            for g, w in widths.items()}


def global_widths(model: nn.Module, min_ratio: float, costs: dict[str, float]) -> Widths:
    """Global structured pruning: every channel of every group ranked in one list, pruning level t keeps
    the top t of the channels above each group's floor (`min_ratio` of its width, at least 1).

    A channel's rank is its importance per unit of cost: its L2 weight norm (`channel_importance`) over its
    group's mean (Torch-Pruning's group-mean normalisation, so layers of any scale compare), divided by
    `costs[group]` (`channel_costs`: what one channel of the group costs in the resource that binds the
    device). Counted in parameters, the parameter-heavy late convolutions and classifier of a VGG lose width
    before its FLOP-heavy early convolutions: the shape REFT's VGG-16 figures imply (128.4 MB -> 1.8 MB,
    71x fewer bytes, at 0.33 -> 0.07 GMAC, 4.7x fewer FLOPs; Desai et al. 2023), which no uniform ratio
    gives (shared/docs/ALGORITHMS.md). Counted in training memory, activation-heavy early channels weigh
    too, so a memory-bound device is not left with a starved late layer. Within a group the order is by
    importance, so the channels kept are `select_channels`'s by magnitude.
    """
    widths = model.spec.resolved_widths()  # type: ignore[union-attr]
    importance = channel_importance(model)
    floors = {g: max(1, min(c, math.ceil(min_ratio * c))) for g, c in widths.items()}
    ranked: list[tuple[float, str]] = []
    for g in widths:
        scores = importance[g] / importance[g].mean().clamp_min(1e-12) / costs[g]
        ranked += [(float(v), g) for v in torch.sort(scores, descending=True).values[floors[g]:]]
    ranked.sort(key=lambda item: -item[0])
    order = [g for _, g in ranked]

    def at(level: float) -> dict[str, int]:
        kept = dict(floors)
        for g in order[:round(min(max(level, 0.0), 1.0) * len(order))]:
            kept[g] += 1
        return kept

    return at


PRUNING = ("global", "uniform")  # REFT's run-config `pruning`


def pruning_widths(model: nn.Module, pruning: str, min_ratio: float, image_shape: tuple[int, int, int] = (3, 32, 32),
                   batch_size: int = 32, resource: str = "parameters") -> Widths:
    """The pruning levels of `model` by `pruning`: "global" (`global_widths`, channels costed in `resource`
    at `batch_size` on `image_shape` inputs) or "uniform" (`uniform_widths`)."""
    if pruning == "global":
        spec: ModelSpec = model.spec  # type: ignore[assignment]
        return global_widths(model, min_ratio, channel_costs(spec, image_shape, batch_size, resource))
    if pruning == "uniform":
        return uniform_widths(model.spec)  # type: ignore[arg-type]
    raise ValueError(f"unknown pruning {pruning!r}; valid: {', '.join(PRUNING)}")


def extract(model: nn.Module, ratio: float, by: str = "magnitude", widths_at: Widths | None = None) -> Submodel:
    """Cut the submodel at pruning level `ratio` (of `widths_at`, default uniform: `ratio` of every
    group's channels), the channels chosen `by` magnitude or first-k."""
    spec: ModelSpec = model.spec  # type: ignore[assignment]
    widths = (widths_at or uniform_widths(spec))(ratio)
    return cut(model, select_channels(model, widths, by), ratio)


def cut(model: nn.Module, keep: ChannelMap, ratio: float) -> Submodel:
    """The submodel of `model` holding exactly the channels in `keep` (every group), with their weights."""
    spec: ModelSpec = model.spec  # type: ignore[assignment]
    widths = {g: len(channels) for g, channels in keep.items()}
    return Submodel(spec.with_widths(widths), keep, slice_state(model.state_dict(), param_axes(model), keep), ratio)
