"""DepthFL (Kim, Kim, Kim and Lee, "DepthFL: Depthwise Federated Learning for Heterogeneous Clients",
ICLR 2023): depth-scaled submodels, a classifier after every block, mutual self-distillation."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from fl_app.aggregation import Aggregation, fold_states
from fl_app.cost import ModelCost
from fl_app.job import Job
from fl_app.models import ModelSpec, build_model, num_blocks
from server_app.strategies.base import (ClientUpdate, Device, Federation, GlobalModelStrategy, StrategySetupError,
                                        TrainTask, nobody_fits)


class DepthFL(GlobalModelStrategy):
    """Each device trains the first k blocks of the global model, k the deepest it can afford, each
    block followed by a classifier head of its own (`fl_app.models.exit_head`: global average
    pooling and a linear layer, simpler than the paper's bottleneck classifiers; the last block's
    own classifier is the last head). On the client the heads distill each other while they learn
    the labels (the paper's mutual self-distillation, Sec. 3.2; `fl_app.training.exits_loss`, at
    run-config `temperature`).

    Sizing: k is the largest depth whose job (blocks 1..k and their heads, trained at the run's
    batch size) fits the device under the federation's fitting rule (`Federation.fits`: memory,
    and with `emulated-deadline` device time); a device that cannot afford even k = 1 is left out.
    Depths are fixed for the run (by the device profile).

    Aggregation: every tensor (blocks and heads alike) becomes the example-weighted average (or
    run-config `aggregation`'s rule) over
    the clients whose submodel held it this round; a tensor nobody held keeps its value (HeteroFL's
    rule, by depth instead of width: the deep blocks and heads are averaged over the strong
    devices only). BatchNorm running statistics are averaged the same way; integer counters take
    the maximum.

    Evaluation: the global model predicts with the ensemble of all its heads (the mean of their
    softmaxes, `fl_app.models.ensemble_log_probs`), as the paper evaluates DepthFL's global model.
    The ensemble also uses the shallow heads, which every client trains, where the last head is
    trained only by the devices that afford the whole model (if any).
    """

    name = "depthfl"

    def __init__(self, federation: Federation) -> None:
        super().__init__(federation)
        self.total = num_blocks(self.model.spec.name)
        self.depths: dict[int, int] = {}  # node -> the depth k of its submodel
        self._names: dict[int, set[str]] = {}  # depth -> the state names its submodel holds
        for device in federation.devices:
            self.admit(device)
        if not self.depths:
            raise StrategySetupError(nobody_fits("depthfl", f"even the first block of {self.model.spec.name} "
                                                 "with its head", self.left_out))

    def initial_spec(self) -> ModelSpec:
        return self.spec(0)

    def spec(self, depth: int) -> ModelSpec:
        """The global model's spec with exits, cut after block `depth` (0: all blocks)."""
        return replace(self.federation.full_spec(), exits=True).with_depth(depth)

    def sizing_cost(self, depth: int) -> ModelCost:
        """What training the depth-`depth` submodel with its heads costs, as it trains."""
        return self.federation.cost(self.spec(depth), None, self.federation.config.checkpoint)

    def affordable_depth(self, device: Device) -> int | None:
        """The largest k whose submodel (blocks 1..k and heads 1..k) fits `device`; None if not even 1."""
        return next((k for k in range(self.total, 0, -1) if self.federation.fits(self.sizing_cost(k), device)), None)

    def admit(self, device: Device) -> None:
        depth = self.affordable_depth(device)
        if depth is None:
            self.left_out[device.node_id] = ("cannot afford even the first block and its head: "
                                             f"{self.federation.shortfall(self.sizing_cost(1), device)}")
        else:
            self.depths[device.node_id] = depth

    def held(self, depth: int) -> set[str]:
        """The global state names a depth-`depth` submodel holds: blocks.<i>.… and exits.<i>.… for i < depth."""
        if depth not in self._names:
            with torch.device("meta"):
                self._names[depth] = set(build_model(self.spec(depth)).state_dict())
        return self._names[depth]

    def configure_train(self, server_round: int) -> list[TrainTask]:
        config = self.federation.config
        members = [d for d in self.federation.devices if d.node_id in self.depths]
        state = self.model.state_dict()
        tasks = []
        for device in self.federation.sample(members):
            depth = self.depths[device.node_id]
            job = Job(round=server_round, model=self.spec(depth), train=self.federation.train_config(),
                      encoding=config.encoding, evaluate=True, mutual_distillation=config.temperature)
            weights = {k: v for k, v in state.items() if k in self.held(depth)}
            tasks.append(TrainTask(device.node_id, job, weights, info={"depth": depth}))
        return tasks

    def aggregate_train(self, server_round: int, updates: list[ClientUpdate]) -> dict[str, Any]:
        self.model.load_state_dict(average_held(self.model.state_dict(), [u.tensors for u in updates],
                                                [u.fold_weight for u in updates],
                                                self.federation.config.aggregation))
        return {}


def average_held(state: dict[str, torch.Tensor], updates: list[dict[str, torch.Tensor]],
                 weights: list[float], aggregation: str = "mean") -> dict[str, torch.Tensor]:
    """`state` with every tensor replaced by the fold (run-config `aggregation`, `fl_app.aggregation`;
    "mean": the `weights`-weighted average) of the updates that hold it (float tensors; integer
    counters such as BatchNorm's batch count take the maximum); a tensor that no update with examples
    holds keeps its value. Shapes are those of `state` (depth-scaled submodels hold whole tensors)."""
    return fold_states(state, updates, weights, Aggregation.parse(aggregation))
