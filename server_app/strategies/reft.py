"""REFT (Desai, Hilal, Eldardiry, 2023): pruned submodels sized to each device, distillation for traffic."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from fl_app.aggregation import Aggregation, fold_logits
from fl_app.cost import Workload
from fl_app.job import Job
from fl_app.models import ModelSpec
from fl_app.training import distill
from fl_app.units import MIB
from fl_app.width import Widths, extract, pruning_widths
from server_app.strategies.base import (ClientUpdate, Device, Federation, GlobalModelStrategy, StrategySetupError,
                                        TrainTask, nobody_fits)


class REFT(GlobalModelStrategy):
    """Resource-efficient federated training with variable pruning and ensemble distillation.

    Setup (round 1, and every `refresh-every` rounds): the server prunes the global model
    structurally into one submodel per device, the largest whose peak training memory fits the
    device's budget and, with `emulated-deadline`, whose round (compute at the device's GFLOPS,
    its weights down and logits up at its link rates) fits the deadline: pruning adapted to each
    client's FLOPS, as the paper's, falls out of sizing to one deadline. `pruning = global` ranks
    every channel of the model in one list by importance per unit of cost in the resource that binds
    the device (`fl_app.width.global_widths`; parameters, or training memory when the full model does
    not fit its memory: `binding_resource`); `uniform` keeps one share of every layer's channels.
    The submodel's weights travel down. Every round: each client distills
    the ensemble logits of the last round into its submodel on the public slice,
    trains on its private data, and sends up only its logits on the public slice; the
    server averages them (weighted by examples; or run-config `aggregation`'s rule,
    `fl_app.aggregation.fold_logits`) into the ensemble teacher and distills
    it into the full global model. After setup a round costs logits, not weights.
    """

    name = "reft"

    def __init__(self, federation: Federation) -> None:
        super().__init__(federation)
        self.specs: dict[int, ModelSpec] = {}  # the submodel each client holds
        self.ensemble: torch.Tensor | None = None  # last round's teacher logits on the public slice
        self.ratios: dict[int, float] = {}  # node -> its pruning level at the last cut
        # Resource -> widths at every pruning level, ranked from the current weights when a device first
        # needs that resource (`levels_for`); cleared at each re-cut.
        self.levels: dict[str, Widths] = {}
        sized = self._size(federation.devices)
        if not sized:
            raise StrategySetupError(nobody_fits(self.name, "even the smallest submodel", self.left_out))

    def binding_resource(self, device: Device) -> str:
        """What `device`'s channels are costed in: training memory when the full model does not fit its
        memory, else parameters (the bytes REFT exists to save, and what a deadline's transfers pay for)."""
        full = self.federation.cost(self.federation.full_spec())
        return "memory" if self.federation.peak_memory_mb(full) > self.federation.memory_budget_bytes(device) / MIB \
            else "parameters"

    def levels_for(self, device: Device) -> Widths:
        """The pruning levels `device`'s submodel is cut at: ranked in its binding resource."""
        resource = self.binding_resource(device)
        if resource not in self.levels:
            config, fed = self.federation.config, self.federation
            self.levels[resource] = pruning_widths(self.model, config.pruning, config.min_keep_ratio,
                                                   fed.image_shape, config.batch_size, resource)
        return self.levels[resource]

    def workload(self, device: Device) -> Workload:
        """A refresh round of `device`, the costliest: its submodel's weights and the soft labels down,
        distilling them on the public slice, training on its data, its public logits up."""
        config, fed = self.federation.config, self.federation
        return fed.workload(device, distilled_examples=config.client_distill_epochs * config.public_size,
                            predicted_examples=config.public_size, weights_up=False,
                            extra_down_bytes=fed.public_logits_bytes, extra_up_bytes=fed.public_logits_bytes)

    def _size(self, devices: list[Device]) -> dict[int, float]:
        """Each device's pruning level under the current ranking (`self.levels`), into `ratios`; a device
        that cannot afford even every group's floor goes to `left_out` with the reason."""
        sized = {}
        for device in devices:
            levels = self.levels_for(device) if self.federation.config.pruning == "global" else None
            level = self.federation.affordable_ratio(device, self.workload(device), levels)
            if level is None:
                self.left_out[device.node_id] = self.federation.smallest_submodel_shortfall(
                    device, self.workload(device))
            else:
                sized[device.node_id] = level
                self.left_out.pop(device.node_id, None)
        self.ratios |= sized
        return sized

    def _cut(self, node_id: int) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
        """Cut node `node_id`'s submodel from the global model at its pruning level (channels by magnitude)."""
        device = self.federation.device(node_id)
        assert device is not None
        sub = extract(self.model, self.ratios[node_id], by="magnitude", widths_at=self.levels_for(device))
        self.specs[node_id] = sub.spec
        return sub.spec, sub.state

    def _refresh_due(self, server_round: int) -> bool:
        every = self.federation.config.refresh_every
        return server_round == 1 or (every > 0 and (server_round - 1) % every == 0)

    def configure_train(self, server_round: int) -> list[TrainTask]:
        config = self.federation.config
        if self._refresh_due(server_round) and server_round > 1:  # re-rank the channels of the distilled model
            self.levels = {}
            self._size([d for d in self.federation.devices if d.node_id in self.ratios])
        members = [d for d in self.federation.devices if d.node_id in self.ratios]
        soft_labels = {"soft-labels": {"logits": self.ensemble}} if self.ensemble is not None else {}
        tasks = []
        for device in self.federation.sample(members):
            weights: dict[str, torch.Tensor] = {}
            if self._refresh_due(server_round) or device.node_id not in self.specs:
                _, weights = self._cut(device.node_id)
            job = Job(round=server_round, model=self.specs[device.node_id], train=self.federation.train_config(),
                      returns="logits", encoding=config.encoding, keep_state=True, evaluate=True,
                      distill_epochs=config.client_distill_epochs if soft_labels else 0,
                      temperature=config.temperature)
            tasks.append(TrainTask(device.node_id, job, weights, dict(soft_labels),
                                   info={"keep_ratio": self.ratios[device.node_id], "weights_sent": bool(weights)}))
        return tasks

    def resend(self, task: TrainTask) -> TrainTask:
        """A node lost its submodel: cut it again from the current global model (a refresh for that node)."""
        spec, weights = self._cut(task.node_id)
        return TrainTask(task.node_id, replace(task.job, model=spec), weights, task.extra,
                         {**task.info, "weights_sent": True})

    def aggregate_train(self, server_round: int, updates: list[ClientUpdate]) -> dict[str, Any]:
        updates = [u for u in updates if u.fold_weight > 0]  # fltrust: predictions no better than chance teach nothing
        if not updates:  # nothing to teach with: the teacher and the global model stay as they are
            return {"ensemble_size": 0}
        self.ensemble = fold_logits([u.tensors["logits"] for u in updates], [u.fold_weight for u in updates],
                                    Aggregation.parse(self.federation.config.aggregation))
        config = self.federation.config
        loss = distill(self.model, self.federation.public_batches(self.ensemble), self.federation.train_config(),
                       config.server_distill_epochs, config.temperature)
        # How good the teacher is (its labels on the public slice are known to the server): the global model
        # cannot learn more from distillation than the ensemble knows.
        teacher = float((self.ensemble.argmax(1) == self.federation.public_labels()).float().mean())
        return {"ensemble_size": len(updates), "server_distill_loss": loss, "ensemble_public_accuracy": teacher}

    def admit(self, device: Device) -> None:
        self._size([device])

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "ensemble": self.ensemble}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue with the global model and teacher; every node is cut a fresh submodel (it kept nothing)."""
        super().load_state_dict(state)
        self.ensemble = state["ensemble"]
        self.specs = {}
        self.levels = {}  # ranked again from the resumed weights, as a refresh would
        self._size([d for d in self.federation.devices if d.node_id in self.ratios])
