"""FedAvg (McMahan et al., 2017): every device trains the full model, limits ignored."""

from __future__ import annotations

from server_app.strategies.base import Device
from server_app.strategies.single_model import SingleModelStrategy


class FedAvg(SingleModelStrategy):
    """Federated Averaging of the full model.

    Device limits are ignored: every sampled client trains the full model, and an
    emulated device is allowed past its memory budget. It is the accuracy upper
    bound that a federation of real weak devices could not actually run.
    """

    name = "fedavg"
    enforce_memory = False

    def candidates(self) -> list[Device]:
        return self.federation.devices
