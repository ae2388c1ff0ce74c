"""REFT (Desai, Hilal, Eldardiry, 2023): pruned submodels sized to each device, distillation for traffic."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from fl_app.aggregation import Aggregation, fold_logits
from fl_app.job import Job
from fl_app.models import ModelSpec
from fl_app.training import distill
from fl_app.width import extract
from server_app.strategies.base import ClientUpdate, Device, Federation, GlobalModelStrategy, TrainTask


class REFT(GlobalModelStrategy):
    """Resource-efficient federated training with variable pruning and ensemble distillation.

    Setup (round 1, and every `refresh-every` rounds): the server prunes the global
    model by weight magnitude into one submodel per device, the largest whose training
    FLOPs fit the device's share of the strongest device's and whose peak memory fits
    its budget; the submodel's weights travel down. Every round: each client distills
    the ensemble logits of the last round into its submodel on the public slice,
    trains on its private data, and sends up only its logits on the public slice; the
    server averages them (weighted by examples; or run-config `aggregation`'s rule,
    `fl_app.aggregation.fold_logits`) into the ensemble teacher and distills
    it into the full global model. After setup a round costs logits, not weights.
    """

    name = "reft"

    def __init__(self, federation: Federation) -> None:
        super().__init__(federation)
        self.ratios = self.size_submodels()
        self.specs: dict[int, ModelSpec] = {}  # the submodel each client holds
        self.ensemble: torch.Tensor | None = None  # last round's teacher logits on the public slice

    def _refresh_due(self, server_round: int) -> bool:
        every = self.federation.config.refresh_every
        return server_round == 1 or (every > 0 and (server_round - 1) % every == 0)

    def configure_train(self, server_round: int) -> list[TrainTask]:
        config = self.federation.config
        members = [d for d in self.federation.devices if d.node_id in self.ratios]
        soft_labels = {"soft-labels": {"logits": self.ensemble}} if self.ensemble is not None else {}
        tasks = []
        for device in self.federation.sample(members):
            weights: dict[str, torch.Tensor] = {}
            if self._refresh_due(server_round) or device.node_id not in self.specs:
                sub = extract(self.model, self.ratios[device.node_id], by="magnitude")
                self.specs[device.node_id], weights = sub.spec, sub.state
            job = Job(round=server_round, model=self.specs[device.node_id], train=self.federation.train_config(),
                      returns="logits", encoding=config.encoding, keep_state=True, evaluate=True,
                      distill_epochs=config.client_distill_epochs if soft_labels else 0,
                      temperature=config.temperature)
            tasks.append(TrainTask(device.node_id, job, weights, dict(soft_labels),
                                   info={"keep_ratio": self.ratios[device.node_id], "weights_sent": bool(weights)}))
        return tasks

    def resend(self, task: TrainTask) -> TrainTask:
        """A node lost its submodel: cut it again from the current global model (a refresh for that node)."""
        sub = extract(self.model, self.ratios[task.node_id], by="magnitude")
        self.specs[task.node_id] = sub.spec
        job = replace(task.job, model=sub.spec)
        return TrainTask(task.node_id, job, sub.state, task.extra, {**task.info, "weights_sent": True})

    def aggregate_train(self, server_round: int, updates: list[ClientUpdate]) -> dict[str, Any]:
        if not updates:
            return {"ensemble_size": 0}
        self.ensemble = fold_logits([u.tensors["logits"] for u in updates], [u.num_examples for u in updates],
                                    Aggregation.parse(self.federation.config.aggregation))
        config = self.federation.config
        loss = distill(self.model, self.federation.public_batches(self.ensemble), self.federation.train_config(),
                       config.server_distill_epochs, config.temperature)
        return {"ensemble_size": len(updates), "server_distill_loss": loss}

    def admit(self, device: Device) -> None:
        self.ratios |= self.size_submodels([device])

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "ensemble": self.ensemble}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue with the global model and teacher; every node is cut a fresh submodel (it kept nothing)."""
        super().load_state_dict(state)
        self.ensemble = state["ensemble"]
        self.specs = {}
