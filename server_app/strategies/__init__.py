"""Strategies by run-config name."""

from server_app.strategies.base import Strategy
from server_app.strategies.fedavg import AllSmall, ExclusiveFL, FedAvg
from server_app.strategies.heterofl import HeteroFL
from server_app.strategies.profl import ProFL
from server_app.strategies.reft import REFT

STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (FedAvg, ExclusiveFL, AllSmall, HeteroFL, REFT, ProFL)}
