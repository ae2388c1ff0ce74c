#!/usr/bin/env python3
"""The docker-compose federation for real, on a machine without an image registry (CI runs this).

    python scripts/compose_federation.py                 # insecure stack + an under-sized node, 2 rounds
    python scripts/compose_federation.py --tls           # docker-compose.tls.yml on top, 4 nodes
    python scripts/compose_federation.py --compose "docker compose"   # Compose v2 instead of v1

What it does, all bounded in time and undone at the end (even on errors or Ctrl-C):

1. installs Docker's engine and Compose from Debian's packages (`docker.io docker-compose debootstrap
   iptables`) when `dockerd` or the compose command is missing;
2. starts its OWN `dockerd`: data-root under the cache folder (kept between runs, so images are
   built once), exec-root, pidfile and unix socket in a temporary folder, no NAT (`iptables`,
   `ip-forward`, `ip-masq` off, no default bridge): containers reach each other on the compose
   networks and this machine reaches the published port on 127.0.0.1, nothing else;
3. builds what no registry can give here: a Debian base by `debootstrap`, `nginx:1.22.1` (the Fleet
   proxy) from Debian's nginx-light, and stand-ins for Flower's
   official images under their tags (`flwr/superlink`, `flwr/supernode`, `flwr/superexec`) laid out
   like them (venv /python/venv first on PATH, user app uid 49999, HOME=/app, WORKDIR /app, the
   pinned flwr); then the project's image from the project's Dockerfile, unchanged (torch from the
   Python package index instead of the CPU index, which is not reachable here);
4. brings the stack up with the project's docker-compose.yml, unchanged, as project `fl-app`
   (`-p`, so Compose v1 and v2 behave alike), plus scripts/compose/undersized-node.yml: a fifth
   SuperNode whose ClientApp container has less memory than a training job needs;
5. waits for every SuperNode, runs `flwr run . <connection>` (2 rounds, small synthetic job), reads
   the real status with `flwr list`, copies the results out with `docker cp` and checks them; a run
   in which no ClientApp process ever started (seen once in CI on a loaded machine) is recorded
   with every service's logs and restart count under "first_attempt", and tried once more after
   restarting the ClientApp SuperExecs;
6. records each container's peak memory against its limit (cgroup), the kernel's OOM kills, the
   exit status the killed ClientApp process got, then tears the stack down (`down -v`) and stops
   the daemon it started.

Prints a summary and writes it as JSON (--json); exit 0 only if every check passed.
Environment: FL_COMPOSE_CACHE (default /var/tmp/fl-app-compose): debootstrap tree and the daemon's
data-root (about 7 GB); remove it to start from scratch. The script runs what that folder holds as
root, so it refuses a folder it does not own, one others may write to, and a symlinked `lock`
(scripts/root_cache.py): exit 1 with one line saying which.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from local_federation import _json_from, write_flower_config  # noqa: E402
from root_cache import CacheRefused, claim_cache, open_lock  # noqa: E402
from fl_app.results import load_results

CACHE = Path(os.environ.get("FL_COMPOSE_CACHE", "/var/tmp/fl-app-compose"))
PROJECT = "fl-app"
FLWR_VERSION = "1.41.0"
APP_IMAGE = "fl-app-superexec:0.1.0"
BASE_IMAGE = "local/debian:bookworm"
STANDIN_BASE = "local/flwr-base:" + FLWR_VERSION
STANDINS = {  # tag -> entrypoint, as in Flower's official images
    f"flwr/superlink:{FLWR_VERSION}": "flower-superlink",
    f"flwr/supernode:{FLWR_VERSION}": "flower-supernode",
    f"flwr/superexec:{FLWR_VERSION}-py3.11-ubuntu24.04": "flower-superexec",
}
UNDERSIZED = REPO / "scripts" / "compose" / "undersized-node.yml"
UNDERSIZED_CLIENTAPP = "superexec-clientapp-5"
PORT = 9093  # docker-compose.yml publishes the SuperLink (its Control API) on 127.0.0.1:9093 only
NGINX_IMAGE = "nginx:1.22.1"  # docker-compose.yml's fleet-proxy; a stand-in from Debian's nginx-light here
# heterofl + resnet18: each device trains a width sized to its profile's memory (memory-pool '': the
# profiles' own) and to a 15 s emulated deadline, about the laptop's full-model round, so the Pis' jobs stay
# small (keep 0.28 and 0.45) while a laptop-class node trains the full ResNet-18 (about +550 MiB over the
# ~650 MiB a ClientApp needs to start and answer the device query): the under-sized node passes the query
# and dies in training. `python -m server_app.plan` with this run config shows the widths.
RUN_CONFIG = ("strategy='heterofl' model='resnet18' num-server-rounds={rounds} max-client-examples=64 "
              "test-size=200 public-size=100 min-nodes={nodes} output-dir='/app/outputs' run-name='{run_name}' "
              "round-timeout=600.0 memory-pool='' emulated-deadline=15.0")
TORCH_INDEX_URL = os.environ.get("FL_TORCH_INDEX_URL", "https://pypi.org/simple")


ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ComposeError(RuntimeError):
    pass


def say(text: str) -> None:
    print(f"[compose {time.strftime('%H:%M:%S')}] {text}", flush=True)


def sh(cmd: list[str] | str, *, env: dict | None = None, timeout: float = 600, check: bool = True,
       capture: bool = True, cwd: Path | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    args = cmd if isinstance(cmd, list) else shlex.split(cmd)
    proc = subprocess.run(args, env=env, timeout=timeout, capture_output=capture, text=True, cwd=cwd,
                          input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL)
    if check and proc.returncode != 0:
        out = (proc.stdout or "")[-3000:] + (proc.stderr or "")[-3000:]
        raise ComposeError(f"{' '.join(args)} exited with {proc.returncode}:\n{out}")
    return proc


# --------------------------------------------------------------------------------- engine and daemon

def pick_compose(given: list[str] | None) -> list[str]:
    """The compose command: `given`, else Compose v1's `docker-compose` where installed, else `docker compose`
    where that plugin answers, else `docker-compose` (for `ensure_packages` to install). A `docker` client
    alone proves no plugin: one without it reads `docker compose -p ...` as an unknown flag."""
    if given:
        return given
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        try:
            probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
            if probe.returncode == 0:
                return ["docker", "compose"]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return ["docker-compose"]


def ensure_packages(compose: list[str]) -> None:
    """Docker's engine, Compose v1 and debootstrap from Debian's packages, if any is missing."""
    missing = [b for b in ("dockerd", "debootstrap", compose[0]) if shutil.which(b) is None]
    if not missing:
        return
    say(f"installing docker.io docker-compose debootstrap iptables (missing: {', '.join(missing)})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    sh("apt-get update -q", env=env, timeout=600)
    sh("apt-get install -y -q docker.io docker-compose debootstrap iptables", env=env, timeout=900)


class Daemon:
    """A dockerd of our own; `stop()` ends it by its pid (and only it)."""

    def __init__(self, data_root: Path) -> None:
        self.state = Path(tempfile.mkdtemp(prefix="fl-dockerd-"))
        self.socket = self.state / "docker.sock"
        self.pidfile = self.state / "docker.pid"
        self.log = self.state / "dockerd.log"
        self.config = {
            "data-root": str(data_root), "exec-root": str(self.state / "exec"), "pidfile": str(self.pidfile),
            "hosts": [f"unix://{self.socket}"], "storage-driver": "overlay2", "iptables": False,
            "ip-forward": False, "ip-masq": False, "bridge": "none",
        }
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}", "COMPOSE_HTTP_TIMEOUT": "300",
                    "DOCKER_BUILDKIT": "0"}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> None:
        Path(self.config["data-root"]).mkdir(parents=True, exist_ok=True)
        (self.state / "daemon.json").write_text(json.dumps(self.config, indent=1))
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(["dockerd", "--config-file", str(self.state / "daemon.json")],
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ComposeError(f"dockerd exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            if sh(["docker", "info"], env=self.env, check=False, timeout=30).returncode == 0:
                say(f"dockerd {self.proc.pid} up (socket {self.socket}, data-root {self.config['data-root']})")
                return
            time.sleep(1)
        raise ComposeError(f"dockerd not ready within {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
            say(f"dockerd {self.proc.pid} stopped")
        with contextlib.suppress(OSError):  # dockerd leaves its netns bind mount (exec-root/netns/default)
            for mount in reversed(Path("/proc/mounts").read_text().splitlines()):
                target = mount.split()[1]
                if target.startswith(str(self.state) + "/"):
                    subprocess.run(["umount", "-l", target], check=False, capture_output=True)
        shutil.rmtree(self.state, ignore_errors=True)


# ------------------------------------------------------------------------------------------- images

def has_image(env: dict, tag: str) -> bool:
    return sh(["docker", "image", "inspect", tag], env=env, check=False, timeout=60).returncode == 0


def build_images(env: dict) -> dict[str, float]:
    """Base, stand-ins and the app image; seconds spent on each step that had work to do."""
    spent = {}
    if not has_image(env, BASE_IMAGE):
        t = time.monotonic()
        tree = CACHE / "rootfs-bookworm"
        if not (tree / ".done").exists():
            shutil.rmtree(tree, ignore_errors=True)
            mirror = apt_mirror()
            say(f"debootstrap bookworm (minbase + python3) from {mirror}")
            sh(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                "bookworm", str(tree), mirror], timeout=1200)
            (tree / ".done").touch()
        tar = subprocess.Popen(["tar", "-C", str(tree), "--exclude=./.done", "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["docker", "import", "-", BASE_IMAGE], env=env, stdin=tar.stdout, check=True,
                       capture_output=True, timeout=600)
        tar.wait(timeout=60)
        spent["base"] = time.monotonic() - t
    if not all(has_image(env, tag) for tag in STANDINS):
        t = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="fl-standin-") as ctx:
            shutil.copy("/etc/ssl/certs/ca-certificates.crt", Path(ctx) / "ca-certificates.crt")
            (Path(ctx) / "Dockerfile").write_text(STANDIN_DOCKERFILE.format(base=BASE_IMAGE, flwr=FLWR_VERSION))
            say(f"building the stand-in base {STANDIN_BASE} (pip install flwr=={FLWR_VERSION})")
            sh(["docker", "build", "--network", "host", "-t", STANDIN_BASE, ctx], env=env, timeout=900)
        for tag, entry in STANDINS.items():
            sh(["docker", "build", "-t", tag, "-"], env=env, timeout=120,
               stdin=f'FROM {STANDIN_BASE}\nLABEL fl-app.standin="{tag}"\nENTRYPOINT ["{entry}"]\n')
        spent["standins"] = time.monotonic() - t
    if not has_image(env, NGINX_IMAGE):  # the same nginx (1.22.1) as Debian 12's, where nginx.org's image is
        t = time.monotonic()                # unreachable; the command in docker-compose.yml runs on either
        say(f"building the stand-in {NGINX_IMAGE} (Debian's nginx-light)")
        sh(["docker", "build", "--network", "host", "-t", NGINX_IMAGE, "-"], env=env, timeout=900,
           stdin=f"FROM {BASE_IMAGE}\nRUN apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
                 f"--no-install-recommends nginx-light && rm -rf /var/lib/apt/lists/*\n"
                 f'LABEL fl-app.standin="{NGINX_IMAGE}"\n')
        spent["nginx"] = time.monotonic() - t
    t = time.monotonic()
    say(f"building {APP_IMAGE} from the project's Dockerfile (torch from {TORCH_INDEX_URL})")
    sh(["docker", "build", "--network", "host", "--build-arg", f"TORCH_INDEX_URL={TORCH_INDEX_URL}",
        "-t", APP_IMAGE, str(REPO)], env=env, timeout=1500)
    spent["app"] = time.monotonic() - t
    return spent


# Flower's base image layout (flwr/base): /python/venv first on PATH, user app (uid 49999), HOME=/app.
STANDIN_DOCKERFILE = """\
FROM {base}
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \\
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
RUN python3 -m venv /python/venv \\
 && /python/venv/bin/pip install --no-cache-dir flwr=={flwr} \\
 && groupadd --gid 49999 app && useradd --uid 49999 --gid 49999 --home-dir /app --create-home app \\
 && chown -R app:app /python/venv
