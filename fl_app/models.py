"""Models as an explicit sequence of blocks, buildable at any width.

Every model here is a `BlockNet`: a list of blocks run one after another, the last
one ending in the classifier. ProFL trains these blocks one at a time.

Width is described by *width groups*: a group is a set of channels that must be
kept or removed together (a residual stage couples its identity shortcuts with
the outputs of all its blocks, for instance). A model is built from a `ModelSpec`
whose `widths` maps each group to a channel count, so one mechanism gives the full
model, a magnitude-pruned REFT submodel and a HeteroFL width-scaled one.

Each Conv2d / Linear / BatchNorm2d is tagged with `width_axes`: the group that
indexes each of its weight's leading dimensions (None for a fixed dimension such
as the input image channels or the classes; `(group, k)` for a flattened input
where each channel of the group spans k consecutive features). `fl_app.width` reads
these tags to slice and scatter weights; no model-specific code is needed there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

_CNN_POOL = 4  # the CNN flattens a fixed 4x4 map, whatever the input size


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build a model: the architecture and its width per group.

    `widths` left empty means full width. Specs travel inside jobs as JSON, so a
    client can rebuild exactly the (sub)model the server planned.

    `exits` (DepthFL): a classifier head after every kept block (`exit_head`); the last
    block's own classifier is the last block's head. With `exits`, `depth` keeps blocks
    1..depth, each with its head, and adds no output module. The model's `forward` then
    returns the heads' ensemble (`ensemble_log_probs`); `fl_app.training.forward` returns
    every head's logits. A field at its default is left out of the JSON, so specs without
    it serialize exactly as before (their JSON counts in every message's bytes).
    """

    name: str
    num_classes: int = 10
    in_channels: int = 3
    widths: dict[str, int] = field(default_factory=dict)
    depth: int = 0  # ProFL: keep blocks 1..depth and close with their output module; 0 = all blocks
    exits: bool = False  # DepthFL: a classifier head after every kept block (see above)

    def resolved_widths(self) -> dict[str, int]:
        full = full_widths(self.name)
        unknown = set(self.widths) - set(full)
        if unknown:
            raise ValueError(f"model {self.name!r} has no width groups {sorted(unknown)}")
        return {**full, **self.widths}

    def with_widths(self, widths: dict[str, int]) -> ModelSpec:
        return replace(self, widths=dict(widths))

    def with_depth(self, depth: int) -> ModelSpec:
        return replace(self, widths=dict(self.widths), depth=depth)

    def to_dict(self) -> dict:
        """The spec as plain data; fields added later (`_OMITTED_AT_DEFAULT`) only when set."""
        d = asdict(self)
        for name, default in _OMITTED_AT_DEFAULT.items():
            if d[name] == default:
                del d[name]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        return cls(**json.loads(text))


# Fields that joined the spec later: left out of its JSON at their default, so that the JSON (and
# the bytes of every message carrying it) of a spec that does not use them stays as it was.
_OMITTED_AT_DEFAULT = {"exits": False}

Blocks = list[nn.Module]


@dataclass(frozen=True)
class Architecture:
    """One registered model: its full width per group, how to build its blocks, and each block's output.

    - `widths`: width group -> channels of the full model;
    - `build(spec, widths) -> blocks`: the blocks at the given widths (the last ends in logits);
    - `block_outputs`: per block, the width group of its output feature map (None: it has none)
      and its spatial stride; ProFL's output modules are built from these;
    - `head(spec, widths)`: the model's own classifier, from the last feature map to the logits (the
      end of the last block, and the end of every ProFL output module).
    """

    widths: dict[str, int]
    build: Callable[[ModelSpec, dict[str, int]], Blocks]
    block_outputs: list[tuple[str | None, int]]
    head: Callable[[ModelSpec, dict[str, int]], nn.Module]


