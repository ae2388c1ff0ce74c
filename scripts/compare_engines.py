#!/usr/bin/env python3
"""Per-round overhead of the deployment engine against the simulation engine, same run, same devices.

    python scripts/compare_engines.py [--rounds 2] [--strategy fedavg] [--json out.json]

Runs the app twice with one run config and three devices (raspberry-pi-4, laptop, jetson-nano):
once with `flwr run` in simulation (tests/flwr_harness.py: 3 simulated SuperNodes, profiles from
`device-mix`), once on the deployment engine (scripts/local_federation.py: a SuperLink and three
SuperNode processes on 127.0.0.1, profiles from node config). It prints the per-round wall seconds
that results.json records in each ("seconds": plan, send, train, receive, aggregate, evaluate), their
means and the ratio deployment / simulation, and each run's total wall time.

Each engine gets its own empty node data cache (FL_APP_CACHE_DIR, fl_app/data.py), so neither starts
warm: a node derives its arrays at its first message (the device query) and reads them afterwards,
as a freshly deployed node does. `--cache-dir off` measures without the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fl_app.results import load_results  # noqa: E402
from scripts.local_federation import run_local_federation  # noqa: E402
from tests.flwr_harness import flwr_simulation  # noqa: E402

PROFILES = ("raspberry-pi-4", "laptop", "jetson-nano")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--strategy", default="fedavg")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for each of the two runs")
    parser.add_argument("--json", dest="json_out", default=None)
    parser.add_argument("--cache-dir", default=None,
                        help="node data cache for both runs: 'off', or a folder (default: an empty one per engine)")
    args = parser.parse_args(argv)
    config = {"strategy": args.strategy, "num-server-rounds": args.rounds, "max-client-examples": 64,
              "test-size": 200, "public-size": 100, "compute-slack": 20.0, "min-nodes": 3,
              "device-mix": ",".join(f"{p}:1" for p in PROFILES)}
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="compare-engines-") as tmp:
        tmp_path = Path(tmp)
        for engine in ("simulation", "deployment"):
            work = tmp_path / engine
            work.mkdir()
            run_config = {**config, "output-dir": str(work / "out"), "run-name": engine}
            cache = args.cache_dir or str(work / "node-cache")
            os.environ["FL_APP_CACHE_DIR"] = cache  # inherited by every process the run starts
            start = time.monotonic()
            if engine == "simulation":
                status = flwr_simulation(work, run_config, num_supernodes=len(PROFILES),
                                         timeout_s=args.timeout).status
            else:
                result = run_local_federation(len(PROFILES), PROFILES, run_config, timeout_s=args.timeout,
                                              workdir=work)
                status, compute = result.status, result.info.get("compute-time", {})
            wall = time.monotonic() - start
            results = work / "out" / engine / "results.json"
            doc = load_results(results.parent) if results.is_file() else {"rounds": []}
            seconds = [r["seconds"] for r in doc["rounds"]]
            out[engine] = {"status": status, "wall_s": wall, "round_seconds": seconds,
                           "mean_round_s": statistics.mean(seconds) if seconds else None,
                           "devices": [d["profile"] for d in doc.get("devices", [])], "node_cache": cache,
                           "node_cache_entries": len(list(Path(cache).glob("node-*.npz"))) if cache != "off" else 0}
            if engine == "deployment":
                out[engine]["flwr_compute_time"] = compute  # serverapp-seconds, clientapp-seconds (all processes)
            print(f"{engine:10s} {status:22s} wall {wall:6.1f} s  rounds "
                  + ", ".join(f"{s:.2f}" for s in seconds) + " s"
                  + (f"  (mean {out[engine]['mean_round_s']:.2f} s)" if seconds else "")
                  + f"  node cache: {out[engine]['node_cache_entries']} entries", flush=True)
    compute = out["deployment"].get("flwr_compute_time") or {}
    if compute:
        executions = len(PROFILES) * (1 + args.rounds)  # one device query, then one train job per round
        print(f"deployment ClientApp processes: {compute.get('clientapp-seconds', 0):.1f} s in all, about "
              f"{compute.get('clientapp-seconds', 0) / executions:.1f} s per message ({executions} messages)")
    sim, dep = out["simulation"]["mean_round_s"], out["deployment"]["mean_round_s"]
    if sim and dep:
        out["ratio_deployment_over_simulation"] = dep / sim
        print(f"per-round: deployment {dep:.2f} s vs simulation {sim:.2f} s -> x{dep / sim:.2f} "
              f"(+{dep - sim:.2f} s per round)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2))
    return 0 if sim and dep else 1


if __name__ == "__main__":
    sys.exit(main())
