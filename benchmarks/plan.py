"""Time the planner (python -m server_app.plan): every strategy, 10 devices (the default device mix),
ResNet-18 on CIFAR-10 shapes (known sizes: no images are read), the default 5 rounds.

    python benchmarks/plan.py | tee benchmarks/results/plan.txt

Prints wall and CPU seconds per step in the order make_plan runs them (the strategies share the cost
model's cache, so the first to price a submodel pays for it) and the total, with the commit and the
load average: on a shared machine wall time is CPU time stretched by the load, and CPU time grows too
(torch's two intra-op threads wait for each other), so compare runs made at a similar load.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

started_wall, started_cpu = time.perf_counter(), time.process_time()

import torch  # noqa: E402

from fl_app.models import ModelSpec  # noqa: E402
from fl_app.profiles import parse_device_mix  # noqa: E402
from fl_app.training import check_input_size  # noqa: E402
from server_app.plan import _Wire, plan_config, plan_dataset, plan_devices, plan_strategy  # noqa: E402
from server_app.strategies import STRATEGIES  # noqa: E402

RUN_CONFIG = {"model": "resnet18", "dataset": "cifar10"}


def main() -> None:
    imported_wall, imported_cpu = time.perf_counter() - started_wall, time.process_time() - started_cpu
    print("=== planner benchmark ===")
    print(f"date:     {datetime.now(timezone.utc).isoformat(timespec='seconds')}")
    print("command:  python benchmarks/plan.py   (from the repository root)")
    print(f"commit:   {_commit()}")
    print("same as:  python -m server_app.plan --run-config \"model='resnet18' dataset='cifar10'\"  (minus printing)")
    print(f"torch:    {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}, "
          f"os.cpu_count() = {os.cpu_count()}")
    print(f"load:     1/5/15-min load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"\n{'step':<34}{'wall s':>9}{'cpu s':>9}")
    print(f"{'import (torch, flwr, the app)':<34}{imported_wall:>9.2f}{imported_cpu:>9.2f}")
    wall, cpu = time.perf_counter(), time.process_time()

    def lap(label: str) -> None:
        nonlocal wall, cpu
        print(f"{label:<34}{time.perf_counter() - wall:>9.2f}{time.process_time() - cpu:>9.2f}", flush=True)
        wall, cpu = time.perf_counter(), time.process_time()

    config = plan_config(RUN_CONFIG)
    dataset, loaded = plan_dataset(config)
    check_input_size(ModelSpec(config.model, dataset.num_classes, dataset.image_shape[0]), dataset.image_shape,
                     config.batch_size)
    devices = plan_devices(config, dataset, len(parse_device_mix(config.device_mix)))
    lap(f"config, data shape, {len(devices)} devices")
    wire, summaries = _Wire(), []
    for name in STRATEGIES:
        plan = plan_strategy(name, config, devices, dataset, wire)
        lap(f"strategy {name}")
        summaries.append((name, plan))
    total_wall, total_cpu = time.perf_counter() - started_wall, time.process_time() - started_cpu
    print(f"{'total (import included)':<34}{total_wall:>9.2f}{total_cpu:>9.2f}")
    print(f"{'total planning (import excluded)':<34}{total_wall - imported_wall:>9.2f}{total_cpu - imported_cpu:>9.2f}")
    print(f"load:     at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}; images loaded: {loaded}")
    print("\nwhat was planned (round 1): participants, slowest device seconds, MB down/up (10^6 bytes)")
    for name, plan in summaries:
        if plan.error:
            print(f"  {name:<12} cannot run: {plan.error}")
            continue
        r = plan.round_summary(1)
        print(f"  {name:<12} {r['participants']:>2} devices  {r['seconds']:>8.1f} s  "
              f"{r['bytes_down'] / 1e6:>8.1f} / {r['bytes_up'] / 1e6:.1f} MB")


def _commit() -> str:
    """The checked-out commit, and whether the code this benchmark runs differs from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--", "fl_app", "server_app", "benchmarks/plan.py"],
                                 cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" with uncommitted changes in fl_app/, server_app/ or this script" if changed else "")


if __name__ == "__main__":
    main()
