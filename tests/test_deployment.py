"""Deployment: the real deployment engine on loopback (slow), and the container and device files (fast).

Slow: scripts/local_federation.py starts a SuperLink and SuperNode processes on 127.0.0.1, runs
`flwr run` against them and stops everything (each run bounded by FEDERATION_TIMEOUT_S, each start
by LocalFederation's own limit). The strategy runs share one federation; the secure one is its own.
Fast: docker-compose*.yml, Dockerfile, the Raspberry Pi systemd unit and scripts/make_certs.py are
checked against the app and against the pinned flwr's own command-line interfaces, since CI has no
Docker engine. PyYAML is a dependency of flwr itself, so it is always installed with the app.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key, \
    load_ssh_public_key
from flwr.common.config import parse_config_args

from scripts.local_federation import (FederationError, LocalFederation, config_string, node_config,
                                      run_local_federation, write_flower_config)
from scripts.make_certs import make_certs
from server_app.strategies import STRATEGIES
from fl_app.results import load_results

REPO = Path(__file__).resolve().parents[1]
PROFILES_DIR = REPO / "profiles"
FEDERATION_TIMEOUT_S = 240
SMALL = {"memory-pool": "", "num-server-rounds": 2, "max-client-examples": 64, "test-size": 200, "public-size": 100,
         "min-nodes": 3}


# ------------------------------------------------------------------------------- slow: real engine

def _board_profile(folder: Path) -> Path:
    """A device profile given to a SuperNode as a file path, not a name."""
    text = (PROFILES_DIR / "raspberry-pi-3b-plus.toml").read_text()
    path = folder / "lab-board.toml"
    path.write_text(re.sub(r'^name = ".*"$', 'name = "lab-board"', text, count=1, flags=re.M))
    return path


def _explain(result) -> str:
    logs = "\n".join(f"--- supernode-{i + 1} (exit {code})\n{log[-1500:]}"
                     for i, (log, code) in enumerate(zip(result.node_logs, result.node_exit_codes)))
    return (f"{result.summary()}\n--- flwr run\n{result.log[-4000:]}\n--- superlink\n"
            f"{result.superlink_log[-3000:]}\n{logs}")


def _results(folder: Path) -> dict:
    return load_results(folder)


@pytest.fixture(scope="class")
def federation(tmp_path_factory):
    """Three SuperNodes (raspberry-pi-4, laptop, and a profile given by file path) shared by the
    strategy runs, so the SuperLink and SuperNodes start once; stopped when the class is done."""
    tmp = tmp_path_factory.mktemp("federation")
    with LocalFederation(3, ["raspberry-pi-4", "laptop", str(_board_profile(tmp))], workdir=tmp) as fed:
        yield fed, tmp


@pytest.mark.slow
class TestStrategiesOnOneFederation:
    @pytest.mark.parametrize("strategy", [
        "reft", "fedavg",
        pytest.param("profl", marks=pytest.mark.skipif("profl" not in STRATEGIES,
                                                       reason="ProFL is not in server_app.strategies.STRATEGIES yet")),
    ])
    def test_a_small_run_completes_on_three_supernodes_with_different_profiles(self, federation, strategy):
        fed, tmp = federation
        out = tmp / "out"
        result = fed.run({**SMALL, "strategy": strategy, "output-dir": str(out), "run-name": strategy},
                         timeout_s=FEDERATION_TIMEOUT_S)
        assert result.completed, _explain(result)
        results = _results(out / strategy)
        assert results["status"] == "completed", results.get("error")
        assert results["config"]["strategy"] == strategy
        devices = results["devices"]
        assert len(devices) == 3
        assert sorted(d["profile"] for d in devices) == ["lab-board", "laptop", "raspberry-pi-4"]
        assert sorted(d["partition_id"] for d in devices) == [0, 1, 2]
        assert {str(d["node_id"]) for d in devices} == {str(n["node-id"]) for n in result.supernodes}
        assert [r["round"] for r in results["rounds"]] == [1, 2]
        assert all(r["participants"] >= 1 for r in results["rounds"])
        assert result.node_exit_codes == [None, None, None], "every SuperNode stayed up for the run"


@pytest.fixture(scope="module")
def secure_federation(tmp_path_factory):
    """TLS, SuperNode authentication, three registered SuperNodes and one whose key was never registered."""
    tmp = tmp_path_factory.mktemp("secure")
    out = tmp / "out"
    result = run_local_federation(3, ["raspberry-pi-4", "laptop", "jetson-nano"],
                                  {**SMALL, "num-server-rounds": 1, "strategy": "fedavg", "output-dir": str(out),
                                   "run-name": "secure"},
                                  tls=True, auth=True, unregistered_nodes=1, timeout_s=FEDERATION_TIMEOUT_S,
                                  workdir=tmp)
    return result, out / "secure"


@pytest.mark.slow
def test_a_run_over_tls_with_authenticated_supernodes_completes(secure_federation):
    result, folder = secure_federation
    assert result.completed, _explain(result)
    assert "Uvicorn running on https://127.0.0.1" in result.superlink_log  # TLS really on
    assert "SuperNode authentication is disabled" not in result.superlink_log
    results = _results(folder)
    assert results["status"] == "completed"
    assert len(results["devices"]) == 3 and len(results["rounds"]) == 1
    assert result.node_exit_codes == [None, None, None], "every registered SuperNode stayed up for the run"


@pytest.mark.slow
def test_a_supernode_whose_key_was_not_registered_is_refused(secure_federation):
    result, folder = secure_federation
    assert result.unregistered_exit_codes and all(result.unregistered_exit_codes), \
        f"the unregistered SuperNode was not refused: exit codes {result.unregistered_exit_codes}"
    assert "Failed to activate SuperNode" in result.unregistered_logs[0]
    assert "No SuperNode found with the given public key" in result.superlink_log
    registered = {str(n["node-id"]) for n in result.supernodes}
    assert len(registered) == 3
    assert {str(d["node_id"]) for d in _results(folder)["devices"]} == registered


# ------------------------------------------------------------------- fast: script building blocks

def test_node_config_round_trips_through_flowers_parser(tmp_path):
    profile = tmp_path / "a dir" / "my board.toml"  # spaces, and a value ending in .toml
    parsed = parse_config_args([node_config(2, 5, str(profile), str(tmp_path / "data"))])
    assert parsed == {"partition-id": 2, "num-partitions": 5, "profile": str(profile),
                      "data-dir": str((tmp_path / "data").resolve())}
    assert parse_config_args([node_config(0, 1, "measure", None)]) == {
        "partition-id": 0, "num-partitions": 1, "profile": "measure"}


def test_run_config_mapping_becomes_flwr_run_config_syntax():
    text = config_string({"strategy": "reft", "num-server-rounds": 2, "lr": 0.05, "augment": False,
                          "data-dir": "/x/y z"})
    assert parse_config_args([text]) == {"strategy": "reft", "num-server-rounds": 2, "lr": 0.05,
                                         "augment": False, "data-dir": "/x/y z"}
    assert config_string("strategy='fedavg'") == "strategy='fedavg'"


def test_the_flower_config_written_is_one_flwr_reads(tmp_path, monkeypatch):
    from flwr.cli.flower_config import read_superlink_connection

    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    write_flower_config(tmp_path, 12345, None)
    conn = read_superlink_connection()
    assert (conn.name, conn.address, conn.insecure) == ("local-federation", "127.0.0.1:12345", True)
    write_flower_config(tmp_path, 12346, tmp_path / "ca.crt")
    conn = read_superlink_connection("local-federation")
    assert conn.root_certificates == str((tmp_path / "ca.crt").resolve()) and not conn.insecure


def test_a_federation_with_an_unknown_profile_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(FederationError, match="unknown profile 'no-such-board'"):
        run_local_federation(2, ["raspberry-pi-4", "no-such-board"], SMALL, home=tmp_path / "home")
    with pytest.raises(FederationError, match="does not exist"):
        LocalFederation(1, [str(tmp_path / "missing.toml")])
    assert not (tmp_path / "home").exists()


def test_local_federation_script_documents_itself():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "local_federation.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for option in ("--nodes", "--profiles", "--run-config", "--tls", "--auth", "--data-dir", "--timeout"):
        assert option in proc.stdout


def test_lab_certificates_are_ones_flower_and_tls_accept(tmp_path):
    files = make_certs(tmp_path, nodes=2, sans=["192.168.1.20", "pi-lab.local"])
    ca = x509.load_pem_x509_certificate(files["ca_cert"].read_bytes())
    server = x509.load_pem_x509_certificate(files["server_cert"].read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "superlink", "pi-lab.local"} <= set(sans.get_values_for_type(x509.DNSName))
    assert {"127.0.0.1", "192.168.1.20"} <= {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    assert "LAB USE ONLY" in ca.subject.rfc4514_string()
    key = load_pem_private_key(files["server_key"].read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    for i in (1, 2):  # what flower-supernode and `flwr supernode register` load
        private = load_ssh_private_key(files[f"supernode-{i}.key"].read_bytes(), None)
        public = load_ssh_public_key(files[f"supernode-{i}.pub"].read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(public.curve, ec.SECP384R1)
        assert private.public_key().public_numbers() == public.public_numbers()
        assert files[f"supernode-{i}.key"].stat().st_mode & 0o077 == 0
    with pytest.raises(FileExistsError):
        make_certs(tmp_path, nodes=1)


def test_private_keys_are_owner_only_from_the_moment_they_are_created(tmp_path, monkeypatch):
    """No window in which a key file exists with a wider mode: each file's mode is read right after
    os.open created it, before a byte is written, under the most permissive umask."""
    created: dict[str, int] = {}
    real_open = os.open

    def recording_open(path, flags, mode=0o777, *args, **kwargs):
        fd = real_open(path, flags, mode, *args, **kwargs)
        created.setdefault(Path(path).name, os.fstat(fd).st_mode & 0o777)
        return fd

    monkeypatch.setattr(os, "open", recording_open)
    old_umask = os.umask(0)
    try:
        files = make_certs(tmp_path / "certs", nodes=2)
        make_certs(tmp_path / "certs", nodes=1, force=True)  # replacing keys: still never wider
    finally:
        os.umask(old_umask)
    keys = [p.name for p in files.values() if p.suffix == ".key"]
    assert sorted(keys) == ["ca.key", "server.key", "supernode-1.key", "supernode-2.key"]
    assert {created[name] for name in keys} == {0o600}
    assert all((tmp_path / "certs" / name).stat().st_mode & 0o777 == 0o600 for name in keys)
    assert created["ca.crt"] == created["supernode-1.pub"] == 0o644
    assert (tmp_path / "certs").stat().st_mode & 0o777 == 0o700


def test_make_certs_never_writes_through_a_planted_symlink(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("untouched")
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.key").symlink_to(target)
    with pytest.raises(OSError):
        make_certs(tmp_path / "certs", nodes=0, force=True)
    assert target.read_text() == "untouched"


def test_the_client_path_needs_no_server_side_packages():
    """A Raspberry Pi installs flwr, torch, numpy and psutil only: no torchvision, matplotlib or Ray."""
    code = ("import sys, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name.split('.')[0] in ('torchvision', 'matplotlib', 'ray'):\n"
            "            raise ImportError('server-side package imported on the client path: ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import client_app.client_app, fl_app.measure\n"
            "from fl_app.data import load_dataset\n"
            "load_dataset('synthetic', '', 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ------------------------------------------------------------ fast: compose, Dockerfile, systemd

def _pinned_flwr() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [m.group(1) for d in deps if (m := re.fullmatch(r"flwr(?:\[[^\]]*\])?==([\w.]+)", d.replace(" ", "")))]
    assert len(pins) == 1, f"pyproject.toml should pin flwr exactly once: {deps}"
    return pins[0]


@functools.cache
def _cli_options(executable: str) -> dict[str, set[str] | None]:
    """Every --option the installed executable documents in its --help and does not call deprecated:
    None if it takes no value, else the values it allows ({"*"}: any)."""
    proc = subprocess.run([executable, "--help"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    options: dict[str, set[str] | None] = {}
    # argparse's option blocks: a line of two spaces then "-x, --name VALUE" / "--name {a,b}" / "--name",
    # then its description (on the same line or deeper-indented ones) up to the next option.
    blocks = re.split(r"^(?=  -)", proc.stdout, flags=re.M)
    for block in blocks:
        match = re.match(r"  (?:-\w, )?(--[a-z][\w-]*)(?: (\{[^}]*\}|[A-Z][A-Z_]*))?", block)
        if not match or re.search(r"\bdeprecated\b", block, re.I):
            continue
        name, value = match.groups()
        options[name] = None if value is None else (set(value[1:-1].split(",")) if value[0] == "{" else {"*"})
    assert "--help" in options and len(options) > 3, f"unreadable --help of {executable}:\n{proc.stdout}"
    return options


def _check_command(executable: str, args: list[str]) -> list[str]:
    """Problems with `executable args`: unknown options, missing or invalid values, stray words."""
    options, problems, i = _cli_options(executable), [], 0
    while i < len(args):
        arg = str(args[i])
        name, _, inline = arg.partition("=")
        if not name.startswith("--"):
            problems.append(f"{executable}: unexpected argument {arg!r}")
        elif name not in options:
            problems.append(f"{executable}: unknown or deprecated option {name} "
                            f"(flwr {importlib.metadata.version('flwr')})")
        elif options[name] is not None:
            if not inline:
                i += 1
                if i >= len(args) or str(args[i]).startswith("--"):
                    problems.append(f"{executable}: {name} needs a value")
                    continue
                inline = str(args[i])
            allowed = options[name]
            if "*" not in allowed and inline not in allowed:
                problems.append(f"{executable}: {name} {inline!r} is not one of {sorted(allowed)}")
        elif inline:
            problems.append(f"{executable}: {name} takes no value")
        i += 1
    return problems


def _compose(name: str, env: dict[str, str] | None = None) -> dict:
    """A compose file as Compose reads it: `${VAR:-default}` from `env`, else the default."""
    text = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: (env or {}).get(m[1], m[2]), (REPO / name).read_text())
    return yaml.safe_load(text)


def _dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def _executable(service: dict) -> str:
    """The program a service runs: the entrypoint of Flower's images, or of this repository's Dockerfile."""
    image = str(service.get("image", ""))
    if "build" in service:
        entry = re.search(r'^ENTRYPOINT \["([^"]+)"', _dockerfile(), re.M)
        return entry.group(1)
    for component in ("superlink", "supernode", "superexec"):
        if image.startswith(f"flwr/{component}:"):
            return f"flower-{component}"
    if image.startswith("nginx:"):  # the Fleet proxy; its command is nginx's own (tests/test_fleet_proxy.py)
        return "nginx"
    raise AssertionError(f"no known entrypoint for image {image!r}")


def _merged_services() -> dict[str, dict]:
    """docker-compose.yml with docker-compose.tls.yml applied (override keys replace, as compose does
    for command; volumes are appended)."""
    base, tls = _compose("docker-compose.yml")["services"], _compose("docker-compose.tls.yml")["services"]
    merged = {name: dict(svc) for name, svc in base.items()}
    for name, override in tls.items():
        assert name in merged, f"docker-compose.tls.yml overrides unknown service {name}"
        for key, value in override.items():
            merged[name][key] = [*merged[name].get(key, []), *value] if key == "volumes" else value
    return merged


def _option(command: list[str], name: str) -> str | None:
    command = [str(c) for c in command]
    return command[command.index(name) + 1] if name in command else None


def test_installed_flwr_is_the_pinned_one():
    """The flag checks below read the installed flwr's --help: they are about the pin only if these agree."""
    assert importlib.metadata.version("flwr") == _pinned_flwr(), "reinstall: pip install -e '.[test]'"