def architecture(name: str) -> Architecture:
    """The registered architecture `name`; ValueError naming the valid ones otherwise."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    return MODELS[name]


def full_widths(name: str) -> dict[str, int]:
    """The width of every group of the full model `name`."""
    return dict(architecture(name).widths)


def block_outputs(name: str) -> list[tuple[str | None, int]]:
    """For each block: the width group of its output feature map (None: it has none) and its stride."""
    return list(architecture(name).block_outputs)


def num_blocks(name: str) -> int:
    return len(architecture(name).block_outputs)


# --- tagged layers -------------------------------------------------------------------


Axis = str | tuple[str, int] | None


def _tag(module: nn.Module, *groups: Axis) -> nn.Module:
    module.width_axes = groups  # type: ignore[assignment]
    return module


def conv(w: dict[str, int], out_g: str, in_g: str | None, in_fixed: int = 0, *,
         kernel: int = 3, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    cin = w[in_g] if in_g else in_fixed
    layer = nn.Conv2d(cin, w[out_g], kernel, stride=stride, padding=kernel // 2, bias=bias)
    return _tag(layer, out_g, in_g)  # type: ignore[return-value]


def bn(w: dict[str, int], group: str) -> nn.BatchNorm2d:
    return _tag(nn.BatchNorm2d(w[group]), group)  # type: ignore[return-value]


def linear(w: dict[str, int], out_g: str | None, in_g: str, out_fixed: int = 0, in_repeat: int = 1) -> nn.Linear:
    out = w[out_g] if out_g else out_fixed
    in_axis: Axis = in_g if in_repeat == 1 else (in_g, in_repeat)
    return _tag(nn.Linear(w[in_g] * in_repeat, out), out_g, in_axis)  # type: ignore[return-value]


def classifier_head(w: dict[str, int], in_g: str, num_classes: int) -> nn.Sequential:
    """Global average pooling then a linear layer: works for 28x28 and 32x32 alike."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear(w, None, in_g, num_classes))


# --- the architectures ---------------------------------------------------------------


