"""Strategies by run-config name: a new strategy is one file in this folder plus one entry here."""

from server_app.strategies.allsmall import AllSmall
from server_app.strategies.base import Strategy
from server_app.strategies.depthfl import DepthFL
from server_app.strategies.exclusivefl import ExclusiveFL
from server_app.strategies.fedavg import FedAvg
from server_app.strategies.fedrolex import FedRolex
from server_app.strategies.heterofl import HeteroFL
from server_app.strategies.profl import ProFL
from server_app.strategies.reft import REFT

STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (FedAvg, ExclusiveFL, AllSmall, HeteroFL, FedRolex, REFT,
                                                                ProFL, DepthFL)}