def test_compose_and_dockerfile_use_the_pinned_flwr_images():
    pinned = _pinned_flwr()
    default = re.search(r"^ARG FLWR_VERSION=(\S+)", _dockerfile(), re.M)
    assert default and default.group(1) == pinned
    assert re.search(r"^FROM flwr/superexec:\$\{FLWR_VERSION\}(-\$\{PYTHON_TAG\})?\s*$", _dockerfile(), re.M)
    python_tag = re.search(r"^ARG PYTHON_TAG=py(\d+\.\d+)-", _dockerfile(), re.M)
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert python_tag is None or tuple(map(int, python_tag.group(1).split("."))) >= \
        tuple(map(int, re.search(r">=\s*(\d+\.\d+)", requires).group(1).split("."))), requires
    for file in ("docker-compose.yml", "docker-compose.tls.yml"):
        for name, svc in _compose(file)["services"].items():
            image = str(svc.get("image", ""))
            if image.startswith("flwr/"):
                assert image.split(":", 1)[1] == pinned, f"{file}: {name} uses {image}, flwr is pinned at {pinned}"
            if "build" in svc:
                assert str(svc["build"]["args"]["FLWR_VERSION"]) == pinned, name
    services = _compose("docker-compose.yml")["services"]
    assert {_executable(s) for s in services.values()} == {"flower-superlink", "flower-supernode",
                                                           "flower-superexec", "nginx"}