ENV PATH=/python/venv/bin:$PATH HOME=/app
USER app
WORKDIR /app
"""


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources), else deb.debian.org."""
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        with contextlib.suppress(OSError):
            text = path.read_text()
            m = re.search(r"^URIs:\s*(\S+/debian)/?\s*$", text, re.M) or \
                re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)/?\s+bookworm\b", text, re.M)
            if m:
                return m.group(1)
    return "http://deb.debian.org/debian"


# ------------------------------------------------------------------------------------------ the stack

class Stack:
    def __init__(self, compose: list[str], env: dict, files: list[Path], connection: str, home: Path) -> None:
        self.compose, self.files, self.connection, self.home = compose, files, connection, home
        self.env = {**env, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0"}

    def dc(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [*self.compose, "-p", PROJECT]
        for f in self.files:
            cmd += ["-f", str(f)]
        return sh([*cmd, *args], env=self.env, timeout=timeout, check=check, cwd=REPO)

    def flwr(self, *args: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
        return sh(["flwr", *args], env=self.env, timeout=timeout, check=check, cwd=REPO)

    def container(self, service: str) -> str:
        out = self.dc("ps", "-q", service, check=False).stdout.strip()
        return out.splitlines()[0] if out else ""

    def online_nodes(self) -> int:
        out = self.flwr("supernode", "list", self.connection, "--format", "json", timeout=60)
        try:
            nodes = _json_from(out.stdout).get("nodes", [])
        except ValueError:
            return 0
        return sum(1 for n in nodes if str(n.get("status", "")).lower() == "online")

    def wait_online(self, count: int, timeout: float) -> float:
        t = time.monotonic()
        while time.monotonic() - t < timeout:
            if self.online_nodes() >= count:
                return time.monotonic() - t
            time.sleep(2)
        raise ComposeError(f"fewer than {count} SuperNodes online after {timeout:.0f} s:\n"
                           + self.dc("ps", check=False).stdout + self.dc("logs", "--tail", "20", check=False).stdout[-4000:])

    def run(self, run_config: str, timeout: float) -> dict:
        t = time.monotonic()
        proc = self.flwr("run", str(REPO), self.connection, "--stream", "--run-config", run_config,
                         timeout=timeout)
        log = proc.stdout + proc.stderr
        m = re.search(r"started run (\d+)", log) or re.search(r"run[_ ]id `?(\d+)", log)
        if not m:
            raise ComposeError(f"flwr run did not start a run:\n{log[-4000:]}")
        run_id = int(m.group(1))
        status = "unknown"
        while time.monotonic() - t < timeout:
            listing = self.flwr("list", "--run-id", str(run_id), "--format", "json", self.connection, timeout=60)
            with contextlib.suppress(ValueError, IndexError):
                status = str(_json_from(listing.stdout)["runs"][0].get("status", "unknown"))
            if status.lower().startswith("finished"):
                break
            time.sleep(3)
        return {"run_id": run_id, "status": status, "run_wall_s": round(time.monotonic() - t, 1), "log": log}

    def logs(self, tail: int = 25) -> dict[str, list[str]]:
        """Per service: its last `tail` log lines (colours stripped), to read why a run failed."""
        out = {}
        for service in self.dc("ps", "--services", check=False).stdout.split():
            text = self.dc("logs", "--no-color", "--tail", str(tail), service, check=False, timeout=60).stdout
            out[service] = [ANSI.sub("", line.split("|", 1)[-1]).rstrip() for line in text.splitlines()
                            if line.strip()][-tail:]
        return out

    def restarts(self) -> dict[str, int]:
        """Per service: how often Docker restarted its container (restart: unless-stopped)."""
        counts = {}
        for service in self.dc("ps", "--services", check=False).stdout.split():
            cid = self.container(service)
            if cid:
                out = sh(["docker", "inspect", "-f", "{{.RestartCount}}", cid], env=self.env, check=False).stdout
                counts[service] = int(out.strip() or 0)
        return counts

    def memory(self) -> dict[str, dict]:
        """Per service: peak memory, limit (MiB) and OOM kills, from the container's cgroup (v1 or v2)."""
        stats = {}
        for service in self.dc("ps", "--services", check=False).stdout.split():
            cid = self.container(service)
            if not cid:
                continue
            full = sh(["docker", "inspect", "-f", "{{.Id}} {{.State.Pid}} {{.HostConfig.Memory}} {{.State.OOMKilled}}",
                       cid], env=self.env, check=False).stdout.split()
            if len(full) < 4:
                continue
            stats[service] = {**cgroup_memory(int(full[1])), "id": full[0], "oom_killed_pid1": full[3] == "true"}
        return stats


def cgroup_memory(pid: int) -> dict:
    """Peak and limit (MiB) and the OOM-kill count of the memory cgroup holding `pid`."""
    out: dict = {}
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):  # cgroup v1
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            out["peak_mib"] = _int(base / "memory.max_usage_in_bytes") / 2**20
            out["limit_mib"] = _int(base / "memory.limit_in_bytes") / 2**20
            out["oom_kills"] = _field(base / "memory.oom_control", "oom_kill")
            return out
    for line in lines:
        if line.startswith("0::"):  # cgroup v2
            base = Path("/sys/fs/cgroup") / line[3:].lstrip("/")
            out["peak_mib"] = _int(base / "memory.peak") / 2**20
            limit = (base / "memory.max").read_text().strip() if (base / "memory.max").exists() else "max"
            out["limit_mib"] = int(limit) / 2**20 if limit.isdigit() else None
            out["oom_kills"] = _field(base / "memory.events", "oom_kill")
    return out


def _int(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0


def _field(path: Path, name: str) -> int:
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


# ------------------------------------------------------------------------------------------- checks

def check_results(results: dict, rounds: int, nodes: int, undersized: bool) -> list[str]:
    """What a correct run of this federation must show; the problems found."""
    problems = []
    if results.get("status") != "completed":
        problems.append(f"results.json status {results.get('status')!r}, error {results.get('error')!r}")
    done = results.get("rounds", [])
    if len(done) != rounds:
        problems.append(f"{len(done)} rounds recorded, expected {rounds}")
    if len(results.get("devices", [])) != nodes:
        problems.append(f"{len(results.get('devices', []))} devices recorded, expected {nodes}")
    for r in done:
        ok = [c for c in r.get("clients", []) if c.get("participated") and not c.get("error")]
        failed = [c for c in r.get("clients", []) if c.get("error")]
        healthy = nodes - 1 if undersized else nodes
        if len(ok) < healthy:
            problems.append(f"round {r.get('round')}: {len(ok)} clients succeeded, expected {healthy}")
        if undersized and not failed:
            problems.append(f"round {r.get('round')}: the under-sized node's failure is not recorded")
        if not all(isinstance(r.get(k), (int, float)) for k in ("accuracy", "loss")):
            problems.append(f"round {r.get('round')}: no accuracy/loss")
    return problems


def kernel_oom_kills(container_id: str) -> list[str]:
    """The kernel's own record (dmesg) of each process its OOM killer killed in that container's cgroup:
    "Memory cgroup out of memory: Killed process <pid> (<name>) ... anon-rss:..." (always by SIGKILL,
    which a shell reports as exit status 137)."""
    out = sh(["dmesg"], check=False).stdout.splitlines()
    kills, ours = [], False
    for line in out:
        if "oom-kill:" in line:
            ours = bool(container_id) and container_id in line
        elif ours and "Killed process" in line:
            kills.append(line.split("]", 1)[-1].strip())
            ours = False
    return kills


def run_and_fetch(stack: Stack, rounds: int, nodes: int, tls: bool, timeout_s: float) -> tuple[dict, dict]:
    """One `flwr run` of the federation; (the run as `Stack.run` returns it, its results.json)."""
    run_name = f"compose-{'tls' if tls else 'ci'}-{int(time.time())}"
    run = stack.run(RUN_CONFIG.format(rounds=rounds, nodes=nodes, run_name=run_name), timeout=timeout_s)
    out = stack.home / "outputs"
    shutil.rmtree(out, ignore_errors=True)
    server = stack.container("superexec-serverapp")
    sh(["docker", "cp", f"{server}:/app/outputs", str(out)], env=stack.env)
    return run, load_results(out / run_name)


def no_clientapp_started(results: dict) -> bool:
    """The run stopped at the device query with no node answering: no ClientApp process ever ran."""
    error = str(results.get("error") or "")
    return not results.get("devices") and error.startswith("0 of ") and "did not answer" in error


def run_compose_federation(tls: bool = False, rounds: int = 2, compose: list[str] | None = None,
                           undersized: bool = True, timeout_s: float = 1800, keep_stack: bool = False) -> dict:
    """Everything in the module docstring; returns the summary (its `problems` empty if all passed)."""
    compose = pick_compose(compose)
    t0 = time.monotonic()
    summary: dict = {"tls": tls, "rounds": rounds, "compose": " ".join(compose), "problems": []}
    # Root runs what this cache holds (dockerd's images, a rootfs): refuse one we do not own (root_cache.py).
    claim_cache(CACHE)
    lock = open_lock(CACHE)  # one federation per cache (and per published port) at a time
    import fcntl
    fcntl.flock(lock, fcntl.LOCK_EX)
    ensure_packages(compose)
    daemon = Daemon(CACHE / "docker")
    home = Path(tempfile.mkdtemp(prefix="fl-compose-home-"))
    data = Path(tempfile.mkdtemp(prefix="fl-compose-data-"))  # /data: synthetic data needs no files
    certs = REPO / "deploy" / "certs" if tls else None  # where docker-compose.tls.yml mounts them from
    stack = None
    try:
        daemon.start()
        summary["compose_version"] = sh([*compose, "version"], env=daemon.env, check=False).stdout.splitlines()[:1]
        summary["build_s"] = {k: round(v, 1) for k, v in build_images(daemon.env).items()}
        files = [REPO / "docker-compose.yml"]
        nodes = 4
        connection = "docker"
        if tls:
            files.append(REPO / "docker-compose.tls.yml")
            connection = "docker-tls"
            sys.path.insert(0, str(REPO / "scripts"))
            from make_certs import make_certs
            if not (certs / "ca.crt").exists():  # a folder made earlier is used as it is, never overwritten
                make_certs(certs, nodes=nodes)
            for p in certs.iterdir():
                if p.name != ".gitignore":
                    os.chown(p, 49999, 49999)  # Flower's images run as uid 49999 (deploy/README.md)
        if undersized and not tls:
            files.append(UNDERSIZED)
            nodes += 1
        # Every node states the same num-partitions, or the server leaves the odd one out (verify.py).
        env = {**daemon.env, "FL_DATA_DIR": str(data), "FL_NUM_PARTITIONS": str(nodes)}
        stack = Stack(compose, env, files, connection, home)
        home.mkdir(exist_ok=True)
        write_flower_config(home, PORT, certs / "ca.crt" if certs else None)
        config = (home / "config.toml").read_text().replace("local-federation", connection)
        (home / "config.toml").write_text(config)
        t = time.monotonic()
        if tls:
            stack.dc("up", "-d", "--no-build", "superlink", "superexec-serverapp")
            deadline = time.monotonic() + 120
            for i in range(1, nodes + 1):
                while True:
                    reg = stack.flwr("supernode", "register", str(certs / f"supernode-{i}.pub"), connection,
                                     "--name", f"supernode-{i}", timeout=60)
                    if reg.returncode == 0:
                        break
                    if time.monotonic() > deadline:
                        raise ComposeError(f"registering supernode-{i} failed:\n{reg.stdout}{reg.stderr}")
                    time.sleep(2)
        stack.dc("up", "-d", "--no-build")
        summary["containers"] = len(stack.dc("ps", "-q").stdout.split())
        stack.wait_online(nodes, 300)
        summary["online_after_s"] = round(time.monotonic() - t, 1)
        run, results = run_and_fetch(stack, rounds, nodes, tls, timeout_s - (time.monotonic() - t0))
        if no_clientapp_started(results):
            # Seen once in CI (a loaded machine): every SuperNode online and relaying, but no ClientApp
            # SuperExec started a process in 600 s. Recorded with every service's logs, the ClientApp
            # SuperExecs restarted and the run tried once more; a second failure is the test's failure.
            summary["first_attempt"] = {"error": results.get("error"), "status": run["status"],
                                        "restarts": stack.restarts(), "logs": stack.logs()}
            stack.dc("restart", *[s for s in stack.dc("ps", "--services").stdout.split()
                                  if s.startswith("superexec-clientapp")], timeout=300)
            run, results = run_and_fetch(stack, rounds, nodes, tls, timeout_s - (time.monotonic() - t0))
        summary.update(run_id=run["run_id"], status=run["status"], run_wall_s=run["run_wall_s"])
        summary["flwr_run_tail"] = run["log"][-2500:]
        summary["results"] = {
            "status": results.get("status"), "error": results.get("error"),
            "rounds": [{"round": r["round"], "accuracy": r["accuracy"], "seconds": r.get("seconds"),
                        "clients": [{"node_id": c["node_id"], "profile": c.get("profile"),
                                     "participated": c.get("participated"), "error": c.get("error"),
                                     "peak_memory_mb": c.get("peak_memory_mb")} for c in r.get("clients", [])]}
                       for r in results.get("rounds", [])],
            "summary": results.get("summary"),
        }
        summary["problems"] += check_results(results, rounds, nodes, undersized and not tls)
        if not run["status"].endswith("completed"):
            summary["problems"].append(f"flwr list: run {run['run_id']} status {run['status']}")
        summary["memory"] = stack.memory()
        if undersized and not tls:
            small = summary["memory"].get(UNDERSIZED_CLIENTAPP, {})
            summary["undersized"] = {
                **small,
                "kernel": kernel_oom_kills(small.get("id", "")),
                "recorded_errors": sorted({c["error"] for r in summary["results"]["rounds"]
                                           for c in r["clients"] if c["error"]}),
            }
            if not small.get("oom_kills"):
                summary["problems"].append(f"{UNDERSIZED_CLIENTAPP}: no OOM kill in its cgroup")
        if summary["problems"]:
            summary["restarts"], summary["logs"] = stack.restarts(), stack.logs()
    except Exception as exc:  # noqa: BLE001 - reported in the summary, after teardown
        summary["problems"].append(f"{type(exc).__name__}: {exc}")
        if stack is not None:
            with contextlib.suppress(Exception):
                summary["restarts"], summary["logs"] = stack.restarts(), stack.logs()
    finally:
        if stack is not None and not keep_stack:
            with contextlib.suppress(Exception):
                stack.dc("down", "-v", "--remove-orphans", timeout=300, check=False)
        if not keep_stack:
            daemon.stop()
        for d in (home, data):
            shutil.rmtree(d, ignore_errors=True)
        lock.close()
    summary["wall_s"] = round(time.monotonic() - t0, 1)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/compose_federation.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tls", action="store_true", help="add docker-compose.tls.yml (TLS + node auth), 4 nodes")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compose", default=None, help="compose command (default: docker-compose if installed, "
                        "else \"docker compose\" if that plugin answers, else docker-compose, installed)")
    parser.add_argument("--no-undersized", action="store_true", help="without the under-sized fifth node")
    parser.add_argument("--keep-stack", action="store_true", help="leave the stack and the daemon running")
    parser.add_argument("--json", type=Path, help="write the summary here")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        claim_cache(CACHE)
    except CacheRefused as exc:
        print(f"compose_federation: refused: {exc}", file=sys.stderr)
        return 1
    summary = run_compose_federation(args.tls, args.rounds, shlex.split(args.compose) if args.compose else None,
                                     not args.no_undersized, args.timeout, args.keep_stack)
    text = json.dumps(summary, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0 if not summary["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
