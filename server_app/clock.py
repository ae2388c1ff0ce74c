"""The virtual clock: emulated time, deadlines and availability, the same in simulation and deployment.

In simulation every client trains at the host's speed, so an emulated Raspberry Pi would finish as
fast as a workstation. The virtual clock restores the device's pace (FedScale's practice: Lai et al.,
"FedScale: Benchmarking Model and System Performance of Federated Learning at Scale", ICML 2022,
virtual clock and deadline-based rounds): a round starts at the clock's `now_s`; the reply of a client
"arrives" `device_time_s` later, its emulated seconds on its device (compute at its GFLOPS plus
transfers at its link rates, `server_app.pricing.price_task`). Then

- a client whose reply arrives after `emulated-deadline` seconds (0 = no deadline) missed it: its
  update is not aggregated, its record says why, its traffic still counts (it crossed the wire);
- a client whose node goes offline (its availability model) before its reply arrives dropped out:
  its update never arrives, the bytes sent to it still count;
- the round lasts until the deadline when anyone missed it or dropped out, otherwise until its
  slowest reply: the deadline or the slowest included client, whichever is less;
- a node offline at a round's start is not sampled (as Flower's grid does not list a node whose
  heartbeat stopped).

Availability (`NodeAvailability`): a node is online or offline for periods of emulated time, from
its profile's `[availability]` (seeded alternating exponential on/off durations with the given means)
or from the run config's `availability-trace` file (offline intervals per partition id or profile).

Time on the server (aggregation, server-side distillation, evaluation) is not on the clock: it is
the same for every strategy's devices and is recorded in wall seconds as each round's `seconds`.
The real deadline of the deployment engine, `round-timeout` (wall seconds the ServerApp waits for
replies), is separate: it bounds how long a real run waits; the emulated deadline decides, in
emulated seconds, which replies count.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fl_app.config import ConfigError, RunConfig
from fl_app.seeds import numpy_rng
from server_app.pricing import price_task
from server_app.rounds import TaskOutcome
from server_app.strategies.base import Device, Federation

AVAILABILITY_SEED = 4111  # mixed with the run seed and the partition id: one stream per node


class NodeAvailability:
    """When one node is offline, in emulated seconds since the run started.

    `offline` holds sorted, disjoint [start, end) intervals. An on/off model generates them lazily
    from its seeded generator as far as the clock asks, so a run of any length costs only the
    periods it reaches."""

    def __init__(self, offline: list[tuple[float, float]] | None = None) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []
        for start, end in sorted(offline or []):
            self._append(start, end)
        self._rng: np.random.Generator | None = None
        self._means = (math.inf, 0.0)
        self._horizon = math.inf  # generated up to here (inf: a fixed trace, nothing to generate)

    @classmethod
    def on_off(cls, mean_online_s: float, mean_offline_s: float, rng: np.random.Generator) -> NodeAvailability:
        """Alternating exponential online/offline periods with these means (seconds), started in the
        stationary state: online at t = 0 with probability mean_online_s / (mean_online_s + mean_offline_s)."""
        node = cls()
        node._rng, node._means, node._horizon = rng, (mean_online_s, mean_offline_s), 0.0
        if rng.random() >= mean_online_s / (mean_online_s + mean_offline_s):  # starts offline
            node._append(0.0, rng.exponential(mean_offline_s))
            node._horizon = node.ends[-1]
        return node

    def _append(self, start: float, end: float) -> None:
        if end <= start:
            return
        if self.ends and start <= self.ends[-1]:  # overlapping or touching: one interval
            self.ends[-1] = max(self.ends[-1], end)
        else:
            self.starts.append(start)
            self.ends.append(end)

    def _generate_until(self, t: float) -> None:
        mean_on, mean_off = self._means
        while self._horizon <= t and self._rng is not None:
            start = self._horizon + self._rng.exponential(mean_on)
            end = start + self._rng.exponential(mean_off)
            self._append(start, end)
            self._horizon = end

    def online_at(self, t: float) -> bool:
        """Whether the node is online at emulated second `t`."""
        self._generate_until(t)
        i = bisect.bisect_right(self.starts, t) - 1
        return i < 0 or t >= self.ends[i]

    def offline_between(self, start: float, end: float) -> float | None:
        """The first emulated second in [start, end) at which the node is offline, or None."""
        if not self.online_at(start):
            return start
        self._generate_until(end)
        i = bisect.bisect_right(self.starts, start)
        return self.starts[i] if i < len(self.starts) and self.starts[i] < end else None


def load_availability_trace(path: str) -> dict[str, list[tuple[float, float]]]:
    """Run-config `availability-trace`: a JSON file {"offline": {KEY: [[start_s, end_s], ...]}} where KEY
    is a partition id ("3": that node) or a profile name (every node of that profile; a partition id
    wins). Seconds of emulated time since the run started. ConfigError naming the problem and the fix."""
    hint = ('; expected {"offline": {"<partition id or profile name>": [[start_s, end_s], ...]}} '
            "(seconds of emulated time)")
    try:
        doc = json.loads(Path(path).expanduser().read_text())
    except OSError as exc:
        raise ConfigError(f"availability-trace = {path!r}: cannot read it ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ConfigError(f"availability-trace = {path!r}: not valid JSON ({exc})") from None
    table = doc.get("offline") if isinstance(doc, dict) else None
    if not isinstance(table, dict):
        raise ConfigError(f"availability-trace = {path!r}: no \"offline\" table{hint}")
    trace = {}
    for key, intervals in table.items():
        try:
            pairs = [(float(a), float(b)) for a, b in intervals]
        except (TypeError, ValueError):
            raise ConfigError(f"availability-trace = {path!r}: {key!r} is not a list of [start_s, end_s] "
                              f"pairs{hint}") from None
        bad = [p for p in pairs if not (0 <= p[0] < p[1] and math.isfinite(p[1]))]
        if bad:
            raise ConfigError(f"availability-trace = {path!r}: {key!r} has intervals {bad[:2]} that are not "
                              "0 <= start < end < inf")
        trace[str(key)] = pairs
    return trace


def node_availability(device: Device, seed: int, trace: dict[str, list[tuple[float, float]]]) -> NodeAvailability:
    """The availability of `device`: its partition's trace, else its profile's trace, else its profile's
    on/off model (seeded by the run seed and its partition id), else always online."""
    for key in (str(device.partition_id), device.profile.name):
        if key in trace:
            return NodeAvailability(trace[key])
    p = device.profile
    if p.mean_offline_s > 0:
        rng = numpy_rng([seed, device.partition_id, AVAILABILITY_SEED])
        return NodeAvailability.on_off(p.mean_online_s, p.mean_offline_s, rng)
    return NodeAvailability()


@dataclass
class AttemptTime:
    """What the clock settled for one attempt of a round (seconds are emulated)."""

    duration_s: float
    missed_deadline: int = 0
    dropped_out: int = 0


@dataclass
class VirtualClock:
    """Emulated seconds since the run started (`now_s`), the emulated deadline, and every node's
    availability. `advance` settles an attempt's replies; `offline_now` is who cannot be sampled."""

    deadline_s: float  # emulated seconds; 0 = none
    seed: int
    trace: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    now_s: float = 0.0
    _nodes: dict[int, NodeAvailability] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def for_run(cls, config: RunConfig, now_s: float = 0.0) -> VirtualClock:
        """The clock of a run at `now_s`; ConfigError if its `availability-trace` cannot be used."""
        trace = load_availability_trace(config.availability_trace) if config.availability_trace else {}
        return cls(config.emulated_deadline, config.seed, trace, now_s)

    def unmatched_trace_keys(self, devices: list[Device]) -> list[str]:
        """Keys of the availability trace that name no node's partition id or profile (likely typos)."""
        names = {str(d.partition_id) for d in devices} | {d.profile.name for d in devices}
        return sorted(set(self.trace) - names)

    def availability(self, device: Device) -> NodeAvailability:
        if device.node_id not in self._nodes:
            self._nodes[device.node_id] = node_availability(device, self.seed, self.trace)
        return self._nodes[device.node_id]

    def offline_now(self, devices: list[Device]) -> set[int]:
        """Nodes whose availability model has them offline at `now_s`."""
        return {d.node_id for d in devices if not self.availability(d).online_at(self.now_s)}

    def advance(self, federation: Federation, outcomes: list[TaskOutcome]) -> AttemptTime:
        """Settle one attempt that started at `now_s`: give each outcome its emulated `arrival_s`,
        turn late replies into deadline misses and replies of nodes that went offline into dropouts
        (no update, the reason in `error`), then move `now_s` to the attempt's end."""
        deadline = self.deadline_s or math.inf
        settled = AttemptTime(0.0)
        ends = []
        for o in outcomes:
            device = federation.device(o.task.node_id)
            if device is None or (o.update is None and not o.rejected):
                continue  # no reply (an error, a real timeout): no emulated time to settle
            examples = o.update.num_examples if o.update else o.task.job.train.epochs * device.num_examples
            o.price = price_task(federation, device, o.task, examples, o.bytes_down, o.bytes_up)
            arrival_s = o.price.device_time_s
            if o.rejected:  # it arrived, and was refused for what it held
                ends.append(min(arrival_s, deadline))
                continue
            offline_at = self.availability(device).offline_between(self.now_s, self.now_s + arrival_s)
            if offline_at is not None and offline_at - self.now_s < deadline:
                o.update, o.dropped_out, o.bytes_up, o.bytes_up_by_record = None, True, 0, {}
                o.error = (f"dropped out: offline from emulated t = {offline_at:.2f} s, before its reply was due "
                           f"at t = {self.now_s + arrival_s:.2f} s (availability model)")
                settled.dropped_out += 1
                ends.append(offline_at - self.now_s)
            elif arrival_s > deadline:
                o.update, o.missed_deadline = None, True
                o.error = (f"missed the emulated deadline: {arrival_s:.1f} s of device time > "
                           f"emulated-deadline = {deadline:g} s")
                settled.missed_deadline += 1
            else:
                ends.append(arrival_s)
        late = settled.missed_deadline or (settled.dropped_out and math.isfinite(deadline))
        settled.duration_s = deadline if late else max(ends, default=0.0)
        self.now_s += settled.duration_s
        return settled
