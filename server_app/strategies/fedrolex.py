"""FedRolex (Alam et al., NeurIPS 2022): width-scaled submodels whose channel window rolls every round."""

from __future__ import annotations

from fl_app.width import ChannelMap
from server_app.strategies.width_scaled import WidthScaledStrategy


class FedRolex(WidthScaledStrategy):
    """HeteroFL's width-scaled submodels, aggregated the same way, but the window of channels a
    submodel takes rolls by one position every round: in round r a group of C channels kept at
    width k takes channels r-1, r, ..., r+k-2 (mod C). Within C rounds every channel of the
    global model is trained by every device, not only the first k (FedRolex's "rolling
    sub-model extraction", Alam et al., 2022, Sec. 3)."""

    name = "fedrolex"

    def channels(self, widths: dict[str, int], server_round: int) -> ChannelMap:
        full = self.model.spec.resolved_widths()
        return {g: rolling_window(full[g], k, server_round - 1) for g, k in widths.items()}


def rolling_window(channels: int, width: int, start: int) -> list[int]:
    """`width` consecutive channels of `channels`, starting at `start` (mod `channels`) and
    wrapping around, sorted (a `ChannelMap` holds sorted indices)."""
    return sorted((start + i) % channels for i in range(width))
