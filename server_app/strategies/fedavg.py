"""FedAvg, ExclusiveFL and AllSmall: everybody (or only who fits) trains one shared model."""

from __future__ import annotations

from typing import Any

import torch

from fl_app.job import Job
from fl_app.models import BlockNet, build_model
from fl_app.width import extract
from server_app.strategies.base import (ClientUpdate, Device, Federation, Strategy, StrategySetupError, TrainTask,
                                        weighted_average)


class FedAvg(Strategy):
    """Federated Averaging (McMahan et al., 2017) of the full model.

    Device limits are ignored: every sampled client trains the full model, and an
    emulated device is allowed past its memory budget. It is the accuracy upper
    bound that a federation of real weak devices could not actually run.
    """

    name = "fedavg"
    enforce_memory = False

    def __init__(self, federation: Federation) -> None:
        super().__init__(federation)
        torch.manual_seed(federation.config.seed)
        self.model = build_model(federation.full_spec())
        self.keep_ratio = 1.0

    def candidates(self) -> list[Device]:
        return self.federation.devices

    def configure_train(self, server_round: int) -> list[TrainTask]:
        job = Job(round=server_round, model=self.model.spec, train=self.federation.train_config(),
                  encoding=self.federation.config.encoding, enforce_memory=self.enforce_memory)
        weights = self.model.state_dict()
        return [TrainTask(d.node_id, job, weights, info={"keep_ratio": self.keep_ratio})
                for d in self.federation.sample(self.candidates())]

    def aggregate_train(self, server_round: int, updates: list[ClientUpdate]) -> dict[str, Any]:
        if updates:
            self.model.load_state_dict(weighted_average([u.tensors for u in updates],
                                                        [u.num_examples for u in updates]))
        return {}

    def global_model(self) -> BlockNet:
        return self.model

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])


class ExclusiveFL(FedAvg):
    """FedAvg over only the clients whose memory and compute fit the full model.

    What a practitioner does without REFT or ProFL: leave the weak devices out. Memory
    budgets are enforced, as on real devices.
    """

    name = "exclusivefl"
    enforce_memory = True

    def __init__(self, federation: Federation) -> None:
        super().__init__(federation)
        self.eligible: list[Device] = []
        for device in federation.devices:
            self.admit(device)
        if not self.eligible:
            cost = federation.cost(self.model.spec)
            raise StrategySetupError(
                f"exclusivefl: no device fits the full {self.model.spec.name} (needs "
                f"{federation.peak_memory_mb(cost):.0f} MB at batch {federation.config.batch_size} and the "
                f"strongest device's compute); use a smaller model or batch, raise compute-slack, "
                f"or add stronger devices to device-mix")

    def admit(self, device: Device) -> None:
        if self.federation.fits(self.federation.cost(self.model.spec), device):
            self.eligible.append(device)
        else:
            self.left_out[device.node_id] = "does not fit the full model (memory or compute)"

    def candidates(self) -> list[Device]:
        return self.eligible


class AllSmall(FedAvg):
    """FedAvg of the one submodel the weakest device can afford, trained by everybody.

    Everybody takes part, at the price of a model sized for the weakest device.
    Devices that cannot afford even the `min-keep-ratio` floor are left out.
    """

    name = "allsmall"
    enforce_memory = True

    def __init__(self, federation: Federation) -> None:
        super().__init__(federation)
        ratios = self.size_submodels()
        self.members = [d for d in federation.devices if d.node_id in ratios]
        self.keep_ratio = min(ratios.values())
        small = extract(self.model, self.keep_ratio, by="first")
        self.model = build_model(small.spec)
        self.model.load_state_dict(small.state)

    def admit(self, device: Device) -> None:
        ratio = self.federation.affordable_ratio(device)
        if ratio is not None and ratio >= self.keep_ratio:
            self.members.append(device)
        else:
            self.left_out[device.node_id] = f"cannot afford the shared submodel (keep ratio {self.keep_ratio:.3f})"

    def candidates(self) -> list[Device]:
        return self.members
