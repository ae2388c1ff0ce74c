"""What a node knows about itself: its device profile, its run config and its data."""

from __future__ import annotations

from dataclasses import dataclass, replace
import tomllib

import torch
from flwr.app import ConfigRecord, Context

from client_app.faults import Fault
from fl_app.config import RunConfig
from fl_app.data import Batches, Dataset, FederatedSplit, evaluation_indices, federated_split, load_dataset
from fl_app.cost import full_training_peak_mb
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

    @classmethod
    def from_context(cls, context: Context) -> LocalNode:
        """Read partition, profile and data location from node config, falling back to the run config.

        Simulation gives only partition-id/num-partitions: the profile then comes from
        run-config `device-mix`. A deployed SuperNode sets `profile` (a profile name, a
        .toml path, or "measure") and may set `data-dir`.
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
        node = cls(config, profile, pid, n, str(nc.get("data-dir", config.data_dir)), context, faults)
        return node.with_pool_memory()

    def with_pool_memory(self) -> LocalNode:
        """This node with its memory budget drawn from run-config `memory-pool` (unchanged if it is empty).

        The draw is seeded by the run's seed and this node's partition, so every message of
        the run, and the server reading the device report, see the same budget."""
        c = self.config

        def full_mb() -> float:
            d = self.dataset
            return full_training_peak_mb(c.model, d.image_shape, d.num_classes, c.batch_size)

        profile = pooled_profile(self.profile, c.memory_pool, self.partition_id, c.seed, full_mb)
        return self if profile is self.profile else replace(self, profile=profile)

    @property
    def dataset(self) -> Dataset:
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
        idx = self.train_indices()
        d = self.dataset
        return Batches(d.x_train[idx], d.y_train[idx], d, batch_size, shuffle=True,
                       seed=self.config.seed * 7919 + self.partition_id * 104729 + round_)

    def test_batches(self, batch_size: int = 256) -> Batches:
        """This node's share of the run's evaluation set (`test-size` of the test set, as the server
        uses): every num-partitions-th example from partition-id. Empty when there are more nodes
        than test examples; evaluating it then gives no accuracy (None), not 0.0."""
        d, c = self.dataset, self.config
        subset = evaluation_indices(len(d.y_test), c.test_size, c.seed)
        idx = torch.from_numpy(subset[self.partition_id::self.num_partitions])
        return Batches(d.x_test[idx], d.y_test[idx], d, batch_size, shuffle=False)


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
