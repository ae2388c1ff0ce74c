#!/usr/bin/env python3
"""A real deployment-engine federation on this machine: one SuperLink, N SuperNodes, one `flwr run`.

    python scripts/local_federation.py --nodes 3 --profiles raspberry-pi-4,laptop,measure \\
        --run-config "num-server-rounds=2 max-client-examples=64 test-size=200 min-nodes=3"

What it does, every step bounded in time and every process stopped at the end (also on Ctrl-C,
on an error and on SIGTERM):

1. starts `flower-superlink` on 127.0.0.1 with a free port (Fleet, Control and Runtime APIs all
   share that one HTTP port in Flower 1.41), with its own FLWR_HOME (a temporary folder, or --home);
2. writes the Flower config `$FLWR_HOME/config.toml` with a SuperLink connection named
   `local-federation` (address, and `insecure = true` or `root-certificates`);
3. with --auth, registers each SuperNode's public key (`flwr supernode register`) — the SuperLink
   then refuses any SuperNode whose key was not registered;
4. starts N `flower-supernode` processes on 127.0.0.1, each with its own free Runtime API port and
   its own node config: `partition-id=i num-partitions=N profile=<p> [data-dir=<dir>]`, the profiles
   cycling through --profiles (a name from profiles/, a path to a .toml profile, or `measure`);
5. waits until all N SuperNodes are online (`flwr supernode list`), runs
   `flwr run <app> local-federation --stream --run-config "<--run-config>"`, then reads the run's
   real status with `flwr list --run-id ID` (`flwr run --stream` exits 0 even when a run fails);
6. prints the wall time and stops everything. Exit status 0 only if the run completed.

--tls serves the SuperLink over TLS with certificates from scripts/make_certs.py (LAB USE ONLY:
generated into the home folder unless --certs names a folder made by it). --auth enables SuperNode
authentication (the SuperNodes use the supernode-<i>.key files of that folder). No dependency is
installed at run time (FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1): the app must be installed
in this Python (`pip install -e .`).

From Python (tests/test_deployment.py does this):

    from scripts.local_federation import LocalFederation, run_local_federation
    result = run_local_federation(3, ["raspberry-pi-4", "laptop"], {"num-server-rounds": 2}, tls=True)
    assert result.completed, result.log
    with LocalFederation(3, ["raspberry-pi-4", "laptop", "jetson-nano"]) as fed:   # several runs, one start
        for strategy in ("reft", "fedavg"):
            print(fed.run({"strategy": strategy, "min-nodes": 3}).summary())
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from fl_app.results import load_results

REPO = Path(__file__).resolve().parents[1]
CONNECTION = "local-federation"
DEFAULT_PROFILES = ("raspberry-pi-4", "laptop", "measure")
DEFAULT_TIMEOUT_S = 1200.0
STARTUP_TIMEOUT_S = 60.0  # SuperLink up, keys registered, SuperNodes online: each at most this
STOP_GRACE_S = 10.0


class FederationError(RuntimeError):
    """The federation could not be set up; the message says which step failed and why."""


@dataclass
class FederationResult:
    status: str                     # flwr's run status, e.g. "finished:completed"; "not-started" if none
    run_id: int | None
    wall_s: float                   # whole federation: start of the SuperLink to the final status
    run_wall_s: float               # `flwr run` submitted to the final status
    log: str                        # `flwr run --stream` output, then problems found on the way
    home: Path                      # FLWR_HOME (removed afterwards unless kept)
    superlink_log: str = ""
    node_logs: list[str] = field(default_factory=list)
    node_exit_codes: list[int | None] = field(default_factory=list)  # None: still running when the run ended
    unregistered_logs: list[str] = field(default_factory=list)
    unregistered_exit_codes: list[int | None] = field(default_factory=list)
    supernodes: list[dict] = field(default_factory=list)  # `flwr supernode list` once all were online
    results_json: Path | None = None  # where the ServerApp said it wrote results.json
    info: dict = field(default_factory=dict)  # `flwr list --run-id` entry: elapsed, traffic, compute-time

    @property
    def completed(self) -> bool:
        status = self.status.lower()
        return "completed" in status and "fail" not in status and "stop" not in status

    def summary(self) -> str:
        return (f"run {self.run_id}: {self.status} | federation wall time {self.wall_s:.1f} s "
                f"(run {self.run_wall_s:.1f} s)" + (f" | results {self.results_json}" if self.results_json else ""))


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path


# ----------------------------------------------------------------------------------------- helpers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_value(value: object) -> str:
    """A run-config / node-config value as TOML (JSON's strings, numbers and booleans are TOML too)."""
    if isinstance(value, float) and value != value:  # NaN: not valid in either
        raise ValueError("NaN is not a valid config value")
    return json.dumps(value)


def config_string(config: Mapping[str, object] | str | None) -> str:
    """`key=value key2="text"` from a mapping; a string passes through unchanged."""
    if config is None:
        return ""
    if isinstance(config, str):
        return config
    return " ".join(f"{k}={toml_value(v)}" for k, v in config.items())


def resolve_profile(profile: str, app: Path) -> str:
    """A profile name from <app>/profiles, an existing .toml path (made absolute), or `measure`."""
    if profile == "measure":
        return profile
    path = Path(profile).expanduser()
    if path.suffix == ".toml":
        if not path.is_file():
            raise FederationError(f"profile file {profile!r} does not exist")
        return str(path.resolve())
    names = sorted(p.stem for p in (app / "profiles").glob("*.toml"))
    if profile not in names:
        raise FederationError(f"unknown profile {profile!r}: use one of {', '.join(names)}, "
                              "a path to a .toml profile, or 'measure'")
    return profile


def node_config(partition_id: int, num_partitions: int, profile: str, data_dir: str | None,
                extra: Mapping[str, object] | None = None) -> str:
    """The SuperNode's --node-config: partition, profile, (optionally) where its data lives, and any
    `extra` keys (e.g. `fault`, see client_app/faults.py)."""
    parts = [f"partition-id={partition_id}", f"num-partitions={num_partitions}", f"profile={toml_value(profile)}"]
    if data_dir:
        parts.append(f"data-dir={toml_value(str(Path(data_dir).expanduser().resolve()))}")
    parts += [f"{k}={toml_value(v)}" for k, v in (extra or {}).items()]
    return " ".join(parts)


def write_flower_config(home: Path, port: int, root_certificates: Path | None) -> Path:
    """$FLWR_HOME/config.toml with one SuperLink connection, the default, for this federation."""
    lines = ["[superlink]", f"default = {toml_value(CONNECTION)}", "", f"[superlink.{CONNECTION}]",
             f"address = {toml_value(f'127.0.0.1:{port}')}"]
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {toml_value(str(root_certificates.resolve()))}")
    path = home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _tail(text: str, chars: int = 4000) -> str:
    return text if len(text) <= chars else "..." + text[-chars:]


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


class _Processes:
    """Owns every process it starts; `stop()` ends them all (process groups, then leftovers)."""

    def __init__(self, home: Path, env: dict[str, str], workdir: Path) -> None:
        self.home, self.env, self.workdir = home, env, workdir
        self.logs = home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: list[_Proc] = []

    def start(self, name: str, cmd: Sequence[str]) -> _Proc:
        lives = sum(1 for p in self.procs if p.name == name)  # a restart keeps the earlier log
        log_path = self.logs / (f"{name}.log" if not lives else f"{name}.{lives + 1}.log")
        with open(log_path, "wb") as out:  # the child keeps its own descriptor
            popen = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self.env, cwd=self.workdir, start_new_session=True)
        proc = _Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """A short `flwr` CLI call against this federation's FLWR_HOME."""
        return subprocess.run(["flwr", *args], env=self.env, cwd=self.home, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        """SIGTERM every process group, wait a little, SIGKILL what is left (descendants included)."""
        try:
            import psutil
        except ImportError:  # pragma: no cover - psutil is an app dependency
            psutil = None
        descendants = []
        for proc in self.procs:
            if psutil is not None and proc.popen.poll() is None:
                try:
                    descendants += psutil.Process(proc.popen.pid).children(recursive=True)
                except psutil.Error:
                    pass
        for proc in reversed(self.procs):  # SuperNodes before the SuperLink
            self._signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in self.procs:
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs:
            self._signal_group(proc, signal.SIGKILL)
            try:
                proc.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for child in descendants:  # anything that left its process group
            try:
                child.kill()
            except Exception:  # noqa: BLE001 - gone already, or not ours to wait for
                pass

    def kill(self, proc: _Proc) -> None:
        """SIGKILL one process, its group and any descendant that left the group."""
        import psutil

        try:
            children = psutil.Process(proc.popen.pid).children(recursive=True)
        except psutil.Error:
            children = []
        self._signal_group(proc, signal.SIGKILL)
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                pass
        try:
            proc.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    @staticmethod
    def _signal_group(proc: _Proc, sig: int) -> None:
        try:
            os.killpg(proc.popen.pid, sig)  # start_new_session: the group id is the leader's pid
        except (ProcessLookupError, PermissionError):
            pass


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.5, alive: Iterable[_Proc] = ()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in alive:
            if proc.popen.poll() is not None:
                raise FederationError(f"{proc.name} exited with code {proc.popen.returncode} while waiting for "
                                      f"{what}:\n{_tail(_read(proc.log_path))}")
        if predicate():
            return
        time.sleep(interval)
    raise FederationError(f"timed out after {timeout:.0f} s waiting for {what}")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _json_from(text: str) -> dict:
    """The JSON document in a CLI's stdout (it may print a line before it)."""
    start = text.find("{")
    if start < 0:
        raise ValueError(f"no JSON in: {text[:500]!r}")
    return json.loads(text[start:])


def _online_nodes(fed: _Processes) -> list[dict]:
    try:
        listing = fed.cli("supernode", "list", CONNECTION, "--format", "json", timeout=30)
        nodes = _json_from(listing.stdout).get("nodes", [])
    except (subprocess.TimeoutExpired, ValueError):
        return []
    return [n for n in nodes if str(n.get("status", "")).lower() == "online"]


def run_info(fed: _Processes, run_id: int) -> dict:
    """The run as the SuperLink reports it (`flwr list --run-id --format json`): status, elapsed,
    network-traffic, compute-time; {} if it cannot be read."""
    try:
        listing = fed.cli("list", "--run-id", str(run_id), "--format", "json", CONNECTION, timeout=60)
        runs = _json_from(listing.stdout).get("runs", [])
    except (subprocess.TimeoutExpired, ValueError):
        return {}
    return runs[0] if runs else {}


def run_status(fed: _Processes, run_id: int) -> str:
    """The run's real status, e.g. "finished:completed" (`flwr run --stream` exits 0 whatever it is)."""
    return str(run_info(fed, run_id).get("status", "unknown"))


# ------------------------------------------------------------------------------------------ the core

class LocalFederation:
    """A SuperLink and SuperNodes on 127.0.0.1 that one or several runs share.

        with LocalFederation(3, ["raspberry-pi-4", "laptop", "measure"]) as fed:
            first = fed.run({"strategy": "reft", "min-nodes": 3})
            second = fed.run({"strategy": "fedavg", "min-nodes": 3})

    Leaving the `with` block (normally, on an error or on Ctrl-C) stops every process it started.
    `tls`: HTTPS with certificates from scripts/make_certs.py (made in the home folder unless
    `certs_dir` is given). `auth`: SuperNode authentication; with it, `unregistered_nodes` extra
    SuperNodes start with keys that were never registered (the SuperLink must refuse them).
    `workdir` is the processes' working directory (a relative `output-dir` lands there; default: the
    current directory). The temporary FLWR_HOME is removed at stop unless `home` is given or
    `keep_home` is true. Setup problems raise FederationError (with `.result` holding the logs).
    """

    def __init__(self, num_nodes: int = 3, profiles: Sequence[str] = DEFAULT_PROFILES, *, tls: bool = False,
                 auth: bool = False, app: Path | str = REPO, data_dir: str | None = None,
                 home: Path | str | None = None, certs_dir: Path | str | None = None, unregistered_nodes: int = 0,
                 workdir: Path | str | None = None, keep_home: bool | None = None, echo: bool = False,
                 startup_timeout_s: float = 3 * STARTUP_TIMEOUT_S,
                 node_extra: Mapping[int, Mapping[str, object]] | None = None) -> None:
        if num_nodes < 1:
            raise FederationError("num_nodes must be at least 1")
        if unregistered_nodes < 0 or (unregistered_nodes and not auth):
            raise FederationError("unregistered_nodes (>= 0) only means something with auth=True")
        if not profiles:
            raise FederationError("give at least one profile")
        if shutil.which("flower-superlink") is None or shutil.which("flower-supernode") is None:
            raise FederationError("flower-superlink / flower-supernode not found: install the app (pip install -e .)")
        self.num_nodes, self.tls, self.auth, self.unregistered_nodes = num_nodes, tls, auth, unregistered_nodes
        self.app = Path(app).resolve()
        self.profiles = [resolve_profile(profiles[i % len(profiles)], self.app) for i in range(num_nodes)]
        self.data_dir, self.certs_dir, self.echo = data_dir, certs_dir, echo
        self.keep_home = keep_home if keep_home is not None else home is not None
        self.home = Path(home).resolve() if home else Path(tempfile.mkdtemp(prefix="flwr-local-federation-"))
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
        self.startup_timeout_s = startup_timeout_s
        self.node_extra = dict(node_extra or {})  # partition -> extra node-config keys
        self._restarts = 0
        self.procs = _Processes(self.home, self.env, Path(workdir).resolve() if workdir else Path.cwd())
        self.port: int | None = None
        self.supernodes: list[dict] = []  # `flwr supernode list` once all were online
        self.startup_s = 0.0
        self.exit_codes: dict[str, int | None] = {}  # filled at stop: exit code before stopping, None: running
        self._started_at = time.monotonic()
        self._stopped = False

    # -- lifecycle
    def __enter__(self) -> LocalFederation:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _say(self, text: str) -> None:
        if self.echo:
            print(text, flush=True)

    def start(self) -> LocalFederation:
        """SuperLink up, keys registered (auth), all SuperNodes online (intruders refused); bounded in time."""
        deadline = time.monotonic() + self.startup_timeout_s

        def remaining(cap: float = float("inf")) -> float:
            left = deadline - time.monotonic()
            if left <= 0:
                raise FederationError(f"the federation did not start within {self.startup_timeout_s:.0f} s")
            return min(left, cap)

        certs = self._certificates()
        self.port = port = free_port()
        write_flower_config(self.home, port, certs / "ca.crt" if self.tls else None)
        cmd = ["flower-superlink", "--host", "127.0.0.1", "--port", str(port),
               "--disable-runtime-dependency-installation"]
        cmd += (["--ssl-certfile", str(certs / "server.pem"), "--ssl-keyfile", str(certs / "server.key"),
                 "--ssl-ca-certfile", str(certs / "ca.crt")] if self.tls else ["--insecure"])
        if self.auth:
            cmd.append("--enable-supernode-auth")
        self._say(f"starting SuperLink on 127.0.0.1:{port} ({'TLS' if self.tls else 'insecure'}"
                  f"{', SuperNode auth' if self.auth else ''}); FLWR_HOME={self.home}")
        self._superlink_cmd = cmd
        superlink = self.procs.start("superlink", cmd)
        nodes: list[_Proc] = []
        intruders: list[_Proc] = []
        supernode = self._start_supernode

        def start_supernodes() -> None:
            for i in range(self.num_nodes):
                key = certs / f"supernode-{i + 1}.key" if self.auth else None
                nodes.append(supernode(f"supernode-{i + 1}", i, key))
                self._say(f"  supernode-{i + 1}: partition {i}/{self.num_nodes}, profile {self.profiles[i]}")
            for j in range(self.unregistered_nodes):
                intruders.append(supernode(f"unregistered-{j + 1}", j % self.num_nodes,
                                           certs / f"supernode-{self.num_nodes + j + 1}.key"))
                self._say(f"  unregistered-{j + 1}: a SuperNode whose key was never registered")

        if not self.auth:  # SuperNodes retry until the SuperLink listens: start them while it starts
            start_supernodes()
        _wait_for(lambda: _port_open(port), remaining(STARTUP_TIMEOUT_S), "the SuperLink to listen", alive=[superlink])
        if self.auth:  # keys first: a SuperNode whose key is unknown is refused at once
            for i in range(1, self.num_nodes + 1):
                reg = self.procs.cli("supernode", "register", str(certs / f"supernode-{i}.pub"), CONNECTION,
                                     "--name", f"supernode-{i}", "--format", "json", timeout=remaining(60))
                if reg.returncode != 0 or '"success": true' not in reg.stdout:
                    raise FederationError(f"registering supernode-{i} failed:\n{reg.stdout}{reg.stderr}")
            self._say(f"registered {self.num_nodes} SuperNode public keys")
            start_supernodes()

        waiting_since = time.monotonic()

        def all_online() -> bool:
            # Cheap first: the SuperLink logs each activation; then ask it (one CLI call) to be sure.
            activated = _read(superlink.log_path).count("[Fleet.ActivateNode] Activated node_id=")
            if activated < self.num_nodes and time.monotonic() - waiting_since < 30:
                return False
            self.supernodes = _online_nodes(self.procs)
            return len(self.supernodes) >= self.num_nodes

        _wait_for(all_online, remaining(STARTUP_TIMEOUT_S + 30), f"{self.num_nodes} SuperNodes to come online",
                  interval=0.5, alive=[superlink, *nodes])
        if intruders:  # they are refused at activation and exit; give them the time to do so
            _wait_for(lambda: all(p.popen.poll() is not None for p in intruders), remaining(STARTUP_TIMEOUT_S),
                      "the unregistered SuperNodes to be refused", interval=0.5)
        self.startup_s = time.monotonic() - self._started_at
        self._say(f"{len(self.supernodes)} SuperNodes online after {self.startup_s:.1f} s")
        return self

    def _start_supernode(self, name: str, partition: int, key: Path | None) -> _Proc:
        certs = Path(self.certs_dir).resolve() if self.certs_dir else self.home / "certs"
        link_tls = ["--root-certificates", str(certs / "ca.crt")] if self.tls else ["--insecure"]
        cmd = ["flower-supernode", "--superlink", f"127.0.0.1:{self.port}", *link_tls, "--host", "127.0.0.1",
               "--port", str(free_port()), "--max-wait-time", str(int(STARTUP_TIMEOUT_S)), "--node-config",
               node_config(partition, self.num_nodes, self.profiles[partition], self.data_dir,
                           self.node_extra.get(partition))]
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(key)]
        return self.procs.start(name, cmd)

    # -- faults, for the fault suite: kill and restart what a power cut or a crash would take down
    def kill(self, name: str) -> None:
        """SIGKILL a process this federation started (and its children: the SuperLink's ServerApp)."""
        proc = next(p for p in reversed(self.procs.procs) if p.name == name)
        self.procs.kill(proc)
        self._say(f"killed {name}")

    def restart_supernode(self, partition: int) -> str:
        """Start a fresh SuperNode for `partition` (a rebooted board); returns its process name."""
        self._restarts += 1
        name = f"supernode-{partition + 1}-restart{self._restarts}"
        certs = Path(self.certs_dir).resolve() if self.certs_dir else self.home / "certs"
        key = certs / f"supernode-{partition + 1}.key" if self.auth else None
        self._start_supernode(name, partition, key)
        self._say(f"restarted the SuperNode of partition {partition} as {name}")
        return name

    def restart_superlink(self, timeout_s: float = STARTUP_TIMEOUT_S * 3) -> None:
        """Start the SuperLink again on the same port and wait until `num_nodes` SuperNodes are online.

        Its state is in memory, so the old node ids are unknown to it: a SuperNode that still
        holds one is refused (HTTP 401) and exits, and is restarted here, as a supervisor
        (systemd's Restart=always, compose's restart policy) would on a real device.
        """
        superlink = self.procs.start("superlink", self._superlink_cmd)
        _wait_for(lambda: _port_open(self.port), timeout_s, "the restarted SuperLink to listen", alive=[superlink])

        def all_online() -> bool:
            for partition in range(self.num_nodes):
                names = [n for n in self._names("supernode-")
                         if n == f"supernode-{partition + 1}" or n.startswith(f"supernode-{partition + 1}-")]
                if all(self._exit_code(n) is not None for n in names):
                    self.restart_supernode(partition)
            self.supernodes = _online_nodes(self.procs)
            return len(self.supernodes) >= self.num_nodes
        _wait_for(all_online, timeout_s, f"{self.num_nodes} SuperNodes to come back online", interval=2.0,
                  alive=[superlink])

    def submit(self, run_config: Mapping[str, object] | str | None = None) -> int:
        """`flwr run` without waiting for the run: returns its run id."""
        cmd = ["flwr", "run", str(self.app), CONNECTION]
        config = config_string(run_config)
        if config:
            cmd += ["--run-config", config]
        proc = subprocess.run(cmd, env=self.env, cwd=self.home, capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)
        match = re.search(r"started run (\d+)", proc.stdout + proc.stderr) or \
            re.search(r"run[_ ]id `?(\d+)", proc.stdout + proc.stderr)
        if not match:
            raise FederationError(f"flwr run did not start a run:\n{proc.stdout}{proc.stderr}")
        return int(match.group(1))

    def _certificates(self) -> Path | None:
        if not (self.tls or self.auth):
            return None
        certs = Path(self.certs_dir).resolve() if self.certs_dir else self.home / "certs"
        if not (certs / "ca.crt").is_file():
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from make_certs import make_certs  # noqa: PLC0415 - only needed with tls/auth

            make_certs(certs, nodes=self.num_nodes + self.unregistered_nodes)
        keys = self.num_nodes + self.unregistered_nodes if self.auth else 0
        missing = [str(p) for p in [certs / "ca.crt", certs / "server.pem", certs / "server.key",
                                    *(certs / f"supernode-{i}.key" for i in range(1, keys + 1))] if not p.is_file()]
        if missing:
            raise FederationError(f"certificate folder {certs} lacks {', '.join(missing)} "
                                  "(make them with scripts/make_certs.py)")
        return certs

    def stop(self) -> None:
        """Stop every process this federation started (idempotent); remove a temporary home."""
        if self._stopped:
            return
        self._stopped = True
        self.exit_codes = {p.name: p.popen.poll() for p in self.procs.procs}
        self.procs.stop()
        self._logs_at_stop = {p.name: _read(p.log_path) for p in self.procs.procs}
        if not self.keep_home:
            shutil.rmtree(self.home, ignore_errors=True)

    # -- what happened
    def log_of(self, name: str) -> str:
        if self._stopped:
            return getattr(self, "_logs_at_stop", {}).get(name, "")
        procs = [p for p in self.procs.procs if p.name == name]  # a restarted process: all its lives
        return "\n".join(_read(p.log_path) for p in procs)

    def _names(self, prefix: str) -> list[str]:
        return [p.name for p in self.procs.procs if p.name.startswith(prefix)]

    def _exit_code(self, name: str) -> int | None:
        if self._stopped:
            return self.exit_codes.get(name)
        proc = next(p for p in reversed(self.procs.procs) if p.name == name)  # the latest of that name
        return proc.popen.poll()

    def fill_logs(self, result: FederationResult) -> FederationResult:
        """Copy every process's log and state (exit code, None = running) into `result`."""
        result.superlink_log = self.log_of("superlink")
        result.node_logs = [self.log_of(n) for n in self._names("supernode-")]
        result.node_exit_codes = [self._exit_code(n) for n in self._names("supernode-")]
        result.unregistered_logs = [self.log_of(n) for n in self._names("unregistered-")]
        result.unregistered_exit_codes = [self._exit_code(n) for n in self._names("unregistered-")]
        result.supernodes = list(self.supernodes)
        return result

    # -- a run
    def run(self, run_config: Mapping[str, object] | str | None = None,
            timeout_s: float = DEFAULT_TIMEOUT_S) -> FederationResult:
        """`flwr run <app> local-federation --stream --run-config ...`, then its real status; bounded."""
        if self.port is None or self._stopped:
            raise FederationError("start the federation first (use it as a context manager)")
        started = time.monotonic()
        deadline = started + timeout_s
        result = FederationResult("not-started", None, 0.0, 0.0, "", self.home)
        problems: list[str] = []
        cmd = ["flwr", "run", str(self.app), CONNECTION, "--stream"]
        config = config_string(run_config)
        if config:
            cmd += ["--run-config", config]
        try:
            proc = subprocess.run(cmd, env=self.env, cwd=self.home, capture_output=True, text=True,
                                  timeout=timeout_s, stdin=subprocess.DEVNULL)
            result.log = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            result.log = out
            problems.append(f"flwr run did not return within {timeout_s:.0f} s")
        if self.echo:
            print(result.log, end="", flush=True)
        match = re.search(r"started run (\d+)", result.log) or re.search(r"run[_ ]id `?(\d+)", result.log)
        if match:
            result.run_id = int(match.group(1))
            result.info = run_info(self.procs, result.run_id)
            status = str(result.info.get("status", "unknown"))
            while not status.lower().startswith("finished") and time.monotonic() < deadline:
                time.sleep(2.0)
                result.info = run_info(self.procs, result.run_id)
                status = str(result.info.get("status", "unknown"))
            if not status.lower().startswith("finished"):
                try:
                    self.procs.cli("stop", str(result.run_id), CONNECTION, timeout=30)
                except subprocess.TimeoutExpired:
                    pass
                problems.append(f"run {result.run_id} did not finish within {timeout_s:.0f} s (status {status})")
            result.status = status
        else:
            problems.append("flwr run did not start a run")
        result.run_wall_s = result.wall_s = time.monotonic() - started
        found = re.findall(r"results in (\S+results\.json)", result.log)
        result.results_json = Path(found[-1]) if found else None
        if problems:
            result.log += "\n[local_federation] " + "\n[local_federation] ".join(problems) + "\n"
        return self.fill_logs(result)


