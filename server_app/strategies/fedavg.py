"""FedAvg (McMahan et al., 2017): every device trains the full model, limits ignored."""

from __future__ import annotations

from server_app.strategies.base import Device, Federation, StrategySetupError
from server_app.strategies.single_model import SingleModelStrategy


class FedAvg(SingleModelStrategy):
    """Federated Averaging of the full model.

    Device limits are ignored: every sampled client trains the full model, and an
    emulated device is allowed past its memory budget. It is the accuracy upper
    bound that a federation of real weak devices could not actually run. Updates are
    folded by run-config `aggregation`: `mean` is McMahan et al.'s example-weighted
    average; the default, `norm-clip+median`, bounds a hostile client (fl_app/aggregation.py).
    """

    name = "fedavg"
    enforce_memory = False

    def __init__(self, federation: Federation) -> None:
        super().__init__(federation)
        deadline = federation.config.emulated_deadline
        if deadline > 0 and federation.devices:  # memory is ignored, the run's deadline is not
            cost = federation.cost(self.model.spec)
            times = {d.node_id: federation.workload(d).device_time_s(d.profile, cost) for d in federation.devices}
            fastest = min(times, key=times.__getitem__)
            if times[fastest] > deadline:
                raise StrategySetupError(
                    f"fedavg: no device can finish a round within emulated-deadline = {deadline:g} s: the fastest, "
                    f"node {fastest}, needs {times[fastest]:.3g} s; raise emulated-deadline to at least that")

    def candidates(self) -> list[Device]:
        return self.federation.devices
