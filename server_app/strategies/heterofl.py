"""HeteroFL (Diao et al., 2021): static width-scaled submodels, aggregated channel by channel."""

from __future__ import annotations

from typing import Any

import torch

from fl_app.job import Job
from fl_app.models import BlockNet, build_model
from fl_app.width import ChannelMap, extract, param_axes, scatter_sum
from server_app.strategies.base import ClientUpdate, Device, Federation, Strategy, TrainTask


class HeteroFL(Strategy):
    """Each device trains the first k channels of every layer, k sized to its budget.

    Every coordinate of the global model is the example-weighted average over the
    clients whose submodel holds it; coordinates nobody trained this round keep their
    value. BatchNorm running statistics are averaged the same way (the paper's static
    BatchNorm is not used).
    """

    name = "heterofl"

    def __init__(self, federation: Federation) -> None:
        super().__init__(federation)
        torch.manual_seed(federation.config.seed)
        self.model = build_model(federation.full_spec())
        self.axes = param_axes(self.model)
        self.ratios = self.size_submodels()
        self.keep: dict[int, ChannelMap] = {}

    def configure_train(self, server_round: int) -> list[TrainTask]:
        members = [d for d in self.federation.devices if d.node_id in self.ratios]
        tasks = []
        for device in self.federation.sample(members):
            sub = extract(self.model, self.ratios[device.node_id], by="first")
            self.keep[device.node_id] = sub.keep
            job = Job(round=server_round, model=sub.spec, train=self.federation.train_config(),
                      encoding=self.federation.config.encoding, evaluate=True)
            tasks.append(TrainTask(device.node_id, job, sub.state, info={"keep_ratio": sub.ratio}))
        return tasks

    def aggregate_train(self, server_round: int, updates: list[ClientUpdate]) -> dict[str, Any]:
        state = self.model.state_dict()
        total = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in state.items()}
        count = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in state.items()}
        for u in updates:
            scatter_sum(total, count, u.tensors, self.axes, self.keep[u.node_id], float(u.num_examples))
        self.model.load_state_dict({
            k: torch.where(count[k] > 0, total[k] / count[k].clamp_min(1e-12), v) if v.is_floating_point() else v
            for k, v in state.items()})
        return {}

    def admit(self, device: Device) -> None:
        self.ratios |= self.size_submodels([device])

    def global_model(self) -> BlockNet:
        return self.model

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
