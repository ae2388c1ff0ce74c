"""Scale of the ServerApp on Flower's simulation engine: round time against registered and sampled nodes.

    python benchmarks/scale.py | tee benchmarks/results/scale.txt
    python benchmarks/scale.py --only 100/100,1000/100          # a subset

Runs `flwr run` in simulation (tests/flwr_harness.py: its own FLWR_HOME and ports, the SuperLink it
starts is stopped) for each setting REGISTERED/SAMPLED: REGISTERED SuperNodes, `fraction-train` =
SAMPLED / REGISTERED, fedavg on the small CNN, real CIFAR-10 split IID, 2 rounds, at most 16
images per node. It prints,
per setting, side by side in one run:

- round seconds: each round's wall seconds as results record them (plan, send, train, receive,
  aggregate, evaluate, record), and their mean;
- ServerApp CPU: CPU seconds of the ServerApp's round loop alone (results' server_cpu_s); wall seconds
  also hold the clients' training and Flower's simulation engine, which runs in the same process and
  polls every registered node's message queue ten times a second
  (flwr/server/superlink/fleet/vce/vce_api.py, `add_messages_to_queue`);
- to first round: wall seconds from starting `flwr run` to the first round on disk (rounds.jsonl
  polled every 0.2 s): start-up, the device query of every registered node, strategy set-up, round 1;
- server memory: the ServerApp's resident memory after the last round (results' server_rss_mb), and
  per registered node, the slope between the smallest and the largest setting;
- results.json size: what stays readable (rounds and devices go to .jsonl files);
- the ratio of each setting's mean round time to the first setting's.

Targets (issue 13): 1000 registered / 100 sampled within 1.5x the round time of 100 / 100; 10,000
registered nodes start and finish the 2-round simulation.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fl_app.results import load_results  # noqa: E402
from tests.flwr_harness import flwr_simulation  # noqa: E402

SETTINGS = ("100/100", "1000/100", "10000/100")
# Real CIFAR-10 (synthetic data holds 6000 images: too few for 10,000 nodes), IID so that every node
# holds data: 16 images per node up to 3,000 nodes, 4-5 at 10,000.
RUN_CONFIG = {"strategy": "fedavg", "model": "cnn", "dataset": "cifar10", "data-dir": str(REPO.parent / "shared" / "data"),
              "partition": "iid", "num-server-rounds": 2,
              "max-client-examples": 16, "test-size": 200, "public-size": 50, "min-nodes": 2,
              # the device query waits the round deadline: every registered node must answer it
              "round-timeout": 3000.0}


def first_line_time(path: Path, started: float, stop: threading.Event, out: dict) -> None:
    """Poll `path` until it holds a complete line; record the seconds since `started`."""
    while not stop.is_set():
        try:
            if b"\n" in path.read_bytes():
                out["to_first_round_s"] = time.perf_counter() - started
                return
        except OSError:
            pass
        time.sleep(0.2)


def run_setting(registered: int, sampled: int, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="fl-scale-") as tmp:
        out_dir = Path(tmp) / "out"
        config = {**RUN_CONFIG, "fraction-train": sampled / registered, "output-dir": str(out_dir),
                  "run-name": "scale"}
        found: dict = {}
        stop = threading.Event()
        started = time.perf_counter()
        poller = threading.Thread(target=first_line_time, args=(out_dir / "scale" / "rounds.jsonl", started, stop,
                                                                found), daemon=True)
        poller.start()
        try:
            run = flwr_simulation(Path(tmp), config, registered, timeout_s=timeout_s)
        finally:
            stop.set()
            poller.join(timeout=5)
        wall = time.perf_counter() - started
        folder = out_dir / "scale"
        doc = load_results(folder) if (folder / "results.json").is_file() else {"rounds": [], "status": "none"}
        rounds = doc["rounds"]
        return {"setting": f"{registered}/{sampled}", "registered": registered, "status": run.status,
                "results_status": doc.get("status"), "error": doc.get("error"),
                "round_s": [r["seconds"] for r in rounds],
                "server_cpu_s": [r.get("server_cpu_s") for r in rounds],
                "participants": [r["participants"] for r in rounds],
                "to_first_round_s": found.get("to_first_round_s"), "wall_s": wall,
                "server_rss_mb": rounds[-1].get("server_rss_mb") if rounds else None,
                "results_json_bytes": (folder / "results.json").stat().st_size if rounds else None,
                "log_tail": run.log[-1500:] if not rounds else ""}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(SETTINGS), help="REGISTERED/SAMPLED settings, comma-separated")
    parser.add_argument("--timeout", type=float, default=3000.0, help="seconds for each setting's run")
    args = parser.parse_args(argv)
    settings = [tuple(int(x) for x in s.split("/")) for s in args.only.split(",")]
    print("=== scale benchmark: flwr run simulation, fedavg, cnn, CIFAR-10 iid, 2 rounds, <= 16 images/node ===")
    print(f"date:    {datetime.now(timezone.utc).isoformat(timespec='seconds')}")
    print(f"command: python benchmarks/scale.py --only {args.only}")
    print(f"machine: {os.cpu_count()} CPUs; 1/5/15-min load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows = []
    for registered, sampled in settings:
        row = run_setting(registered, sampled, args.timeout)
        rows.append(row)
        mean = statistics.fmean(row["round_s"]) if row["round_s"] else None
        print(f"\n{row['setting']:>10}: status {row['status']}, rounds {[round(s, 2) for s in row['round_s']]} s "
              f"(mean {mean:.2f} s)" if mean is not None else f"\n{row['setting']:>10}: status {row['status']}, "
              f"no round finished: {row['error']}\n{row['log_tail']}", flush=True)
        if mean is not None:
            print(f"{'':>12}ServerApp CPU per round {[round(s or 0, 3) for s in row['server_cpu_s']]} s", flush=True)
            print(f"{'':>12}participants {row['participants']}, to first round {row['to_first_round_s']:.1f} s, "
                  f"whole run {row['wall_s']:.1f} s, server memory {row['server_rss_mb']:.0f} MB, "
                  f"results.json {row['results_json_bytes']} bytes", flush=True)
    done = [r for r in rows if r["round_s"]]
    if done:
        base = statistics.fmean(done[0]["round_s"])
        base_cpu = statistics.fmean(done[0]["server_cpu_s"])
        print("\nsetting      mean round s   ratio   ServerApp CPU s/round   ratio   to first round s   server MB")
        for r in done:
            mean, cpu = statistics.fmean(r["round_s"]), statistics.fmean(r["server_cpu_s"])
            print(f"{r['setting']:>10}   {mean:12.2f}   {mean / base:5.2f}   {cpu:21.3f}   {cpu / base_cpu:5.2f}   "
                  f"{r['to_first_round_s']:16.1f}   {r['server_rss_mb']:9.0f}")
        if len(done) > 1 and done[-1]["registered"] > done[0]["registered"]:
            slope = ((done[-1]["server_rss_mb"] - done[0]["server_rss_mb"]) * 1024
                     / (done[-1]["registered"] - done[0]["registered"]))
            print(f"server memory per registered node: {slope:.1f} KB (slope {done[0]['setting']} -> "
                  f"{done[-1]['setting']}; MB = 2^20 bytes)")
    print(f"\nload average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0 if all(r["status"].endswith("completed") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