class BlockNet(nn.Module):
    """A classifier that is an explicit sequence of blocks (the last one ends in logits)."""

    def __init__(self, spec: ModelSpec, blocks: Sequence[nn.Module], exits: Sequence[nn.Module] | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.blocks = nn.ModuleList(blocks)
        # With `spec.exits`: exits[i] is the head after blocks[i], for every block whose output is
        # not already logits (state names `exits.<i>.…`, i the block's index). None otherwise.
        self.exits = nn.ModuleList(exits) if exits is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exits is not None:
            return ensemble_log_probs(self.exit_logits(x))
        for block in self.blocks:
            x = block(x)
        return x

    def exit_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Every head's logits, (heads, batch, classes): head i after block i (the last block's own
        output when it ends in logits)."""
        assert self.exits is not None, "exit_logits needs a model built with exits"
        outs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            outs.append(self.exits[i](x) if i < len(self.exits) else x)
        return torch.stack(outs)


def ensemble_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """The log of the heads' mean softmax, (batch, classes), from (heads, batch, classes) logits.
    Usable as logits: its softmax is the mean of the heads' softmaxes, so argmax and cross-entropy
    score the ensemble."""
    return torch.logsumexp(torch.log_softmax(logits, dim=-1), dim=0) - math.log(logits.shape[0])


class BasicBlock(nn.Module):
    """ResNet basic block; `stage_g` is the stage's (shared) output group."""

    def __init__(self, w: dict[str, int], in_g: str, stage_g: str, mid_g: str, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv(w, mid_g, in_g, stride=stride), bn(w, mid_g)
        self.conv2, self.bn2 = conv(w, stage_g, mid_g), bn(w, stage_g)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_g != stage_g:
            self.shortcut = nn.Sequential(conv(w, stage_g, in_g, kernel=1, stride=stride), bn(w, stage_g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Written to hold few full-size tensors at once (while checkpointing recomputes the
        # block, and in a frozen block's forward): in place where autograd allows (BatchNorm
        # saves its input, ReLU its output), as in torchvision, and `out` rebound after conv2.
        out = torch.relu_(self.bn1(self.conv1(x)))
        out = self.conv2(out)
        out = self.bn2(out)
        out += self.shortcut(x)
        return torch.relu_(out)


def cnn() -> Architecture:
    """A small CNN: two conv-bn-relu-pool stages (32, 64 channels), a 128-unit hidden layer."""
    def build(spec: ModelSpec, w: dict[str, int]) -> Blocks:
        def stage(out_g: str, in_g: str | None) -> nn.Sequential:
            return nn.Sequential(conv(w, out_g, in_g, spec.in_channels), bn(w, out_g), nn.ReLU(inplace=True),
                                 nn.MaxPool2d(2))

        return [stage("conv1", None), stage("conv2", "conv1"), head(spec, w)]

    def head(spec: ModelSpec, w: dict[str, int]) -> nn.Module:
        return nn.Sequential(nn.AdaptiveAvgPool2d(_CNN_POOL), nn.Flatten(),
                             linear(w, "fc1", "conv2", in_repeat=_CNN_POOL * _CNN_POOL), nn.ReLU(inplace=True),
                             linear(w, None, "fc1", spec.num_classes))

    return Architecture({"conv1": 32, "conv2": 64, "fc1": 128}, build, [("conv1", 2), ("conv2", 2), (None, 1)],
                        head)


def scaled(channels: int, width: float) -> int:
    """`channels` times the width multiplier `width`, rounded, at least 1 (as HeteroFL's width scaling)."""
    return max(1, round(channels * width))


def vgg(stages: list[list[int]], fc4096: bool = False, width: float = 1.0) -> Architecture:
    """CIFAR VGG with BatchNorm (Simonyan & Zisserman, 2015): `stages` lists the channels of each
    conv, one inner list per max-pool stage; one block per stage. The classifier is one linear layer,
    or with `fc4096` the original 512-4096-4096 classifier with dropout. `width` multiplies every
    channel count (the hidden classifier layers too): same blocks, fewer channels."""
    widths = {f"stage{s}.conv{c}": scaled(ch, width) for s, stage in enumerate(stages, start=1)
              for c, ch in enumerate(stage, start=1)}
    if fc4096:
        widths |= {"fc1": scaled(4096, width), "fc2": scaled(4096, width)}

    def build(spec: ModelSpec, w: dict[str, int]) -> Blocks:
        blocks: Blocks = []
        in_g: str | None = None
        for s, stage in enumerate(stages, start=1):
            layers: list[nn.Module] = []
            for c in range(1, len(stage) + 1):
                g = f"stage{s}.conv{c}"
                layers += [conv(w, g, in_g, spec.in_channels), bn(w, g), nn.ReLU(inplace=True)]
                in_g = g
            # ceil_mode lets 28x28 inputs pass five pools (28-14-7-4-2-1) like 32x32 ones.
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
            blocks.append(nn.Sequential(*layers))
        blocks[-1] = nn.Sequential(*blocks[-1], *head(spec, w))
        return blocks

    last = f"stage{len(stages)}.conv{len(stages[-1])}"

    def head(spec: ModelSpec, w: dict[str, int]) -> nn.Sequential:
        """From the last stage's 1x1 map: one linear layer, or the 512-4096-4096 classifier with dropout."""
        if fc4096:
            return nn.Sequential(nn.Flatten(), linear(w, "fc1", last), nn.ReLU(inplace=True), nn.Dropout(0.5),
                                 linear(w, "fc2", "fc1"), nn.ReLU(inplace=True), nn.Dropout(0.5),
                                 linear(w, None, "fc2", spec.num_classes))
        return nn.Sequential(nn.Flatten(), linear(w, None, last, spec.num_classes))

    outputs: list[tuple[str | None, int]] = [(f"stage{s}.conv{len(stage)}", 2) for s, stage in enumerate(stages, 1)]
    return Architecture(widths, build, outputs, head)


def resnet(blocks_per_stage: list[int], stage_widths: tuple[int, ...] = (64, 128, 256, 512),
           width: float = 1.0) -> Architecture:
    """CIFAR ResNet with basic blocks (He et al., 2016; 3x3 stem, no max-pool). One ProFL block per
    stage, as in the ProFL authors' scripts: stem + stage 1, stage 2, stage 3, stage 4 + head.
    `width` multiplies every stage's channels: same blocks and strides, fewer channels."""
    stage_widths = tuple(scaled(c, width) for c in stage_widths)
    widths = {f"stage{s}": c for s, c in enumerate(stage_widths, start=1)}
    for s, n_blocks in enumerate(blocks_per_stage, start=1):
        widths |= {f"stage{s}.block{b}.mid": stage_widths[s - 1] for b in range(n_blocks)}

    def build(spec: ModelSpec, w: dict[str, int]) -> Blocks:
        stem = nn.Sequential(conv(w, "stage1", None, spec.in_channels), bn(w, "stage1"), nn.ReLU(inplace=True))
        stages: list[Blocks] = []
        in_g = "stage1"
        for s, n_blocks in enumerate(blocks_per_stage, start=1):
            stage_g = f"stage{s}"
            stage = []
            for b in range(n_blocks):
                stride = 2 if (b == 0 and s > 1) else 1
                stage.append(BasicBlock(w, in_g, stage_g, f"{stage_g}.block{b}.mid", stride))
                in_g = stage_g
            stages.append(stage)
        return [nn.Sequential(stem, *stages[0]), *(nn.Sequential(*st) for st in stages[1:-1]),
                nn.Sequential(*stages[-1], head(spec, w))]

    def head(spec: ModelSpec, w: dict[str, int]) -> nn.Module:
        return classifier_head(w, f"stage{len(blocks_per_stage)}", spec.num_classes)

    outputs: list[tuple[str | None, int]] = [("stage1", 1)] + [(f"stage{s}", 2)
                                                                for s in range(2, len(stage_widths) + 1)]
    return Architecture(widths, build, outputs, head)


_VGG11 = [[64], [128], [256, 256], [512, 512], [512, 512]]
_VGG16 = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]

# The model registry: a new model is one entry here (plus its constructor above, if it is a new family).
MODELS: dict[str, Architecture] = {
    "cnn": cnn(),
    "resnet18": resnet([2, 2, 2, 2]),
    "resnet34": resnet([3, 4, 6, 3]),
    "vgg11": vgg(_VGG11),
    "vgg16": vgg(_VGG16),
    "vgg11-fc4096": vgg(_VGG11, fc4096=True),
    "vgg16-fc4096": vgg(_VGG16, fc4096=True),  # REFT's VGG-16: 128.4 MB, 33.6 M parameters
    # Width-scaled: the same blocks and memory profile (activations scale with the width, parameters
    # with its square) at a cost a CPU can train; a model too large for most of a pool, made small.
    "resnet18-w0.5": resnet([2, 2, 2, 2], width=0.5),
    "resnet18-w0.25": resnet([2, 2, 2, 2], width=0.25),
    "vgg16-w0.5": vgg(_VGG16, width=0.5),
    "vgg16-w0.25": vgg(_VGG16, width=0.25),
}
MODEL_NAMES = tuple(MODELS)


class OutputModule(nn.Module):
    """ProFL's stand-in for the blocks after block `depth`: one 3x3 stride-s convolution per later
    block that has a feature map (no BatchNorm, no ReLU, as in the authors' scripts), then the model's
    own classifier head (`Architecture.head`): for ResNet global average pooling and a linear layer, as
    in the scripts; for the CNN its pooling and two linear layers; for VGG its classifier."""

    def __init__(self, spec: ModelSpec, w: dict[str, int], depth: int) -> None:
        super().__init__()
        outputs = block_outputs(spec.name)
        layers: list[nn.Module] = []
        in_g = outputs[depth - 1][0]
        for out_g, stride in outputs[depth:]:
            if out_g is None:
                continue
            layers.append(conv(w, out_g, in_g, kernel=3, stride=stride, bias=True))
            in_g = out_g
        assert in_g is not None
        self.basic = nn.Sequential(*layers)
        self.head = architecture(spec.name).head(spec, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.basic(x))


# --- activation checkpointing ------------------------------------------------------------


_UNIT_ENDS = (nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Flatten)


def checkpoint_units(block: nn.Module) -> list[nn.Module]:
    """`block` cut into the units that activation checkpointing recomputes one at a time.

    Checkpointing keeps only each unit's input through the forward pass; backward reruns
    one unit and holds what that unit saves for backward, then moves to the unit before.

    - A layer that has sublayers is one unit: a ResNet `BasicBlock`, the ResNet stem, a
      classifier head, a whole `OutputModule` (a block that is not a Sequential).
    - A run of plain layers is cut after every ReLU and pooling layer: a VGG or CNN unit is
      one conv-bn-relu, or one pooling layer. Every in-place ReLU stays inside its unit.

    A residual block is not cut in two: its second half needs the block's input as well as
    the first half's output, so every block would keep two inputs through the forward pass
    instead of one. Measured on ResNet-18 at batch 64, that costs what the shorter recompute
    saves on the largest ProFL step and raises the full model's peak.
    """
    if not isinstance(block, nn.Sequential):
        return [block]
    units: list[nn.Module] = []
    run: list[nn.Module] = []
    for layer in block:
        if any(True for _ in layer.children()):
            if run:
                units.append(nn.Sequential(*run))
                run = []
            units.append(layer)
        else:
            run.append(layer)
            if isinstance(layer, _UNIT_ENDS):
                units.append(nn.Sequential(*run))
                run = []
    if run:
        units.append(nn.Sequential(*run))
    return units


def build_model(spec: ModelSpec) -> BlockNet:
    """Build the (sub)model described by `spec` with fresh weights."""
    widths = spec.resolved_widths()
    bad = {g: c for g, c in widths.items() if not isinstance(c, int) or c < 1}
    if bad:
        raise ValueError(f"model {spec.name!r}: every width must be a positive integer, got {bad}")
    blocks = architecture(spec.name).build(spec, widths)
    if spec.exits:
        return _with_exits(spec, widths, blocks)
    if spec.depth:
        if not 1 <= spec.depth <= len(blocks):
            raise ValueError(f"model {spec.name!r} has {len(blocks)} blocks; depth {spec.depth} is out of range")
        if spec.depth < len(blocks):
            blocks = blocks[:spec.depth] + [OutputModule(spec, widths, spec.depth)]
    return BlockNet(spec, blocks)


def exit_head(spec: ModelSpec, widths: dict[str, int], block: int) -> nn.Module:
    """DepthFL's classifier after block `block` (0-based) of a model that goes on past it: global
    average pooling and one linear layer from the block's output channels to the classes. (The
    paper's heads add bottleneck convolutions; one linear layer keeps a head cheap for weak devices.)"""
    group = block_outputs(spec.name)[block][0]
    if group is None:
        raise ValueError(f"model {spec.name!r}: block {block + 1} has no feature map to put a classifier on")
    return classifier_head(widths, group, spec.num_classes)


def _with_exits(spec: ModelSpec, widths: dict[str, int], blocks: Blocks) -> BlockNet:
    """Blocks 1..depth (all if 0), each followed by its head; the last block's own classifier is its head."""
    depth = spec.depth or len(blocks)
    if not 1 <= depth <= len(blocks):
        raise ValueError(f"model {spec.name!r} has {len(blocks)} blocks; depth {spec.depth} is out of range")
    heads = [exit_head(spec, widths, i) for i in range(min(depth, len(blocks) - 1))]
    return BlockNet(spec, blocks[:depth], heads)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
