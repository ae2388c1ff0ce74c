"""Device profiles: what a device can compute, hold and send, and where each number comes from.

A profile is a TOML file in `profiles/` (or anywhere, by path):

    name = "raspberry-pi-4"
    description = "Raspberry Pi 4 Model B, 4 GB"
    gflops = 3.2          # sustained fp32 GFLOPS of PyTorch training work
    memory_mb = 1200      # memory a training job may use, MB (2^20 bytes)
    uplink_mbps = 20.0
    downlink_mbps = 40.0
    [sources]             # where each number comes from: a citation or "measured ..."
    gflops = "..."
    [availability]        # optional: emulated online/offline periods (server_app/clock.py)
    mean_online_s = 1800.0
    mean_offline_s = 600.0
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from fl_app.seeds import numpy_rng

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"
NUMERIC_FIELDS = ("gflops", "memory_mb", "uplink_mbps", "downlink_mbps")
AVAILABILITY_FIELDS = ("mean_online_s", "mean_offline_s")  # both 0: always online
MAX_MIX_COUNT = 100_000  # devices of one profile in a device mix; more is a typo, not a federation


class ProfileError(ValueError):
    """A profile name, file or device mix that cannot be used; the message says why."""


# The physical range of each profile number, (low, high, unit), inclusive, and the unit mistakes that
# put a real value outside it: (what the user wrote, the factor that turns it into the right unit).
# - gflops: sustained fp32 GFLOPS of PyTorch training on one device: 0.01 (10 MFLOPS, below any board
#   that trains a network) to 1e6 (1 PFLOPS, beyond any one accelerator today, tensor cores included);
# - memory_mb: memory a training job may use, MB = 2^20 bytes: 1 (a microcontroller) to 2^24 (16 TiB,
#   beyond the largest single host);
# - uplink_mbps / downlink_mbps: link rate in Mbit/s (10^6 bit/s): 0.001 (1 kbit/s, LoRa-class) to 1e6
#   (1 Tbit/s, beyond any network card).
PHYSICAL_RANGES: dict[str, tuple[float, float, str]] = {
    "gflops": (0.01, 1e6, "GFLOPS"),
    "memory_mb": (1.0, float(2**24), "MB (2^20 bytes)"),
    "uplink_mbps": (0.001, 1e6, "Mbit/s"),
    "downlink_mbps": (0.001, 1e6, "Mbit/s"),
}
UNIT_MISTAKES: dict[str, tuple[tuple[str, float], ...]] = {
    "gflops": (("FLOPS", 1e-9), ("TFLOPS", 1e3)),
    "memory_mb": (("bytes", 1 / 2**20), ("KB (2^10 bytes)", 1 / 2**10), ("GB (2^30 bytes)", 2**10)),
    "uplink_mbps": (("bit/s", 1e-6), ("kbit/s", 1e-3), ("Gbit/s", 1e3)),
    "downlink_mbps": (("bit/s", 1e-6), ("kbit/s", 1e-3), ("Gbit/s", 1e3)),
}


def physical_range_problem(key: str, value: float) -> str | None:
    """Why `value` cannot be profile number `key` (a key of PHYSICAL_RANGES, in its unit), naming the
    likely unit mistake; None when it is within the physical range. E.g. gflops = 4.8e9 -> "... it
    looks like FLOPS: write 4.8 (GFLOPS)". Used for profile files and for the profiles nodes report."""
    low, high, unit = PHYSICAL_RANGES[key]
    if low <= value <= high:
        return None
    problem = f"{key} = {value:g} is outside the physical range {low:g}-{high:g} {unit}"
    for written, factor in UNIT_MISTAKES[key]:
        if low <= value * factor <= high:
            return f"{problem}; it looks like {written}: write {value * factor:.4g} ({unit})"
    return problem


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    gflops: float
    memory_mb: float
    uplink_mbps: float
    downlink_mbps: float
    description: str = ""
    sources: dict[str, str] = field(default_factory=dict)
    # Availability in emulated time: alternating exponential online/offline periods with these means,
    # in seconds (server_app.clock); both 0 = always online.
    mean_online_s: float = 0.0
    mean_offline_s: float = 0.0

    def __post_init__(self) -> None:
        for key in NUMERIC_FIELDS:
            if not _positive(getattr(self, key)):
                raise ProfileError(f"profile {self.name!r}: {key} must be a positive number, got {getattr(self, key)!r}")
        on, off = self.mean_online_s, self.mean_offline_s
        if not ((on == 0 and off == 0) or (_positive(on) and _positive(off))):
            raise ProfileError(f"profile {self.name!r}: [availability] mean_online_s = {on!r}, mean_offline_s = "
                               f"{off!r}: give both as positive seconds, or leave both out (always online)")

    @property
    def always_online(self) -> bool:
        return self.mean_offline_s == 0

    def to_dict(self) -> dict:
        return asdict(self)

    def to_toml(self) -> str:
        # json.dumps escapes quotes, backslashes and control characters as TOML basic strings do.
        lines = [f"name = {json.dumps(self.name)}", f"description = {json.dumps(self.description)}"]
        lines += [f"{k} = {float(getattr(self, k)):.6g}" for k in NUMERIC_FIELDS]
        lines += ["", "[sources]"] + [f"{json.dumps(k)} = {json.dumps(v)}" for k, v in self.sources.items()]
        if not self.always_online:
            lines += ["", "[availability]"] + [f"{k} = {float(getattr(self, k)):.6g}" for k in AVAILABILITY_FIELDS]
        return "\n".join(lines) + "\n"