@pytest.mark.parametrize("variant", ["docker-compose.yml", "with docker-compose.tls.yml"])
def test_every_flag_of_every_service_is_one_the_pinned_flwr_accepts(variant):
    services = _compose("docker-compose.yml")["services"] if variant == "docker-compose.yml" else _merged_services()
    problems = [f"{name}: {p}" for name, svc in services.items() if _executable(svc) != "nginx"
                for p in _check_command(_executable(svc), svc.get("command", []))]
    assert not problems, "\n".join(problems)


def test_the_flag_check_catches_what_flwr_would_refuse():
    assert _check_command("flower-supernode", ["--insecure", "--superlink", "superlink:8000"]) == []
    assert _check_command("flower-supernode", ["--clientappio-api-address", "0.0.0.0:9094"])  # pre-1.2x flag
    assert _check_command("flower-supernode", ["--isolation", "threads"])
    assert _check_command("flower-superlink", ["--port"])
    assert _check_command("flower-superlink", ["--fleet-api-address", "0.0.0.0:9092"])  # deprecated in 1.41
    assert _check_command("flower-superexec", ["--insecure", "serverapp"])


def _supernodes(services: dict) -> dict[str, dict]:
    return {name: svc for name, svc in services.items() if _executable(svc) == "flower-supernode"}


