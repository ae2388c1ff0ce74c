"""The documented secure deployment on real processes: devices reach the Fleet API, never the Control API.

flwr 1.41's SuperLink serves its Fleet, Control and Runtime APIs on one port and offers no account
authentication outside Flower's enterprise edition, so deploy/README.md's real-device setup binds the
SuperLink to 127.0.0.1 and puts nginx (deploy/nginx/fleet-proxy.conf) on the LAN port, forwarding
/v1/fleet/ only. Here "the LAN" is a network namespace this test creates, joined to the host by a veth
pair: everything a device does runs inside it, as on another machine. The test checks that from
there (1) a Control API call, the issue's attack (registering a node key of one's own), is refused,
and so are the Runtime API and anything else but the Fleet API; (2) the SuperLink's own port is
unreachable; (3) an authenticated SuperNode joins through the proxy; (4) the operator, on the server
host, still registers keys and submits runs; (5) a SuperNode started with --trusted-entities refuses
the app the operator submitted: flwr 1.41 verifies only apps signed through Flower's platform, which
deploy/README.md explains.

Needs root (network namespaces) and nginx (installed from Debian's packages when missing, as
tests/test_compose.py installs Docker). Fast checks of the documented commands are at the end.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from scripts.local_federation import _json_from, _port_open, _Processes, _wait_for, free_port, node_config
from scripts.make_certs import make_certs

REPO = Path(__file__).resolve().parents[1]
NGINX_DIR = REPO / "deploy" / "nginx"
LAN_PORT, SUPERLINK_PORT = 8000, 9093  # as deploy/nginx/fleet-proxy.conf and deploy/README.md say
RUN_CONFIG = "num-server-rounds=1 max-client-examples=32 test-size=100 public-size=50 min-nodes=2"

# Run inside the namespace: the HTTP status (or the connection error) of a POST to each path.
PROBE = """
import http.client, json, ssl, sys
host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
status = {}
for path in sys.argv[4:]:
    try:
        conn = http.client.HTTPSConnection(host, port, context=ssl.create_default_context(cafile=ca), timeout=10)
        conn.request("POST", path, body=b"", headers={"content-type": "application/protobuf"})
        status[path] = conn.getresponse().status
    except OSError as exc:
        status[path] = type(exc).__name__
print(json.dumps(status))
"""


class OtherMachine:
    """A network namespace joined to this host by a veth pair: a device on the server's LAN."""

    def __init__(self) -> None:
        tag = os.getpid() % 100000
        self.ns, self.veth, peer = f"flout{tag}", f"flh{tag}", f"flo{tag}"
        subnet = f"10.213.{tag % 250 + 1}"
        self.server_ip, self.ip = f"{subnet}.1", f"{subnet}.2"
        for cmd in (f"ip netns add {self.ns}", f"ip link add {self.veth} type veth peer name {peer}",
                    f"ip link set {peer} netns {self.ns}", f"ip addr add {self.server_ip}/30 dev {self.veth}",
                    f"ip link set {self.veth} up", f"ip -n {self.ns} addr add {self.ip}/30 dev {peer}",
                    f"ip -n {self.ns} link set {peer} up", f"ip -n {self.ns} link set lo up"):
            subprocess.run(shlex.split(cmd), check=True, capture_output=True, timeout=30)

    def cmd(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=30)  # takes its veth end
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True, timeout=30)


def _ensure_nginx() -> None:
    if shutil.which("nginx"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in ("apt-get update -q", "apt-get install -y -q nginx-light"):
        subprocess.run(shlex.split(cmd), env=env, check=True, capture_output=True, timeout=600)


def _proxy_config(folder: Path, lan_port: int, superlink_port: int) -> Path:
    """deploy/nginx/fleet-proxy.conf and its includes, unchanged but for the two ports (each must occur once)."""
    text = (NGINX_DIR / "fleet-proxy.conf").read_text()
    for old, new in ((f"listen {LAN_PORT} ssl;", f"listen {lan_port} ssl;"),
                     (f"server 127.0.0.1:{SUPERLINK_PORT};", f"server 127.0.0.1:{superlink_port};")):
        assert text.count(old) == 1, f"deploy/nginx/fleet-proxy.conf: expected {old!r} once"
        text = text.replace(old, new)
    (folder / "nginx").mkdir()
    (folder / "nginx" / "fleet-proxy.conf").write_text(text)
    for include in ("fleet-only.conf", "http-common.conf"):
        shutil.copy(NGINX_DIR / include, folder / "nginx" / include)
    return folder / "nginx" / "fleet-proxy.conf"


def _flower_config(home: Path, certs: Path, lan: str, lan_port: int, superlink_port: int) -> None:
    ca = json.dumps(str(certs / "ca.crt"))
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "operator"\n\n[superlink.operator]\naddress = "127.0.0.1:{superlink_port}"\n'
        f'root-certificates = {ca}\n\n[superlink.through-proxy]\naddress = "{lan}:{lan_port}"\n'
        f'root-certificates = {ca}\n\n[superlink.direct]\naddress = "{lan}:{superlink_port}"\n'
        f'root-certificates = {ca}\n')


