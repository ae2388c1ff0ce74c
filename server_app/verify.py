"""What the server checks itself in what nodes tell it: nothing a node reports is trusted as given.

- Sizes: a reply's size is read from its records' metadata (`payload_bytes`: array buffer lengths,
  string lengths), with no copy, before anything is decoded, serialized or counted.
- Text: every string a node sends (profile name, error reason, tensor names) is bounded and reduced to
  printable ASCII (`node_text`) before it reaches a log line or results.json.
- Data: every party derives the federated split from the run config (fl_app.data.federated_split), so
  the server derives it too and holds each device report to it (`check_partitions`): the agreed
  num-partitions, a partition id nobody else claims, and the example count of that partition.

Physical ranges of a reported profile (GFLOPS, memory, link rates) are fl_app.profiles' to check.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from flwr.app import ArrayRecord, RecordDict

from fl_app.config import RunConfig
from fl_app.data import Dataset, federated_split
from server_app.strategies.base import Device

QUERY_REPLY_BOUND = 64 * 1024  # bytes: a device report is a dozen numbers and a profile name
NAME_LIMIT = 64  # characters of a node-supplied name kept (profile names, tensor names)
REASON_LIMIT = 500  # characters of a node-supplied error reason kept


def payload_bytes(content: RecordDict) -> int:
    """The bytes `content` carries, from metadata only (array buffer lengths, key and value lengths):
    no copy, no serialization. Within a few bytes per entry of Flower's serialized size."""
    total = 0
    for name, record in content.items():
        total += len(name)
        if isinstance(record, ArrayRecord):
            total += sum(len(key) + len(array.data) + 8 * len(array.shape) + len(array.dtype)
                         for key, array in record.items())
        else:  # ConfigRecord, MetricRecord: scalars, strings, bytes, lists of them
            total += sum(len(key) + _value_bytes(value) for key, value in record.items())
    return total


def _value_bytes(value: object) -> int:
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    return 8


def node_text(value: object, limit: int = NAME_LIMIT) -> str:
    """`value` as text safe to log and record: printable ASCII only (anything else, a newline included,
    becomes '?'), at most `limit` characters, and a longer one cut with its original length said."""
    text = str(value)
    cut = text[:limit]
    safe = "".join(c if " " <= c <= "~" else "?" for c in cut)
    return safe if len(text) <= limit else f"{safe}...({len(text)} characters)"


def agreed_partitions(devices: Iterable[Device], num_nodes: int) -> int:
    """The num-partitions the federation uses: the value most devices report (ties: the one nearest the
    number of connected nodes, as simulation gives one partition per node)."""
    counts = Counter(d.num_partitions for d in devices if d.num_partitions is not None)
    if not counts:
        return num_nodes
    top = max(counts.values())
    return min((n for n, c in counts.items() if c == top), key=lambda n: (abs(n - num_nodes), n))


def check_partitions(devices: list[Device], num_partitions: int, dataset: Dataset, config: RunConfig,
                     held: dict[int, int] | None = None) -> tuple[list[Device], list[tuple[int, str]]]:
    """Hold each device report to the split the server derives itself: (the devices that pass, (node,
    why) of each left out). A device is left out when it reports another num-partitions than the
    agreed `num_partitions`, a partition id outside it, a partition another node claims (all claimants
    are left out: the server cannot tell which is honest), or an example count other than that
    partition's. `held`: partition -> node of devices already in the run (a joiner may not claim theirs)."""
    split = federated_split(dataset, num_partitions, config.partition, config.seed, config.dirichlet_alpha,
                            config.shards_per_client, config.public_size, config.max_client_examples)
    held = held or {}
    claims = Counter(d.partition_id for d in devices if d.num_partitions == num_partitions)
    kept, problems = [], []
    for d in devices:
        p = d.partition_id
        if d.num_partitions != num_partitions:
            why = (f"reports num-partitions = {d.num_partitions}, the federation uses {num_partitions} "
                   "(set the same num-partitions on every SuperNode)")
        elif not 0 <= p < num_partitions:
            why = f"reports partition {p}, outside 0..{num_partitions - 1}"
        elif claims[p] > 1 or p in held:
            others = sorted({o.node_id for o in devices if o.partition_id == p and o.num_partitions == num_partitions}
                            - {d.node_id}
                            | ({held[p]} if p in held else set()))
            why = (f"claims partition {p}, which nodes {others} claim too (give every SuperNode its own "
                   "partition-id)")
        elif d.num_examples != len(split.clients[p]):
            why = (f"reports {d.num_examples} training examples; partition {p} of {num_partitions} holds "
                   f"{len(split.clients[p])} under this run's split")
        else:
            kept.append(d)
            continue
        problems.append((d.node_id, why))
    return kept, problems
