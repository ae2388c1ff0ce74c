"""Run the ServerApp's round loop against the real ClientApp in one process (no Ray, no SuperLink).

Benchmarks use it to compare strategies on identical data, devices and seeds at a scale a laptop
CPU can finish; the protocol, jobs, byte counts and results are exactly those of a `flwr run`.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments import inprocess  # noqa: E402


def run_inprocess(run_config: dict, num_nodes: int) -> dict:
    """Run to completion, replacing an earlier run of the same name; return the parsed results.json."""
    folder = Path(run_config["output-dir"]) / run_config["run-name"]
    shutil.rmtree(folder, ignore_errors=True)  # a benchmark regenerates its runs; the app itself never overwrites
    return inprocess.run_inprocess(run_config, num_nodes)
