"""The shared base of strategies where every participant trains one and the same model."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

from fl_app.job import Job
from server_app.strategies.base import (ClientUpdate, Device, Federation, GlobalModelStrategy, TrainTask,
                                        weighted_average)


class SingleModelStrategy(GlobalModelStrategy):
    """One global model; each round the sampled `candidates()` train it whole and it becomes the
    example-weighted average of their weights (FedAvg's aggregation, McMahan et al., 2017).

    Subclasses choose who takes part (`candidates`), whether an emulated device may exceed its
    memory budget (`enforce_memory`), and may replace `self.model` by a smaller one.
    """

    enforce_memory: ClassVar[bool] = True

    def __init__(self, federation: Federation) -> None:
        super().__init__(federation)
        self.keep_ratio = 1.0  # the share of the full model's channels `self.model` has

    @abstractmethod
    def candidates(self) -> list[Device]:
        """The devices that may be sampled this round."""

    def configure_train(self, server_round: int) -> list[TrainTask]:
        job = Job(round=server_round, model=self.model.spec, train=self.federation.train_config(),
                  encoding=self.federation.config.encoding, enforce_memory=self.enforce_memory)
        weights = self.model.state_dict()
        return [TrainTask(d.node_id, job, weights, info={"keep_ratio": self.keep_ratio})
                for d in self.federation.sample(self.candidates())]

    def aggregate_train(self, server_round: int, updates: list[ClientUpdate]) -> dict[str, Any]:
        if updates:
            self.model.load_state_dict(weighted_average([u.tensors for u in updates], [u.fold_weight for u in updates],
                                                        self.model.state_dict(), self.federation.config.aggregation))
        return {}
