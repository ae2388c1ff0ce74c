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

    python scripts/compare_engines.py --breakdown [--repeat 3]

instead times the steps of one deployment message, each in a fresh process as `flwr-clientapp` runs
it, alone on the machine: the Flower runtime's imports, the ClientApp's import, the node's data, model
build, the first optimizer (torch.optim's imported torch._dynamo until 76c20a5), training, the reply's encoding, and the
interpreter's exit; a query and a train message with an empty node cache, then both again with it
filled. The process's start is the whole wall time less the steps and the exit.

    python scripts/compare_engines.py --floor [--rounds 2]

also runs benchmarks/flower_floor (a ServerApp that sends each node one message per round and a
ClientApp that answers at once, importing only Flower) on both engines with the same three nodes: the
least a round costs on each engine whatever the app does. The deployment round's excess over that
floor is what the app's own code in a message can still change. Four runs in all: about 2.5 min on a
quiet 2-core machine (the app's two about 1.5 min). The floor app alone:
`flwr run benchmarks/flower_floor --run-config "timings-file='/abs/path/timings.json'"`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.local_federation import run_local_federation  # noqa: E402
from tests.flwr_harness import flwr_simulation  # noqa: E402

PROFILES = ("raspberry-pi-4", "laptop", "jetson-nano")

# One message's steps, timed inside a fresh process (argv[1]: query or train). It calls the ClientApp's
# own functions in the order a message runs them; a tree without the node cache (LocalNode.data) is
# timed through LocalNode.dataset and the split instead, so the same code measures a checkout before it.
STEPS = r"""
import sys, time
t0 = time.perf_counter(); rows = []
def mark(name):
    global t0
    t = time.perf_counter(); rows.append((name, t - t0)); t0 = t
kind = sys.argv[1]
import flwr.supernode.runtime.run_clientapp
mark("import flwr-clientapp runtime")
import client_app.client_app as ca
mark("import client_app.client_app (torch, fl_app)")
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
run_config = {"strategy": "fedavg", "num-server-rounds": 2, "max-client-examples": 64, "test-size": 200,
              "public-size": 100, "min-nodes": 3,
              "device-mix": "raspberry-pi-4:1,laptop:1,jetson-nano:1"}
ctx = Context(run_id=1, node_id=1, state=RecordDict(), run_config=run_config,
              node_config={"partition-id": 0, "num-partitions": 3, "profile": "raspberry-pi-4"})
if kind == "train":
    from fl_app.job import Job, reply_state
    from fl_app.models import ModelSpec, build_model
    from fl_app.training import TrainConfig, make_optimizer
    from fl_app.wire import encode
    job = Job(round=1, model=ModelSpec("cnn"), train=TrainConfig(), enforce_memory=False)
    msg = Message(RecordDict({"job": ConfigRecord({"json": job.to_json()}),
                              "weights": encode(build_model(job.model).state_dict())}), dst_node_id=1,
                  message_type="train")
else:
    msg = Message(RecordDict(), dst_node_id=1, message_type="query")
t0 = time.perf_counter()  # building the message is not part of one
node = ca.LocalNode.from_context(ctx)
mark("node from context (run config, profile)")
if hasattr(node, "data"):
    node.num_examples
    mark("node data (node cache)")
else:
    node.dataset
    mark("dataset load")
    node.train_indices()
    mark("federated split")
if kind == "train":
    job, model = ca._load_job_model(msg, node)
    mark("job decode, model build, weights load")
    make_optimizer(model, job.train)
    mark("first optimizer")
    result = ca.train(model, ca.LocalNode.from_context(ctx).train_batches(job.train.batch_size, job.round),
                      job.train, job.trainable, None)
    mark(f"training ({result.num_examples} examples, 1st step profiled)")
    ca.encode(reply_state(job, model.state_dict()), job.encoding)
    mark("encode the reply")
print(f"DYNAMO {'torch._dynamo' in sys.modules}")
for name, seconds in rows:
    print(f"ROW {name}\t{seconds:.4f}")
print(f"END {time.time():.6f}", flush=True)
"""


def breakdown(repeat: int) -> int:
    """Print the steps of a query and a train message, each in a fresh process, as medians (and ranges)
    over `repeat` processes (see the module doc)."""
    print(f"one message's steps, fresh process each, median [min-max] of {repeat}; load average at start "
          f"{' '.join(open('/proc/loadavg').read().split()[:3])}")
    with tempfile.TemporaryDirectory(prefix="compare-engines-breakdown-") as cache:
        env = {**os.environ, "FL_APP_CACHE_DIR": cache, "PYTHONPATH": str(REPO)}
        for label in ("empty node cache", "node cache filled"):
            for kind in ("query", "train"):
                runs: list[dict[str, float]] = []
                dynamo: list[bool] = []  # whether torch._dynamo was loaded by the message's end
                for _ in range(repeat):
                    if label.startswith("empty"):
                        for entry in Path(cache).glob("node-*.npz"):
                            entry.unlink()
                    start = time.time()
                    proc = subprocess.run([sys.executable, "-c", STEPS, kind], cwd=REPO, env=env,
                                          capture_output=True, text=True, timeout=600)
                    end = time.time()
                    if proc.returncode != 0:
                        print(proc.stdout + proc.stderr)
                        return 1
                    steps: dict[str, float] = {}
                    for line in proc.stdout.splitlines():
                        if line.startswith("ROW "):
                            name, seconds = line[4:].split("\t")
                            steps[name] = float(seconds)
                        elif line.startswith("END "):
                            main_end = float(line.split()[1])
                        elif line.startswith("DYNAMO "):
                            dynamo.append(line.split()[1] == "True")
                    total = sum(steps.values())
                    steps["sum of the steps"] = total
                    steps["interpreter exit"] = end - main_end
                    steps["process start (wall - steps - exit)"] = end - start - total - (end - main_end)
                    steps["whole process, wall"] = end - start
                    runs.append(steps)
                print(f"  {kind} message, {label}: torch._dynamo loaded in {sum(dynamo)} of {len(dynamo)} processes")
                for name in runs[0]:
                    values = sorted(r[name] for r in runs)
                    print(f"    {name:46s} {statistics.median(values):6.2f} s  [{values[0]:.2f}-{values[-1]:.2f}]")
                sys.stdout.flush()
    print(f"load average at end {' '.join(open('/proc/loadavg').read().split()[:3])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--strategy", default="fedavg")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds for each run (two, four with --floor)")
    parser.add_argument("--json", dest="json_out", default=None)
    parser.add_argument("--cache-dir", default=None,
                        help="node data cache for both runs: 'off', or a folder (default: an empty one per engine)")
    parser.add_argument("--breakdown", action="store_true",
                        help="time the steps of one query and one train message instead (see the module doc)")
    parser.add_argument("--repeat", type=int, default=3, help="--breakdown: processes per message kind")
    parser.add_argument("--floor", action="store_true",
                        help="also time the do-nothing benchmarks/flower_floor app on both engines")
    args = parser.parse_args(argv)
    if args.breakdown and args.floor:
        parser.error("--breakdown times one message alone; run --floor separately")
    if args.breakdown:
        return breakdown(args.repeat)
    from fl_app.results import load_results  # not needed by --breakdown, which also times older checkouts

    config = {"strategy": args.strategy, "num-server-rounds": args.rounds, "max-client-examples": 64,
              "test-size": 200, "public-size": 100, "min-nodes": 3,
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
            status, info, wall = run_on(engine, work, run_config, args.timeout)
            results = work / "out" / engine / "results.json"
            doc = load_results(results.parent) if results.is_file() else {"rounds": []}
            entries = len(list(Path(cache).glob("node-*.npz"))) if cache != "off" else 0
            out[engine] = timed_rounds(f"{engine:10s}", status, wall, [r["seconds"] for r in doc["rounds"]],
                                       f"  node cache: {entries} entries")
            out[engine] |= {"devices": [d["profile"] for d in doc.get("devices", [])], "node_cache": cache,
                            "node_cache_entries": entries}
            if engine == "deployment":  # serverapp-seconds, clientapp-seconds (all processes)
                out[engine]["flwr_compute_time"] = info.get("compute-time", {})
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
    floor_ok = True
    if args.floor:
        out["floor"] = floor(args.rounds, args.timeout)
        floor_ok = all(run["mean_round_s"] for run in out["floor"].values())
        floor_dep = out["floor"]["deployment"]["mean_round_s"]
        if sim and dep and floor_dep:
            print(f"the floor alone is x{floor_dep / sim:.2f} the app's simulation round; the app's deployment "
                  f"round is the floor + {dep - floor_dep:.2f} s")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2))
    return 0 if sim and dep and floor_ok else 1


def floor(rounds: int, timeout_s: float) -> dict[str, dict]:
    """Per-round seconds of benchmarks/flower_floor on both engines, three nodes (see the module doc)."""
    app = REPO / "benchmarks" / "flower_floor"
    profiles = [str(REPO / "profiles" / f"{p}.toml") for p in PROFILES]  # the floor app ignores them
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="compare-engines-floor-") as tmp:
        for engine in ("simulation", "deployment"):
            work = Path(tmp) / engine
            work.mkdir()
            timings = work / "timings.json"
            config = {"num-server-rounds": rounds, "min-nodes": len(PROFILES), "timings-file": str(timings)}
            status, _, wall = run_on(engine, work, config, timeout_s, app=app, profiles=profiles)
            seconds = json.loads(timings.read_text())["seconds"] if timings.is_file() else []
            out[engine] = timed_rounds(f"floor {engine:10s}", status, wall, seconds)
    return out