def _positive(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value > 0)


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))


def load_profile(name_or_path: str) -> DeviceProfile:
    """A profile by name (a file in `profiles/`) or by path to a TOML file."""
    path = Path(name_or_path).expanduser()
    if path.suffix == ".toml" and not path.is_file():
        raise ProfileError(f"profile file {name_or_path!r} does not exist (resolved to {path.resolve()}); give an "
                           f"existing .toml file, or a profile name: {', '.join(available_profiles())}")
    if path.suffix != ".toml":
        path = PROFILES_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise ProfileError(f"unknown device profile {name_or_path!r}; valid names: "
                           f"{', '.join(available_profiles())} (or a path to a .toml profile file)")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProfileError(f"profile file {path}: not valid TOML ({exc})") from exc
    return profile_from_dict(data, str(path))


def profile_from_dict(data: dict, where: str) -> DeviceProfile:
    missing = [k for k in ("name", *NUMERIC_FIELDS) if k not in data]
    if missing:
        raise ProfileError(f"profile {where}: missing keys {missing}; a profile needs name, "
                           f"{', '.join(NUMERIC_FIELDS)} (see profiles/raspberry-pi-4.toml)")
    known = {"name", "description", "sources", "availability", *NUMERIC_FIELDS}
    unknown = set(data) - known
    if unknown:
        raise ProfileError(f"profile {where}: unknown keys {sorted(unknown)}; valid: {sorted(known)}")
    sources = data.get("sources", {})
    if not isinstance(sources, dict):
        raise ProfileError(f"profile {where}: [sources] must be a table of strings")
    availability = data.get("availability", {})
    if not isinstance(availability, dict) or set(availability) - set(AVAILABILITY_FIELDS):
        raise ProfileError(f"profile {where}: [availability] takes only {', '.join(AVAILABILITY_FIELDS)} "
                           f"(seconds), got {availability!r}")
    for key in NUMERIC_FIELDS:
        if _positive(data[key]):
            problem = physical_range_problem(key, data[key])
            if problem:
                raise ProfileError(f"profile {where}: {problem}")
    return DeviceProfile(name=str(data["name"]), description=str(data.get("description", "")),
                         sources={str(k): str(v) for k, v in sources.items()},
                         **{k: data[k] for k in NUMERIC_FIELDS},
                         **{k: availability.get(k, 0.0) for k in AVAILABILITY_FIELDS})


@dataclass(frozen=True)
class MemoryPool:
    """Per-node memory budgets drawn, seeded, from a uniform distribution, as in the ProFL authors'
    setup (Wu et al., KDD'25: each of 100 clients draws a budget from 100-900 MB).

    Written in the run config as `memory-pool`:
    - `"uniform:LOW-HIGH"`: MB (2^20 bytes), e.g. "uniform:100-900";
    - `"uniform-fraction:LOW-HIGH"`: fractions of the full model's predicted peak training memory at
      the run's batch size, e.g. "uniform-fraction:0.3-1.3", so the constraint binds the same way for
      any model and input size.
    """

    unit: str  # "MB" or "fraction"
    low: float
    high: float

    def draw_mb(self, partition_id: int, seed: int, full_peak_mb: float) -> float:
        """The budget of the node holding `partition_id`, in MB: the same in every process that draws it."""
        u = numpy_rng([seed, partition_id, 7129]).uniform(self.low, self.high)
        return float(u * full_peak_mb if self.unit == "fraction" else u)