@pytest.fixture(scope="module")
def secure_server(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces (and nginx from apt when missing)")
    _ensure_nginx()
    tmp = tmp_path_factory.mktemp("fleet-proxy")
    home = tmp / "flwr-home"
    home.mkdir()
    lan = OtherMachine()
    lan_port, superlink_port = free_port(), free_port()
    certs = tmp / "certs"
    make_certs(certs, nodes=3, sans=[lan.server_ip])
    _flower_config(home, certs, lan.server_ip, lan_port, superlink_port)
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0",
           "PYTHONUNBUFFERED": "1"}
    procs = _Processes(home, env, tmp)
    try:
        superlink = procs.start("superlink", [
            "flower-superlink", "--host", "127.0.0.1", "--port", str(superlink_port),
            "--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
            "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation"])
        (tmp / "proxy").mkdir(mode=0o700)
        proxy = procs.start("nginx", ["nginx", "-p", f"{tmp / 'proxy'}/", "-e", "stderr",
                                      "-c", str(_proxy_config(tmp, lan_port, superlink_port))])
        _wait_for(lambda: _port_open(superlink_port) and _port_open(lan_port), 60, "the SuperLink and nginx",
                  alive=[superlink, proxy])
        yield {"procs": procs, "lan": lan, "certs": certs, "home": home, "tmp": tmp, "lan_port": lan_port,
               "superlink_port": superlink_port}
    finally:
        procs.stop()
        lan.close()