def test_node_configs_parse_and_name_existing_profiles():
    for services in (_compose("docker-compose.yml")["services"], _merged_services()):
        nodes = _supernodes(services)
        assert len(nodes) >= 3
        configs = {name: parse_config_args([_option(svc["command"], "--node-config")]) for name, svc in nodes.items()}
        assert sorted(c["partition-id"] for c in configs.values()) == list(range(len(nodes)))
        assert {c["num-partitions"] for c in configs.values()} == {len(nodes)}
        profiles = {p.stem for p in PROFILES_DIR.glob("*.toml")}
        for name, config in configs.items():
            assert config["profile"] in profiles, f"{name}: unknown profile {config['profile']!r}"
        assert len({c["profile"] for c in configs.values()}) >= 3, "a heterogeneous federation"


def test_the_undersized_fifth_node_and_the_four_state_one_num_partitions():
    """CI's compose run adds scripts/compose/undersized-node.yml with FL_NUM_PARTITIONS=5, as
    scripts/compose_federation.py sets it: the server leaves out a node stating another split."""
    env = {"FL_NUM_PARTITIONS": "5"}
    services = {**_compose("docker-compose.yml", env)["services"],
                **_compose("scripts/compose/undersized-node.yml", env)["services"]}
    nodes = [svc for svc in services.values() if str(svc.get("image", "")).startswith("flwr/supernode")]
    configs = [parse_config_args([_option(svc["command"], "--node-config")]) for svc in nodes]
    assert sorted(c["partition-id"] for c in configs) == list(range(5))
    assert {c["num-partitions"] for c in configs} == {5}