def run_local_federation(num_nodes: int = 3, profiles: Sequence[str] = DEFAULT_PROFILES,
                         run_config: Mapping[str, object] | str | None = None, tls: bool = False,
                         auth: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S, **options) -> FederationResult:
    """Start a SuperLink and `num_nodes` SuperNodes on 127.0.0.1, run the app once, stop everything.

    `run_config`: a mapping (values become TOML) or a ready `--run-config` string. `profiles` cycle
    over the nodes. `timeout_s` bounds start and run together (stopping adds at most ~25 s).
    `options` are LocalFederation's (app, data_dir, home, certs_dir, unregistered_nodes, workdir,
    keep_home, echo). A run that starts and then fails is a result with that status; a federation
    that cannot be set up raises FederationError (its `.result` holds every process's log).
    """
    started = time.monotonic()
    fed = LocalFederation(num_nodes, profiles, tls=tls, auth=auth,
                          startup_timeout_s=min(timeout_s, 3 * STARTUP_TIMEOUT_S), **options)
    try:
        try:
            fed.start()
        except FederationError as exc:
            fed.stop()
            result = fed.fill_logs(FederationResult("not-started", None, time.monotonic() - started, 0.0, str(exc),
                                                    fed.home))
            error = FederationError(f"{exc}\n--- SuperLink log (tail) ---\n{_tail(result.superlink_log, 3000)}")
            error.result = result  # type: ignore[attr-defined]
            raise error from exc
        result = fed.run(run_config, timeout_s=max(1.0, timeout_s - (time.monotonic() - started)))
    finally:
        fed.stop()
    fed.fill_logs(result)
    result.wall_s = time.monotonic() - started
    return result


