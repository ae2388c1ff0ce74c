"""What a node knows about itself: its device profile, its run config and its data.

A node reads and trains on its own rows only (`LocalNode.data`: its partition, the public slice,
its test share), which `fl_app.data.node_data` keeps in an on-disk cache: a deployed node runs
each message in a fresh process and would otherwise load the dataset and derive the split again
every time. Node-config `cache-dir` (else environment variable FL_APP_CACHE_DIR, else
~/.cache/fl-app/nodes) says where; "off" turns it off. The cache only saves time: its arrays are
those a fresh derivation gives, and a stale or damaged file is derived again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
import tomllib

import torch
from flwr.app import ConfigRecord, Context

from client_app.faults import Fault
from fl_app.config import RunConfig
from fl_app.data import (Batches, DataError, Dataset, FederatedSplit, NodeData, evaluation_indices, federated_split,
                         load_dataset, node_data, resolve_cache_dir)
from fl_app.units import MIB
from fl_app.profiles import DeviceProfile, load_profile, pooled_profile, profile_for_partition, profile_from_dict


class NodeConfigError(ValueError):
    """A node-config value that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class LocalNode:
    config: RunConfig
    profile: DeviceProfile
    partition_id: int
    num_partitions: int
    data_dir: str
    context: Context
    faults: tuple[Fault, ...] = ()  # injected misbehaviour, for resilience tests (client_app/faults.py)
    cache_dir: str = ""  # where its arrays are cached ("" = not cached; fl_app.data.resolve_cache_dir)
    own_profile: bool = False  # the node config names the profile (a SuperNode), not the run config (simulation)

    @classmethod
    def from_context(cls, context: Context) -> LocalNode:
        """Read partition, profile and data location from node config, falling back to the run config.

        Simulation gives only partition-id/num-partitions: the profile then comes from
        run-config `device-mix`. A deployed SuperNode sets `profile` (a profile name, a
        .toml path, or "measure") and may set `data-dir` and `cache-dir` (see the module doc).
        """
        config = RunConfig.from_mapping(dict(context.run_config))
        nc = dict(context.node_config)
        try:
            pid, n = int(nc.get("partition-id", 0)), int(nc.get("num-partitions", 1))
        except (TypeError, ValueError) as exc:
            raise NodeConfigError(f"node config partition-id = {nc.get('partition-id')!r}, num-partitions = "
                                  f"{nc.get('num-partitions')!r}: both must be integers, e.g. "
                                  "--node-config 'partition-id=0 num-partitions=10'") from exc
        if not 0 <= pid < n:
            raise NodeConfigError(f"node config partition-id={pid} must be in [0, num-partitions={n})")
        profile = (node_profile(str(nc["profile"]), context) if "profile" in nc
                   else profile_for_partition(config.device_mix, pid))
        faults = tuple(Fault.parse_all(str(nc["fault"]))) if nc.get("fault") else ()
        cache = resolve_cache_dir(str(nc["cache-dir"]) if "cache-dir" in nc else None)
        node = cls(config, profile, pid, n, str(nc.get("data-dir", config.data_dir)), context, faults, cache,
                   own_profile="profile" in nc)
        return node.with_pool_memory()

    def with_pool_memory(self) -> LocalNode:
        """This node with its memory budget drawn from run-config `memory-pool` (unchanged if it is empty).

        The draw is seeded by the run's seed and this node's partition, so every message of
        the run, and the server reading the device report, see the same budget."""
        c = self.config

        def full_mb() -> float:
            from fl_app.cost import full_training_peak_mb  # only for this pool: its import costs ~0.2 s a message

            d = self.data
            return full_training_peak_mb(c.model, d.image_shape, d.num_classes, c.batch_size)

        profile = pooled_profile(self.profile, c.memory_pool, self.partition_id, c.seed, full_mb)
        return self if profile is self.profile else replace(self, profile=profile)

    @property
    def data(self) -> NodeData:
        """This node's rows: partition, public slice, test share (cached; see the module doc)."""
        c = self.config
        return node_data(c.dataset, self.data_dir, c.seed, self.num_partitions, self.partition_id, c.partition,
                         c.dirichlet_alpha, c.shards_per_client, c.public_size, c.max_client_examples, c.test_size,
                         self.cache_dir)

    def memory_limit_bytes(self, job_enforces: bool) -> int | None:
        """The training memory limit: the profile's budget, unless a SIMULATED node's job says not to.

        A SuperNode whose own node config names its profile always enforces it: the server (or
        whoever submitted the run) cannot switch that off (FedAvg's upper bound then fails as the
        device would). In simulation the profile itself comes from the run config, so the job decides."""
        return int(self.profile.memory_mb * MIB) if job_enforces or self.own_profile else None

    @property
    def num_examples(self) -> int:
        return len(self.data.y_train)

    @property
    def dataset(self) -> Dataset:
        """The whole dataset (loaded, never cached on disk); the node's messages use `data`."""
        return load_dataset(self.config.dataset, self.data_dir, self.config.seed)

    @property
    def split(self) -> FederatedSplit:
        """The federated split every party derives alike from the run config (cached in fl_app.data)."""
        c = self.config
        return federated_split(self.dataset, self.num_partitions, c.partition, c.seed, c.dirichlet_alpha,
                               c.shards_per_client, c.public_size, c.max_client_examples)

    def train_indices(self) -> torch.Tensor:
        return torch.from_numpy(self.split.clients[self.partition_id])

    def public_indices(self) -> torch.Tensor:
        return torch.from_numpy(self.split.public)

    def train_batches(self, batch_size: int, round_: int) -> Batches:
        d = self.data
        return Batches(d.x_train, d.y_train, d, batch_size, shuffle=True,
                       seed=self.config.seed * 7919 + self.partition_id * 104729 + round_)

    def test_batches(self, batch_size: int = 256) -> Batches:
        """This node's share of the run's evaluation set (`test-size` of the test set, as the server
        uses): every num-partitions-th example from partition-id (`fl_app.data.evaluation_indices`).
        Empty when there are more nodes than test examples; evaluating it then gives no accuracy
        (None), not 0.0."""
        try:
            d = self.data
        except DataError:  # no valid split (e.g. public-size too large): the test share does not need one
            full, c = self.dataset, self.config
            subset = evaluation_indices(len(full.y_test), c.test_size, c.seed)
            idx = torch.from_numpy(subset[self.partition_id::self.num_partitions])
            return Batches(full.x_test[idx], full.y_test[idx], full, batch_size, shuffle=False)
        return Batches(d.x_test, d.y_test, d, batch_size, shuffle=False)


MEASURED = "measured-profile"  # context.state record: this node's measurement, taken once per run


def node_profile(value: str, context: Context) -> DeviceProfile:
    """A profile name, a .toml path, or "measure": this machine, measured on the first message.

    Deployed ClientApps run in a fresh process per message, so the measurement is kept
    in the node's context state: every message of the run then reports the same numbers.
    """
    if value != "measure":
        return load_profile(value)
    if MEASURED not in context.state:
        from fl_app.measure import measure_profile

        profile = measure_profile("measured", uplink_mbps=50.0, downlink_mbps=100.0)
        context.state[MEASURED] = ConfigRecord({"toml": profile.to_toml()})
    return profile_from_dict(tomllib.loads(str(context.state[MEASURED]["toml"])), "this node's measurement")
