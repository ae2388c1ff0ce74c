"""An experiment spec: a grid of runs (strategies x seeds x run-config values), read from TOML and
checked whole before anything runs.

    name = "reproduction"
    output-dir = "results/reproduction"   # relative to the spec file's folder
    nodes = 20                            # in-process nodes (partitions) per run
    workers = 2                           # runs at once (one per core)
    strategies = ["fedavg", "exclusivefl", "allsmall", "heterofl", "reft", "profl"]
    seeds = [0, 1, 2]

    [config]                              # run-config keys every run shares (as in pyproject.toml)
    dataset = "cifar10"
    data-dir = "../../../shared/data"     # a relative data-dir is taken from the spec file's folder

    [vary]                                # optional: run-config key -> values; every combination runs
    refresh-every = [0, 5]

Every run is one `RunConfig` = the pyproject defaults, then `[config]`, then its strategy, seed and
`[vary]` values, then `output-dir`/`run-name` chosen here.
"""

from __future__ import annotations

import itertools
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_app.config import ConfigError, RunConfig
from fl_app.data import DataError, load_dataset
from server_app.strategies import STRATEGIES

SPEC_KEYS = {"name", "output-dir", "nodes", "workers", "strategies", "seeds", "config", "vary", "description"}
RESERVED = {"strategy", "seed", "output-dir", "run-name", "resume"}  # set per run by the grid


class SpecError(ValueError):
    """A spec that cannot be run; the message names every problem and its fix."""


@dataclass(frozen=True)
class Run:
    """One run of the grid: its name (also its folder under `<output-dir>/runs/`) and run config."""

    name: str
    group: str  # the runs of one group differ only by seed: they are averaged in the report
    seed: int
    config: dict[str, Any]


@dataclass(frozen=True)
class Spec:
    name: str
    path: Path
    output_dir: Path
    nodes: int
    workers: int
    runs: list[Run] = field(default_factory=list)
    description: str = ""

    @property
    def runs_dir(self) -> Path:
        return self.output_dir / "runs"


def load_spec(path: Path) -> Spec:
    """Read and check `path`; SpecError listing every problem (bad keys, bad values, bad run configs,
    missing data) before any run starts."""
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the spec ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not valid TOML ({exc})") from None
    problems = [f"unknown key {k!r}; valid keys: {', '.join(sorted(SPEC_KEYS))}" for k in sorted(set(raw) - SPEC_KEYS)]
    base = path.resolve().parent
    strategies = raw.get("strategies", [])
    seeds = raw.get("seeds", [0])
    config = dict(raw.get("config", {}))
    vary = dict(raw.get("vary", {}))
    nodes, workers = raw.get("nodes", 10), raw.get("workers", 1)
    if not isinstance(strategies, list) or not strategies:
        problems.append(f"strategies = {strategies!r}: give a non-empty list, e.g. [\"fedavg\", \"reft\"]")
        strategies = []
    if not isinstance(seeds, list) or not seeds or not all(_is_int(s) for s in seeds):
        problems.append(f"seeds = {seeds!r}: give a non-empty list of integers, e.g. [0, 1, 2]")
        seeds = []
    for key, value in (("nodes", nodes), ("workers", workers)):
        if not _is_int(value) or value < 1:
            problems.append(f"{key} = {value!r}: give a positive integer")
    for key in sorted(RESERVED & (set(config) | set(vary))):
        problems.append(f"{key!r} is set by the grid for every run; remove it from [config]/[vary] "
                        "(use strategies/seeds/output-dir)")
    for key, values in vary.items():
        if not isinstance(values, list) or not values:
            problems.append(f"vary.{key} = {values!r}: give a non-empty list of values")
    if isinstance(config.get("data-dir"), str) and config["data-dir"] and not Path(config["data-dir"]).is_absolute():
        config["data-dir"] = str((base / config["data-dir"]).resolve())
    output_dir = (base / str(raw.get("output-dir", f"results/{path.stem}"))).resolve()
    runs = _expand(strategies, seeds, config, vary, output_dir / "runs") if not problems else []
    for run in runs:  # a problem shared by every run is named once, not once per run
        try:
            RunConfig.from_mapping(run.config, strategies=STRATEGIES)
        except ConfigError as exc:
            problems += [line.strip(" -") for line in str(exc).splitlines()[1:]]
    if not problems and runs:
        first = RunConfig.from_mapping(runs[0].config, strategies=STRATEGIES)
        try:
            load_dataset(first.dataset, first.data_dir, first.seed)
        except DataError as exc:
            problems.append(str(exc))
    if problems:
        raise SpecError(f"{path}: " + "; ".join(dict.fromkeys(problems)))
    return Spec(str(raw.get("name", path.stem)), path, output_dir, nodes, workers, runs, str(raw.get("description", "")))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _expand(strategies: list[str], seeds: list[int], config: dict[str, Any], vary: dict[str, list],
            runs_dir: Path) -> list[Run]:
    """The grid's runs, seed by seed: a grid stopped early holds whole seeds of every group, not every
    seed of a few groups."""
    keys = sorted(vary)
    runs = []
    for seed in seeds:
        for strategy in strategies:
            for values in itertools.product(*(vary[k] for k in keys)):
                group = strategy + "".join(f"-{k}={v}" for k, v in zip(keys, values))
                name = f"{group}-seed{seed}"
                runs.append(Run(name, group, seed, {**config, **dict(zip(keys, values)), "strategy": strategy,
                                                    "seed": seed, "output-dir": str(runs_dir), "run-name": name}))
    return runs