def _mib(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)b?", str(text).strip().lower())
    assert match, f"unreadable memory size {text!r}"
    return float(match.group(1)) * {"k": 1 / 1024, "m": 1, "g": 1024, "": 1 / 2**20}[match.group(2)]


def test_each_device_container_is_limited_as_its_profile_says():
    compose = _compose("docker-compose.yml")
    services, emu = compose["services"], compose["x-device-emulation"]
    nodes = _supernodes(services)
    runners = {name: svc for name, svc in services.items() if _executable(svc) == "flower-superexec"
               and str(_option(svc["command"], "--runtime-api-address")).split(":")[0] in nodes}
    assert len(runners) == len(nodes), "every SuperNode needs its own ClientApp SuperExec"
    for name, svc in runners.items():
        node = str(_option(svc["command"], "--runtime-api-address")).split(":")[0]
        node_cmd = nodes[node]["command"]
        port = str(_option(node_cmd, "--port") or "9094")
        assert str(_option(svc["command"], "--runtime-api-address")) == f"{node}:{port}"
        assert _option(node_cmd, "--isolation") == "process", f"{node} must leave its ClientApps to {name}"
        config = parse_config_args([_option(node_cmd, "--node-config")])
        profile = tomllib.loads((PROFILES_DIR / f"{config['profile']}.toml").read_text())
        cpus = min(emu["max-cpus"], max(emu["min-cpus"], profile["gflops"] / emu["host-gflops-per-cpu"]))
        assert float(svc["cpus"]) == pytest.approx(cpus, abs=0.01), f"{name} ({config['profile']})"
        memory = profile["memory_mb"] + emu["runtime-overhead-mb"]
        assert _mib(svc["mem_limit"]) == pytest.approx(memory, abs=1), f"{name} ({config['profile']})"
        assert _mib(svc.get("memswap_limit", "0")) == _mib(svc["mem_limit"]), f"{name}: no swap beyond the device"
        mounts = {str(v).split(":")[-2] if str(v).count(":") >= 2 else str(v).split(":")[-1]
                  for v in svc.get("volumes", [])}
        assert config.get("data-dir") in mounts, f"{name}: data-dir {config.get('data-dir')} is not mounted"
    server = [s for s in services.values() if _executable(s) == "flower-superexec"
              and _option(s["command"], "--runtime-api-address").split(":")[0] not in nodes]
    assert len(server) == 1, "one SuperExec for the ServerApp"
    link = [n for n, s in services.items() if _executable(s) == "flower-superlink"]
    assert _option(server[0]["command"], "--runtime-api-address") == \
        f"{link[0]}:{_option(services[link[0]]['command'], '--port')}"
    assert all(str(p).startswith("127.0.0.1:") for p in services[link[0]].get("ports", [])), \
        "publish the SuperLink on loopback only"


