"""The shared base of strategies where each device trains a width-scaled submodel of one global model."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from fl_app.aggregation import Aggregation, fold_states
from fl_app.job import Job
from fl_app.width import ChannelMap, cut, global_index, param_axes, widths_at_ratio
from server_app.strategies.base import ClientUpdate, Device, Federation, GlobalModelStrategy, TrainTask


class WidthScaledStrategy(GlobalModelStrategy):
    """Each device trains the submodel keeping its affordable share of every layer's channels;
    `channels` says which ones. Every coordinate of the global model becomes the
    example-weighted average over the clients whose submodel held it; coordinates nobody
    trained this round keep their value (HeteroFL's aggregation, Diao et al., 2021).
    BatchNorm running statistics are averaged the same way (the paper's static BatchNorm is
    not used).
    """

    def __init__(self, federation: Federation) -> None:
        super().__init__(federation)
        self.axes = param_axes(self.model)
        self.ratios = self.size_submodels()
        self.keep: dict[int, ChannelMap] = {}  # node -> the channels its submodel holds this round

    @abstractmethod
    def channels(self, widths: dict[str, int], server_round: int) -> ChannelMap:
        """Which `widths[g]` channels of each group g of the global model a submodel takes this round."""

    def configure_train(self, server_round: int) -> list[TrainTask]:
        members = [d for d in self.federation.devices if d.node_id in self.ratios]
        tasks = []
        for device in self.federation.sample(members):
            ratio = self.ratios[device.node_id]
            sub = cut(self.model, self.channels(widths_at_ratio(self.model.spec, ratio), server_round), ratio)
            self.keep[device.node_id] = sub.keep
            job = Job(round=server_round, model=sub.spec, train=self.federation.train_config(),
                      encoding=self.federation.config.encoding, evaluate=True)
            tasks.append(TrainTask(device.node_id, job, sub.state, info={"keep_ratio": sub.ratio}))
        return tasks

    def aggregate_train(self, server_round: int, updates: list[ClientUpdate]) -> dict[str, Any]:
        state = self.model.state_dict()
        index = [{k: global_index(self.axes[k], self.keep[u.node_id], state[k].shape) for k in u.tensors}
                 for u in updates]
        self.model.load_state_dict(fold_states(state, [u.tensors for u in updates],
                                               [u.fold_weight for u in updates],
                                               Aggregation.parse(self.federation.config.aggregation), index))
        return {}

    def admit(self, device: Device) -> None:
        self.ratios |= self.size_submodels([device])
