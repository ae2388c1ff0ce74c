"""Run the app with the real `flwr run` simulation engine, isolated and always cleaned up.

Each run gets its own FLWR_HOME and free loopback ports, so tests never touch a user's
SuperLink or each other's; the detached local SuperLink that `flwr run` starts is
stopped afterwards, whatever happened. `flwr run --stream` exits 0 even when the run
fails, so the run's real status is read back with `flwr list`.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


@dataclass
class FlwrRun:
    run_id: int
    status: str
    log: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flwr_simulation(tmp_path: Path, run_config: dict, num_supernodes: int, timeout_s: float = 600,
                    app: Path = REPO) -> FlwrRun:
    """`flwr run <app> --stream` in simulation with `num_supernodes` nodes (app: this repository unless
    given); returns the run's final status."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    http_port, control_port = free_port(), free_port()
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
           "FLWR_LOCAL_CONTROL_API_PORT": str(control_port), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_DISABLE_UPDATE_CHECK": "1"}
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
    cmd = ["flwr", "run", str(app), "--stream", "--federation-config", f"num-supernodes={num_supernodes}",
           "--run-config", overrides]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, cwd=tmp_path)
        log = proc.stdout + proc.stderr
        match = re.search(r"run (\d+)", log)
        if not match:
            raise AssertionError(f"flwr run did not start a run (exit {proc.returncode}):\n{log[-3000:]}")
        run_id = int(match.group(1))
        listing = subprocess.run(["flwr", "list", "--run-id", str(run_id), "--format", "json"], env=env,
                                 capture_output=True, text=True, timeout=60, cwd=tmp_path)
        return FlwrRun(run_id, _status(listing.stdout), log)
    finally:
        stop_superlink(http_port)


def _status(listing: str) -> str:
    data = json.loads(listing)
    runs = data.get("runs", data if isinstance(data, list) else [])
    return str(runs[0].get("status", "unknown")) if runs else "unknown"


def stop_superlink(port: int) -> None:
    """Kill the SuperLink (and its SuperExec and simulation children) that serves `port`."""
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "flower-superlink" in cmdline and (f":{port}" in cmdline or f"--port {port}" in cmdline):
            for p in [*proc.children(recursive=True), proc]:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
