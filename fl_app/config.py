"""The run configuration: every key, its type and what values are valid, in one place.

Defaults live in `pyproject.toml` ([tool.flwr.app.config]) because Flower only lets a
user override keys that are declared there; this module checks every value before
any training starts and reports all problems at once, each with the valid choices.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fl_app.aggregation import Aggregation, AggregationError
from fl_app.data import DATASET_NAMES, PARTITIONS
from fl_app.job import MAX_BATCH_SIZE, MAX_EPOCHS
from fl_app.models import MODEL_NAMES
from fl_app.profiles import ProfileError, parse_device_mix, parse_memory_pool
from fl_app.seeds import SEED_RANGE
from fl_app.width import PRUNING
from fl_app.wire import ENCODINGS

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
# Keys of earlier versions: naming one says what replaced it, instead of "unknown key".
REMOVED_KEYS = {
    "constraints": "memory is now always enforced (every strategy but fedavg), and emulated-deadline is the "
                   "time budget; drop the key",
    "compute-slack": "the compute-share rule is gone: set emulated-deadline (emulated seconds a round may take "
                     "on a device) instead; drop the key",
    "profl-shrink-rounds": "use profl-shrink-share (the share of num-server-rounds ProFL's shrinking stage "
                           "takes; 0 skips it)",
}
_DATASET_PREFIXES = tuple(n.split(":")[0] + ":" for n in DATASET_NAMES if ":" in n)  # "npz:", "imagefolder:"


class ConfigError(ValueError):
    """One or more run-config values are wrong; the message lists each with the fix."""


@dataclass(frozen=True)
class RunConfig:
    strategy: str
    model: str
    dataset: str
    data_dir: str
    partition: str
    dirichlet_alpha: float
    shards_per_client: int
    max_client_examples: int
    public_size: int
    test_size: int
    num_server_rounds: int
    local_epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    augment: bool
    fraction_train: float
    device_mix: str
    memory_pool: str
    min_keep_ratio: float
    pruning: str
    encoding: str
    temperature: float
    client_distill_epochs: int
    server_distill_epochs: int
    refresh_every: int
    checkpoint: bool
    profl_shrink_share: float
    em_window: int
    em_threshold: float
    em_patience: int
    block_round_cap: int
    min_nodes: int
    round_timeout: float
    emulated_deadline: float
    availability_trace: str
    min_successful_clients: int
    round_retries: int
    aggregation: str
    resume: bool
    seed: int
    output_dir: str
    run_name: str

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], strategies: Collection[str] | None = None) -> RunConfig:
        """Validate a Flower run config (keys with dashes); raise ConfigError listing every problem.

        `strategies`: the valid strategy names (the server's registry,
        `server_app.strategies.STRATEGIES`); None skips that check, for a client, which runs
        jobs and never needs to know the strategy."""
        merged = {**default_run_config(), **values}
        problems = []
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        for key in sorted(set(merged) - set(known)):
            problems.append(f"{key} was removed: {REMOVED_KEYS[key]}" if key in REMOVED_KEYS
                            else f"unknown key {key!r}; valid keys: {', '.join(sorted(known))}")
        if strategies is not None and merged.get("strategy") not in strategies:
            problems.append(f"strategy = {merged.get('strategy')!r}: valid choices are {', '.join(strategies)}")
        kwargs = {}
        for key, f in known.items():
            value, expected = merged.get(key), f.type
            ok = {"int": isinstance(value, int) and not isinstance(value, bool),
                  "float": isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value),
                  "bool": isinstance(value, bool), "str": isinstance(value, str)}[expected]
            if not ok:
                article = "an" if expected == "int" else "a"
                problems.append(f"{key} = {value!r}: expected {article} {'finite ' if expected == 'float' else ''}"
                                f"{expected}")
                continue
            kwargs[f.name] = float(value) if expected == "float" else value
        if not problems:
            config = cls(**kwargs)
            problems = config._check_values()
            if not problems:
                return config
        raise ConfigError("invalid run config:\n  - " + "\n  - ".join(problems))

    def _check_values(self) -> list[str]:
        p = []

        def choice(key: str, value: str, valid: tuple[str, ...]) -> None:
            if value not in valid:
                p.append(f"{key} = {value!r}: valid choices are {', '.join(valid)}")

        def at_least(key: str, value: float, low: float, strict: bool = False) -> None:
            if value < low or (strict and value == low):
                p.append(f"{key} = {value!r}: must be {'>' if strict else '>='} {low}")

        choice("model", self.model, MODEL_NAMES)
        choice("partition", self.partition, PARTITIONS)
        choice("encoding", self.encoding, ENCODINGS)
        choice("pruning", self.pruning, PRUNING)
        try:
            parse_memory_pool(self.memory_pool)
        except ProfileError as exc:
            p.append(f"memory-pool = {self.memory_pool!r}: {exc}")
        if not 0 < self.min_keep_ratio <= 1:
            p.append(f"min-keep-ratio = {self.min_keep_ratio!r}: must be in (0, 1]")
        at_least("temperature", self.temperature, 0, strict=True)
        if self.strategy == "reft" and self.public_size < 1:
            p.append("public-size = 0: reft distills on the public slice; give it at least 1 example")
        if not (self.dataset in DATASET_NAMES or self.dataset.startswith(_DATASET_PREFIXES)):
            p.append(f"dataset = {self.dataset!r}: valid choices are {', '.join(DATASET_NAMES)}")
        at_least("dirichlet-alpha", self.dirichlet_alpha, 0, strict=True)
        for key in ("shards-per-client", "num-server-rounds", "local-epochs", "batch-size", "min-nodes",
                    "em-window", "em-patience", "min-successful-clients"):
            at_least(key, getattr(self, key.replace("-", "_")), 1)
        for key in ("max-client-examples", "public-size", "test-size", "momentum", "weight-decay",
                    "client-distill-epochs", "server-distill-epochs", "refresh-every", "block-round-cap",
                    "em-threshold", "round-timeout", "emulated-deadline", "round-retries"):
            at_least(key, getattr(self, key.replace("-", "_")), 0)
        at_least("lr", self.lr, 0, strict=True)
        if not 0 <= self.profl_shrink_share < 1:
            p.append(f"profl-shrink-share = {self.profl_shrink_share!r}: must be in [0, 1) (0 skips shrinking; the "
                     "growing stage needs rounds too)")
        for key, high in (("local-epochs", MAX_EPOCHS), ("client-distill-epochs", MAX_EPOCHS),
                          ("batch-size", MAX_BATCH_SIZE)):
            if getattr(self, key.replace("-", "_")) > high:
                p.append(f"{key} = {getattr(self, key.replace('-', '_'))!r}: at most {high}, what a client agrees "
                         "to run (fl_app/job.py, check_bounds)")
        if not 0 < self.fraction_train <= 1:
            p.append(f"fraction-train = {self.fraction_train!r}: must be in (0, 1]")
        try:
            parse_device_mix(self.device_mix)
        except ProfileError as exc:
            p.append(f"device-mix = {self.device_mix!r}: {exc}")
        if not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            p.append(f"seed = {self.seed}: must be a signed 64-bit integer, {SEED_RANGE[0]} to {SEED_RANGE[1]} "
                     "(any such integer works; fl_app.seeds derives the generators' seeds from it)")
        if "/" in self.run_name or self.run_name.startswith("."):
            p.append(f"run-name = {self.run_name!r}: must be a plain folder name")
        if self.min_successful_clients > self.min_nodes:
            p.append(f"min-successful-clients = {self.min_successful_clients}: must be <= min-nodes "
                     f"({self.min_nodes}), or no round could ever succeed with the nodes the run waits for")
        try:
            if Aggregation.parse(self.aggregation).trust and self.public_size == 0:  # < 0 is reported above
                p.append(f"aggregation = {self.aggregation!r} with public-size = 0: fltrust's root dataset is the "
                         "public slice; give it examples (FLTrust used 100) or set aggregation = 'mean' (or "
                         "'norm-clip+median', which need no root data)")
        except AggregationError as exc:
            p.append(str(exc))
        if self.resume and not self.run_name:
            p.append("resume = true: also set run-name to the run to continue (its folder under output-dir "
                     "holds checkpoint.pt)")
        return p


def default_run_config() -> dict[str, Any]:
    """The defaults declared in pyproject.toml."""
    with open(PYPROJECT, "rb") as f:
        return dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])