def run_on(engine: str, work: Path, run_config: dict, timeout_s: float, app: Path = REPO,
           profiles: Sequence[str] = PROFILES) -> tuple[str, dict, float]:
    """Run `app` once on `engine` ("simulation" or "deployment") with one node per profile, in `work`:
    (the run's final status, Flower's run info on the deployment engine ({} in simulation), wall seconds)."""
    start = time.monotonic()
    if engine == "simulation":
        status, info = flwr_simulation(work, run_config, num_supernodes=len(profiles), timeout_s=timeout_s,
                                       app=app).status, {}
    else:
        result = run_local_federation(len(profiles), profiles, run_config, timeout_s=timeout_s, workdir=work,
                                      app=app)
        status, info = result.status, result.info
    return status, info, time.monotonic() - start


def timed_rounds(label: str, status: str, wall: float, seconds: list[float], note: str = "") -> dict:
    """One engine's run as recorded and printed: status, wall seconds, per-round seconds and their mean."""
    mean = statistics.mean(seconds) if seconds else None
    print(f"{label} {status:22s} wall {wall:6.1f} s  rounds " + ", ".join(f"{s:.2f}" for s in seconds) + " s"
          + (f"  (mean {mean:.2f} s)" if mean is not None else "") + note, flush=True)
    return {"status": status, "wall_s": wall, "round_seconds": seconds, "mean_round_s": mean}


if __name__ == "__main__":
    sys.exit(main())