@pytest.mark.parametrize("variant", ["docker-compose.yml", "with docker-compose.tls.yml"])
def test_compose_devices_reach_the_fleet_api_only_and_the_server_side_is_memory_limited(variant):
    """The SuperNodes (the devices) share no network with the SuperLink: they dial the nginx Fleet proxy,
    whose config forwards /v1/fleet/ only; the SuperLink's port is published on loopback only, and it
    installs nothing at run time; the SuperLink, the ServerApp and the proxy have memory limits."""
    services = _compose("docker-compose.yml")["services"] if variant == "docker-compose.yml" else _merged_services()
    link = next(n for n, s in services.items() if _executable(s) == "flower-superlink")
    proxy = next(n for n, s in services.items() if _executable(s) == "nginx")
    link_nets = set(services[link]["networks"])
    for name, svc in _supernodes(services).items():
        assert not link_nets & set(svc["networks"]), f"{name} shares a network with the SuperLink"
        assert _option(svc["command"], "--superlink") == f"{proxy}:8000", name
    assert link_nets & set(services[proxy]["networks"])
    conf = Path(_option(services[proxy]["command"], "-c")).name
    assert "include fleet-only.conf;" in (REPO / "deploy" / "nginx" / conf).read_text()
    assert ("./deploy/nginx:/etc/nginx/fl-app:ro") in services[proxy]["volumes"]
    assert all(str(p).startswith("127.0.0.1:") for p in services[link].get("ports", []))
    assert "--disable-runtime-dependency-installation" in services[link]["command"]
    server = [n for n, s in services.items() if _executable(s) == "flower-superexec"
              and str(_option(s["command"], "--runtime-api-address")).startswith(f"{link}:")]
    for name in [link, proxy, *server]:
        assert _mib(services[name]["mem_limit"]) > 0 and services[name]["memswap_limit"] == services[name]["mem_limit"]


