#!/usr/bin/env python3
"""Emulated Raspberry Pi SuperNodes joining a native SuperLink: a 1-round run (called by emulate_pi.sh).

    python scripts/emulate_pi.py --exec /tmp/fl-emulate-pi.X/pi_exec --json federation.json

`--exec` is the wrapper scripts/emulate_pi.sh writes: `pi_exec CORE CMD...` runs CMD in the arm64
rootfs as that QEMU core with a Pi's /proc/cpuinfo. The SuperLink and the ServerApp run natively
on this host (scripts/local_federation.py); each SuperNode, and so each of its ClientApp
processes, runs emulated: cortex-a53 as a Pi 3B+, cortex-a72 as a Pi 4, cortex-a76 as a Pi 5.
The JSON says, per core, whether its node trained in the completed round.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import local_federation as lf  # noqa: E402
from fl_app.results import load_results

CORES = {"cortex-a53": "raspberry-pi-3b-plus", "cortex-a72": "raspberry-pi-4", "cortex-a76": "raspberry-pi-5"}
RUN_CONFIG = ("num-server-rounds=1 max-client-examples=32 test-size=100 public-size=100 min-nodes=3 "
              "round-timeout=1200.0")


class EmulatedFederation(lf.LocalFederation):
    """LocalFederation whose SuperNodes start through the emulation wrapper, one core each."""

    def __init__(self, pi_exec: str, cores: list[str], **kwargs) -> None:
        super().__init__(len(cores), [CORES[c] for c in cores], **kwargs)
        self.pi_exec, self.cores = pi_exec, cores

    def _start_supernode(self, name: str, partition: int, key: Path | None) -> lf._Proc:
        cmd = [self.pi_exec, self.cores[partition], "flower-supernode", "--superlink", f"127.0.0.1:{self.port}",
               "--insecure", "--host", "127.0.0.1", "--port", str(lf.free_port()), "--max-wait-time", "900",
               "--node-config", lf.node_config(partition, self.num_nodes, self.profiles[partition], None)]
        return self.procs.start(name, cmd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exec", required=True, dest="pi_exec")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=1500)
    args = parser.parse_args(argv)
    lf.STARTUP_TIMEOUT_S = 300.0  # an emulated SuperNode takes a while to import flwr
    # Flower's 30 s for a ClientApp process to claim its task is shorter than `import flwr` under QEMU:
    # the emulated processes get 600 s (scripts/pi_sitecustomize/sitecustomize.py says why).
    os.environ["FL_FLWR_HEARTBEAT_S"] = "600"
    cores = list(CORES)
    out = Path(tempfile.mkdtemp(prefix="fl-emulate-pi-out-"))
    summary: dict = {"nodes": {c: CORES[c] for c in cores}, "rounds": {}, "errors": []}
    try:
        with EmulatedFederation(args.pi_exec, cores, echo=True, workdir=out, startup_timeout_s=900) as fed:
            result = fed.run(f"{RUN_CONFIG} output-dir='{out}' run-name='emulated-pi'", timeout_s=args.timeout)
            summary.update(status=result.status, run_wall_s=round(result.run_wall_s, 1),
                           startup_s=round(fed.startup_s, 1))
            logs = {c: fed.log_of(f"supernode-{i + 1}") for i, c in enumerate(cores)}
            if not result.status.endswith("completed"):
                summary["node_log_tails"] = {c: log[-1500:] for c, log in logs.items()}
        results = load_results(out / "emulated-pi")
        partition_of = {d["node_id"]: d["partition_id"] for d in results.get("devices", [])}
        for r in results.get("rounds", []):
            summary["round_seconds"] = r.get("seconds")
            for c in r.get("clients", []):
                core = cores[partition_of[c["node_id"]]]
                ok = bool(c.get("participated")) and not c.get("error")
                summary["rounds"][core] = "yes" if ok else "no"
                if c.get("error"):
                    summary["errors"].append(f"{core}: {c['error']}")
        for core in cores:
            summary["rounds"].setdefault(core, "no")
            if "LSE atomics" in logs.get(core, ""):
                summary.setdefault("cpu_safety_logged", []).append(core)
        summary["results_status"] = results.get("status")
    except (lf.FederationError, OSError, KeyError, ValueError) as exc:
        summary["errors"].append(f"{type(exc).__name__}: {str(exc)[-2000:]}")
    args.json.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0 if summary.get("status", "").endswith("completed") and all(
        v == "yes" for v in summary["rounds"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
