"""HeteroFL (Diao et al., ICLR 2021): static width-scaled submodels, aggregated channel by channel."""

from __future__ import annotations

from fl_app.width import ChannelMap
from server_app.strategies.width_scaled import WidthScaledStrategy


class HeteroFL(WidthScaledStrategy):
    """Each device trains the first k channels of every layer, k sized to its budget: the same
    channels every round, so the channels past the strongest device's share are trained by
    fewer clients (and the last ones only by devices that afford the full model)."""

    name = "heterofl"

    def channels(self, widths: dict[str, int], server_round: int) -> ChannelMap:
        return {g: list(range(k)) for g, k in widths.items()}