def test_the_tls_variant_secures_every_link_and_authenticates_every_supernode():
    services = _merged_services()
    link = next(s for s in services.values() if _executable(s) == "flower-superlink")
    assert "--insecure" not in link["command"] and "--enable-supernode-auth" in link["command"]
    mounted = {str(v).split(":")[1]: str(v).split(":")[0] for v in link["volumes"]}
    for flag in ("--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile"):
        assert _option(link["command"], flag) in mounted, flag
    keys = set()
    for name, svc in services.items():
        cmd = [str(c) for c in svc["command"]]
        mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in svc.get("volumes", [])
                  if str(v).startswith("./deploy/certs/")}
        if _executable(svc) == "flower-supernode":
            assert "--insecure" not in cmd and _option(cmd, "--root-certificates") in mounts, name
            key = mounts[_option(cmd, "--auth-supernode-private-key")]
            keys.add(key)
            assert all(not m.endswith(".key") or m == key for m in mounts.values()), f"{name} sees other keys"
        elif _executable(svc) == "flower-superexec" and _option(cmd, "--runtime-api-address").startswith("superlink"):
            assert "--insecure" not in cmd and _option(cmd, "--root-certificates") in mounts, name
    assert len(keys) == len(_supernodes(services)), "one key per SuperNode"


def test_the_raspberry_pi_service_starts_a_supernode_flwr_accepts():
    unit = (REPO / "deploy" / "raspberry-pi" / "flower-supernode.service").read_text()
    exec_start = re.search(r"^ExecStart=((?:.*\\\n)*.*)$", unit, re.M).group(1).replace("\\\n", " ")
    argv = shlex.split(exec_start)
    assert argv[0].endswith("/flower-supernode")
    assert _check_command("flower-supernode", argv[1:]) == []
    assert "--insecure" not in argv and _option(argv, "--root-certificates")
    assert _option(argv, "--auth-supernode-private-key")
    config = parse_config_args([_option(argv, "--node-config")])
    assert {"partition-id", "num-partitions", "profile", "data-dir"} <= set(config)
    assert re.search(r"^Restart=(always|on-failure)$", unit, re.M)


def test_compose_restarts_supernodes_that_exit_cleanly():
    """After a SuperLink restart a SuperNode is refused its old node id and exits with status 0
    (tests/test_fault_suite.py relies on restarting it): `on-failure` would leave it down."""
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    nodes = {name: s for name, s in services.items() if name.startswith("supernode-")}
    assert nodes and all(s.get("restart") in ("always", "unless-stopped") for s in nodes.values())


@pytest.mark.parametrize("installed, plugin_answers, expected", [
    ({"docker-compose", "docker"}, True, ["docker-compose"]),
    ({"docker"}, True, ["docker", "compose"]),
    ({"docker"}, False, ["docker-compose"]),  # a bare docker client: Compose v1 gets installed, not used blind
    (set(), False, ["docker-compose"]),
])
def test_the_compose_command_is_one_that_answers_or_the_one_to_install(monkeypatch, installed, plugin_answers,
                                                                         expected):
    """A machine with only a `docker` client (no compose plugin) once made the CI run `docker compose -p ...`,
    which that client reads as an unknown flag, after installing Compose v1 it then did not use."""
    import scripts.compose_federation as cf
    monkeypatch.setattr(cf.shutil, "which", lambda name: f"/usr/bin/{name}" if name in installed else None)
    monkeypatch.setattr(cf.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0 if plugin_answers
                                                                                            else 1, "", ""))
    assert cf.pick_compose(None) == expected
    assert cf.pick_compose(["podman-compose"]) == ["podman-compose"]
