"""ExclusiveFL: FedAvg over only the devices that can train the full model."""

from __future__ import annotations

from server_app.strategies.base import Device, Federation, StrategySetupError, nobody_fits
from server_app.strategies.single_model import SingleModelStrategy


class ExclusiveFL(SingleModelStrategy):
    """FedAvg over only the clients that can train the full model (`Federation.shortfall`: its
    memory, and with `emulated-deadline` its device time).

    What a practitioner does without REFT or ProFL: leave the weak devices out.
    """

    name = "exclusivefl"

    def __init__(self, federation: Federation) -> None:
        super().__init__(federation)
        self.eligible: list[Device] = []
        for device in federation.devices:
            self.admit(device)
        if not self.eligible:
            raise StrategySetupError(nobody_fits("exclusivefl", f"the full {self.model.spec.name}", self.left_out))

    def admit(self, device: Device) -> None:
        shortfall = self.federation.shortfall(self.federation.cost(self.model.spec), device)
        if shortfall is None:
            self.eligible.append(device)
        else:
            self.left_out[device.node_id] = f"does not fit the full model: {shortfall}"

    def candidates(self) -> list[Device]:
        return self.eligible