def _probe(server, port: int, *paths: str) -> dict:
    lan = server["lan"]
    out = subprocess.run(lan.cmd(sys.executable, "-c", PROBE, lan.server_ip, str(port), str(server["certs"] / "ca.crt"),
                                 *paths), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _cli(server, *args: str, outside: bool = False) -> subprocess.CompletedProcess:
    argv = ["flwr", *args]
    procs = server["procs"]
    return subprocess.run(server["lan"].cmd(*argv) if outside else argv, env=procs.env, cwd=server["home"],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def _registered(server) -> list[dict]:
    listing = _cli(server, "supernode", "list", "operator", "--format", "json")
    return _json_from(listing.stdout).get("nodes", [])


@pytest.mark.slow
def test_from_the_lan_only_the_fleet_api_answers(secure_server):
    forbidden = ["/v1/control/list-runs", "/v1/control/register-node", "/v1/control/start-run",
                 "/v1/runtime/get-nodes", "/v1/runtime/push-messages", "/docs", "/health",
                 "/v1/fleet/../control/list-runs", "/v1/fleet/%2e%2e/control/list-runs", "/v1/fleet/get-run?x=1"]
    status = _probe(secure_server, secure_server["lan_port"], *forbidden, "/v1/fleet/get-run")
    assert {p: status[p] for p in forbidden} == {p: 403 for p in forbidden}
    # The Fleet API is forwarded: the SuperLink itself answers (an unsigned request: not authenticated).
    assert status["/v1/fleet/get-run"] in (400, 401), status
    direct = _probe(secure_server, secure_server["superlink_port"], "/v1/control/list-runs")
    assert direct["/v1/control/list-runs"] == "ConnectionRefusedError", "the SuperLink must listen on loopback only"


@pytest.mark.slow
def test_a_stranger_on_the_lan_cannot_register_a_node_key_or_submit_a_run(secure_server):
    """The issue's attack: with the CA certificate alone, register a key of one's own, then run an app."""
    before = len(_registered(secure_server))
    certs = secure_server["certs"]
    for connection in ("through-proxy", "direct"):
        reg = _cli(secure_server, "supernode", "register", str(certs / "supernode-3.pub"), connection,
                   "--format", "json", outside=True)
        assert '"success": true' not in reg.stdout, reg.stdout
        run = _cli(secure_server, "run", str(REPO), connection, "--run-config", RUN_CONFIG, outside=True)
        assert not re.search(r"started run \d+", run.stdout + run.stderr), run.stdout
    assert len(_registered(secure_server)) == before


@pytest.mark.slow
def test_authenticated_supernodes_join_through_the_proxy_and_only_trusted_apps_would_run(secure_server):
    """The operator registers keys from the server host; SuperNodes on the LAN join through nginx; a
    SuperNode with --trusted-entities refuses the operator's locally built app (flwr 1.41 verifies only
    FABs signed through Flower's platform: deploy/README.md, "What protects the SuperNodes")."""
    server, certs, lan = secure_server, secure_server["certs"], secure_server["lan"]
    for i in (1, 2):
        reg = _cli(server, "supernode", "register", str(certs / f"supernode-{i}.pub"), "operator", "--format", "json")
        assert '"success": true' in reg.stdout, reg.stdout + reg.stderr
    trusted = server["tmp"] / "trusted-entities.yaml"
    publisher = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
    trusted.write_text(f"fpk_operator: '{publisher.decode()} operator'\n")  # a publisher the operator trusts
    procs = server["procs"]
    nodes = []
    for i, extra in ((1, []), (2, ["--trusted-entities", str(trusted)])):
        nodes.append(procs.start(f"supernode-{i}", lan.cmd(
            "flower-supernode", "--superlink", f"{lan.server_ip}:{server['lan_port']}",
            "--root-certificates", str(certs / "ca.crt"), "--auth-supernode-private-key", str(certs / f"supernode-{i}.key"),
            "--host", "127.0.0.1", "--port", str(9094 + i), "--max-wait-time", "60",
            "--node-config", node_config(i - 1, 2, "raspberry-pi-4", None), *extra)))

    def online() -> int:
        return sum(str(n.get("status", "")).lower() == "online" for n in _registered(server))
    _wait_for(lambda: online() == 2, 90, "both SuperNodes online through the proxy", interval=2, alive=nodes)

    run = _cli(server, "run", str(REPO), "operator", "--run-config", RUN_CONFIG)
    match = re.search(r"started run (\d+)", run.stdout + run.stderr)
    assert match, run.stdout + run.stderr
    refused = "App verification is not supported by the connected SuperLink"
    log_of = {p.name: p.log_path for p in procs.procs}
    try:
        _wait_for(lambda: refused in log_of["supernode-2"].read_text(errors="replace"), 150,
                  "the SuperNode with --trusted-entities to refuse the app", interval=2, alive=nodes)
        _wait_for(lambda: "Receiving: query message" in log_of["supernode-1"].read_text(errors="replace"), 60,
                  "the other SuperNode to take the same run's message", interval=2, alive=nodes)
    finally:
        _cli(server, "stop", match.group(1), "operator")
    assert refused not in log_of["supernode-1"].read_text(errors="replace")


# ------------------------------------------------------------------------------ fast: the documented commands

def _documented_superlink_commands() -> list[str]:
    texts = [(REPO / "deploy" / "README.md").read_text(), (REPO / "deploy" / "raspberry-pi" / "README.md").read_text(),
             (NGINX_DIR / "fleet-proxy.conf").read_text().replace("\n#", "\n")]
    commands = []
    for text in texts:
        for m in re.finditer(r"^\s*(?:sudo\s+)?flower-superlink((?:[^\n]*\\\n)*[^\n]*)", text, re.M):
            commands.append(m.group(1).replace("\\\n", " "))
    return commands


def test_every_documented_superlink_keeps_its_apis_on_loopback_and_installs_nothing():
    commands = _documented_superlink_commands()
    assert commands
    for command in commands:
        argv = shlex.split(command.split("#")[0])
        if "--help" in argv or not argv:
            continue
        assert "--disable-runtime-dependency-installation" in argv, command
        assert argv[argv.index("--host") + 1] == "127.0.0.1", f"Control API exposed: {command}"


def test_the_proxy_forwards_the_fleet_path_only():
    rules = (NGINX_DIR / "fleet-only.conf").read_text()
    locations = re.findall(r"^location\s+(\S+)", rules, re.M)
    assert locations == ["/v1/fleet/", "/"]
    assert re.search(r"location / \{\s*return 403;\s*\}", rules)
    assert (NGINX_DIR / "fleet-proxy.conf").read_text().count("include fleet-only.conf;") == 1