def parse_memory_pool(text: str) -> MemoryPool | None:
    """`memory-pool` -> a MemoryPool, or None for "" (each profile's own memory_mb); ProfileError if malformed."""
    if not text:
        return None
    kind, _, bounds = text.partition(":")
    low, _, high = bounds.partition("-")
    units = {"uniform": "MB", "uniform-fraction": "fraction"}
    try:
        pool = MemoryPool(units[kind], float(low), float(high))
    except (KeyError, ValueError):
        raise ProfileError("expected \"uniform:LOW-HIGH\" (MB) or \"uniform-fraction:LOW-HIGH\" (of the full "
                           "model's predicted training peak), e.g. \"uniform:100-900\"") from None
    if not (0 < pool.low <= pool.high and math.isfinite(pool.high)):
        raise ProfileError(f"the bounds must satisfy 0 < LOW <= HIGH, got {pool.low:g}-{pool.high:g}")
    return pool


def pooled_profile(profile: DeviceProfile, memory_pool: str, partition_id: int, seed: int,
                   full_peak_mb: Callable[[], float]) -> DeviceProfile:
    """`profile` with its memory budget (MB = 2^20 bytes) drawn from run-config `memory-pool` for the
    node holding `partition_id` (`profile` itself if the pool is ""). `full_peak_mb` gives the full
    model's predicted training peak in MB, the reference of a "uniform-fraction" pool; it is called
    only when a pool is set. Nodes and the planner (server_app.plan) draw through this one function."""
    pool = parse_memory_pool(memory_pool)
    if pool is None:
        return profile
    return replace(profile, memory_mb=pool.draw_mb(partition_id, seed, full_peak_mb()),
                   sources={**profile.sources, "memory_mb": f"drawn from memory-pool {memory_pool!r}"})


def profile_report(profile: DeviceProfile) -> dict[str, str | float]:
    """The profile as a node reports it in the device query and as results record it: the name
    under "profile", every number as a float (availability only when the device has periods offline).
    `profile_from_report` reads it back."""
    keys = NUMERIC_FIELDS + (() if profile.always_online else AVAILABILITY_FIELDS)
    return {"profile": profile.name, **{k: float(getattr(profile, k)) for k in keys}}


def profile_from_report(report: Mapping, where: str) -> DeviceProfile:
    """The profile in a `profile_report` dict; ProfileError naming what is missing or wrong."""
    missing = [k for k in ("profile", *NUMERIC_FIELDS) if k not in report]
    if missing:
        raise ProfileError(f"device report {where}: missing {missing}")
    availability = {k: report[k] for k in AVAILABILITY_FIELDS if k in report}
    return profile_from_dict({"name": report["profile"], **{k: report[k] for k in NUMERIC_FIELDS},
                              **({"availability": availability} if availability else {})}, where)


def parse_device_mix(mix: str) -> list[str]:
    """`"raspberry-pi-4:4,laptop:2"` -> 4 x raspberry-pi-4 then 2 x laptop (profile names)."""
    names: list[str] = []
    for item in (s.strip() for s in mix.split(",")):
        if not item:
            continue
        name, _, count = item.partition(":")
        try:
            n = int(count) if count else 1
        except ValueError:
            n = -1
        if not 1 <= n <= MAX_MIX_COUNT:
            raise ProfileError(f"device-mix item {item!r}: the count after ':' must be an integer from 1 to "
                               f"{MAX_MIX_COUNT} (e.g. \"raspberry-pi-4:4,laptop:2\")")
        load_profile(name.strip())  # fail early on an unknown name
        names += [name.strip()] * n
    if not names:
        raise ProfileError("device-mix is empty; e.g. \"raspberry-pi-4:4,jetson-nano:3,laptop:3\"")
    return names


def profile_for_partition(mix: str, partition_id: int) -> DeviceProfile:
    """The profile the device mix gives a simulated node (the mix repeats past its length)."""
    names = parse_device_mix(mix)
    return load_profile(names[partition_id % len(names)])