# ------------------------------------------------------------------------------------------- the CLI

def _raise_on_sigterm(signum, _frame):  # so `finally` stops the federation on `kill <pid>` too
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=3, help="number of SuperNodes (default 3)")
    parser.add_argument("--profiles", default=",".join(DEFAULT_PROFILES),
                        help="comma-separated device profiles, cycled over the nodes: names from profiles/, "
                             "paths to .toml profiles, or 'measure' (default: %(default)s)")
    parser.add_argument("--run-config", default="", help="passed to `flwr run --run-config` unchanged, "
                                                         "e.g. \"strategy='reft' num-server-rounds=2 min-nodes=3\"")
    parser.add_argument("--data-dir", default=None, help="node config data-dir of every SuperNode")
    parser.add_argument("--app", default=str(REPO), help="the Flower app to run (default: this repository)")
    parser.add_argument("--home", default=None, help="FLWR_HOME and logs folder (default: a temporary folder, "
                                                     "removed afterwards)")
    parser.add_argument("--keep-home", action="store_true", help="keep the temporary FLWR_HOME and its logs")
    parser.add_argument("--tls", action="store_true", help="TLS between every component (lab certificates)")
    parser.add_argument("--auth", action="store_true", help="SuperNode authentication: only registered keys join")
    parser.add_argument("--certs", default=None, help="folder made by scripts/make_certs.py (default: generate "
                                                      "into the home folder)")
    parser.add_argument("--unregistered-nodes", type=int, default=0,
                        help="with --auth: also start this many SuperNodes with unregistered keys (refused)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="seconds for everything (default %(default)s)")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the result as JSON to this file")
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.unregistered_nodes < 0 or args.timeout <= 0:
        parser.error("--nodes must be >= 1, --unregistered-nodes >= 0 and --timeout > 0")
    if args.unregistered_nodes and not args.auth:
        parser.error("--unregistered-nodes needs --auth")
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
    try:
        result = run_local_federation(args.nodes, profiles, args.run_config, tls=args.tls, auth=args.auth,
                                      timeout_s=args.timeout, app=args.app, data_dir=args.data_dir,
                                      home=args.home, certs_dir=args.certs,
                                      unregistered_nodes=args.unregistered_nodes,
                                      keep_home=args.keep_home or None, echo=True)
    except FederationError as exc:
        print(f"local_federation: {exc}", file=sys.stderr)
        return 1
    problems = [line for line in result.log.splitlines() if line.startswith("[local_federation]")]
    for line in problems:
        print(line, file=sys.stderr)
    for i, code in enumerate(result.unregistered_exit_codes, 1):
        print(f"unregistered-{i}: {'refused, exit code ' + str(code) if code else 'NOT refused'}")
    if result.results_json and result.results_json.is_file():
        doc = load_results(result.results_json.parent)
        secs = [r.get("seconds", 0.0) for r in doc.get("rounds", [])]
        if secs:
            print(f"rounds: {len(secs)}, seconds per round: " + ", ".join(f"{s:.1f}" for s in secs)
                  + f" (mean {sum(secs) / len(secs):.1f})")
    print(f"{args.nodes} SuperNodes | {result.summary()}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({
            "status": result.status, "completed": result.completed, "run_id": result.run_id,
            "wall_s": result.wall_s, "run_wall_s": result.run_wall_s, "nodes": args.nodes,
            "results_json": str(result.results_json) if result.results_json else None,
            "unregistered_exit_codes": result.unregistered_exit_codes}, indent=2))
    return 0 if result.completed else 1


if __name__ == "__main__":
    sys.exit(main())
