"""ExclusiveFL: FedAvg over only the devices that can train the full model."""

from __future__ import annotations

from server_app.strategies.base import Device, Federation, StrategySetupError
from server_app.strategies.single_model import SingleModelStrategy


class ExclusiveFL(SingleModelStrategy):
    """FedAvg over only the clients whose memory and compute fit the full model.

    What a practitioner does without REFT or ProFL: leave the weak devices out. Memory
    budgets are enforced, as on real devices.
    """

    name = "exclusivefl"

    def __init__(self, federation: Federation) -> None:
        super().__init__(federation)
        self.eligible: list[Device] = []
        for device in federation.devices:
            self.admit(device)
        if not self.eligible:
            cost = federation.cost(self.model.spec)
            raise StrategySetupError(
                f"exclusivefl: no device fits the full {self.model.spec.name} (needs "
                f"{federation.peak_memory_mb(cost):.0f} MB at batch {federation.config.batch_size} and, under "
                f"constraints = {federation.config.constraints!r}, the strongest device's compute); use a smaller "
                f"model or batch, raise compute-slack, or add stronger devices to device-mix")

    def admit(self, device: Device) -> None:
        shortfall = self.federation.shortfall(self.federation.cost(self.model.spec), device)
        if shortfall is None:
            self.eligible.append(device)
        else:
            self.left_out[device.node_id] = f"does not fit the full model: {shortfall}"

    def candidates(self) -> list[Device]:
        return self.eligible
