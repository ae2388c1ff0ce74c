"""Strategies by run-config name."""

from server_app.strategies.base import Strategy
from server_app.strategies.fedavg import ExclusiveFL, FedAvg

STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (FedAvg, ExclusiveFL)}
