"""AllSmall: everybody trains the one submodel the weakest device can afford."""

from __future__ import annotations

from fl_app.models import build_model
from fl_app.width import extract
from server_app.strategies.base import Device, Federation
from server_app.strategies.single_model import SingleModelStrategy


class AllSmall(SingleModelStrategy):
    """FedAvg of the one submodel the weakest device can afford, trained by everybody.

    Everybody takes part, at the price of a model sized for the weakest device.
    Devices that cannot afford even the `min-keep-ratio` floor are left out.
    """

    name = "allsmall"

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
            shortfall = (self.federation.shortfall(self.federation.cost(self.model.spec), device)
                         or f"its largest affordable keep ratio is {ratio}")
            self.left_out[device.node_id] = f"cannot afford the shared submodel (keep ratio {self.keep_ratio:.3f}): {shortfall}"

    def candidates(self) -> list[Device]:
        return self.members
