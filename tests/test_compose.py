"""compose.yaml and the Dockerfile agree with the code (no Docker engine needed).

The services, their modules, ports and environment variables come from the project's
own modules; every CDP_* variable compose.yaml sets must be one the code reads.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.util
import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml
from typer.testing import CliRunner

from ops.cli.main import app as cli_app
from ops.platform import INSTANCE_PORT_STEP, instance_ids, parse_instances
from ops.security import granted_consumers, instance_durable, permissions
from shared.config import (
    DEFAULT_PORTS,
    SERVICES,
    load_settings,
    nats_servers,
    port_variable,
    replicas,
)

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
README = ROOT / "README.md"
NATS = "nats"
LOOPBACK = "127.0.0.1"
CDP_VARIABLE = re.compile(r"CDP_[A-Z_]+")


@functools.cache
def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "compose.yaml is not a mapping"
    return data


def _services() -> dict[str, Any]:
    services = _compose().get("services")
    assert isinstance(services, dict), "compose.yaml has no services"
    return services


def _service(name: str) -> dict[str, Any]:
    service = _services().get(name)
    assert isinstance(service, dict), f"compose.yaml has no service {name!r}"
    return service


def _environment(name: str) -> dict[str, str]:
    """The environment of a compose service, from either the mapping or the list form."""
    raw = _service(name).get("environment") or {}
    if isinstance(raw, list):
        pairs = (str(item).partition("=") for item in raw)
        return {key: value for key, _, value in pairs}
    assert isinstance(raw, dict), f"{name}: environment is neither a list nor a mapping"
    return {str(key): "" if value is None else str(value) for key, value in raw.items()}


def _published(name: str) -> list[tuple[str, str, str]]:
    """(host ip, host port, container port) of each published port of a compose service."""
    result = []
    for entry in _service(name).get("ports") or []:
        if isinstance(entry, dict):
            result.append(
                (
                    str(entry.get("host_ip", "")),
                    str(entry.get("published", "")),
                    str(entry.get("target", "")),
                )
            )
            continue
        spec = str(entry).split("/", 1)[0]
        parts = spec.rsplit(":", 2)
        if len(parts) == 3:
            result.append((parts[0], parts[1], parts[2]))
        elif len(parts) == 2:
            result.append(("", parts[0], parts[1]))
        else:
            result.append(("", "", parts[0]))
    return result


def _healthcheck_text(name: str) -> str:
    healthcheck = _service(name).get("healthcheck")
    assert isinstance(healthcheck, dict), f"{name}: no healthcheck"
    assert not healthcheck.get("disable"), f"{name}: healthcheck disabled"
    test = healthcheck.get("test")
    assert test, f"{name}: healthcheck has no test"
    return " ".join(test) if isinstance(test, list) else str(test)


def _command(name: str) -> list[str]:
    command = _service(name).get("command")
    if isinstance(command, str):
        return shlex.split(command)
    assert isinstance(command, list), f"{name}: no command"
    return [str(part) for part in command]


def _volume_mounts(name: str) -> dict[str, str]:
    """Container path -> volume source of each mount of a compose service."""
    mounts = {}
    for entry in _service(name).get("volumes") or []:
        if isinstance(entry, dict):
            mounts[str(entry.get("target", ""))] = str(entry.get("source", ""))
        else:
            source, _, rest = str(entry).partition(":")
            mounts[rest.split(":", 1)[0]] = source
    return mounts


@functools.cache
def _variables_read_by_code() -> frozenset[str]:
    names = {port_variable(service) for service in SERVICES}
    for package in ("shared", "services", "ops"):
        for path in (ROOT / package).rglob("*.py"):
            names.update(CDP_VARIABLE.findall(path.read_text(encoding="utf-8")))
    return frozenset(names)


# -- compose.yaml --------------------------------------------------------------------------
def test_every_service_has_a_container() -> None:
    missing = [name for name in SERVICES if name not in _services()]
    assert not missing, f"compose.yaml lacks services {missing}"


def test_each_service_runs_its_own_module() -> None:
    for name in SERVICES:
        module = f"services.{name}"
        assert _command(name) == ["python", "-m", module], name
        assert importlib.util.find_spec(f"{module}.__main__") is not None, module


def test_each_service_uses_its_default_port() -> None:
    for name in SERVICES:
        port = str(DEFAULT_PORTS[name])
        env = _environment(name)
        assert env.get(port_variable(name)) == port, f"{name}: {port_variable(name)}"
        published = _published(name)
        assert any(host == port and target == port for _, host, target in published), (
            f"{name}: port {port} is not published as {port}:{port}: {published}"
        )
        assert f"http://{LOOPBACK}:{port}/healthz" in _healthcheck_text(name), (
            f"{name}: healthcheck does not probe port {port}"
        )


def test_services_listen_on_every_interface_of_the_container() -> None:
    for name in SERVICES:
        assert _environment(name).get("CDP_BIND") == "0.0.0.0", name


def test_only_variables_the_code_reads() -> None:
    known = _variables_read_by_code()
    for name in _services():
        unknown = sorted(
            key for key in _environment(name) if key.startswith("CDP_") and key not in known
        )
        assert not unknown, f"{name}: the code reads no {unknown}"
    mentioned = set(CDP_VARIABLE.findall(COMPOSE.read_text(encoding="utf-8")))
    assert mentioned <= known, f"compose.yaml names {sorted(mentioned - known)}"


def test_services_reach_nats_by_its_service_name() -> None:
    assert NATS in _services()
    for name in SERVICES:
        url = urlparse(_environment(name).get("CDP_NATS_URL", ""))
        assert url.scheme == "nats", f"{name}: CDP_NATS_URL {url.geturl()!r}"
        assert url.hostname == NATS, f"{name}: CDP_NATS_URL does not name the nats service"
        assert url.port in (None, 4222), f"{name}: CDP_NATS_URL port {url.port}"


def test_services_wait_for_a_healthy_nats() -> None:
    for name in SERVICES:
        depends_on = _service(name).get("depends_on")
        assert isinstance(depends_on, dict), f"{name}: depends_on must name a condition"
        assert NATS in depends_on, f"{name}: does not depend on nats"
        assert depends_on[NATS].get("condition") == "service_healthy", name


def test_nats_runs_jetstream_on_a_volume() -> None:
    command = _command(NATS)
    assert "-js" in command or "--jetstream" in command, command
    flag = "-sd" if "-sd" in command else "--store_dir"
    assert flag in command, f"nats: no JetStream store directory in {command}"
    store = command[command.index(flag) + 1]
    mounts = _volume_mounts(NATS)
    assert store in mounts, f"nats: store {store} is not on a volume"
    assert mounts[store] in (_compose().get("volumes") or {}), "nats: volume is not declared"
    assert "js-enabled-only" in _healthcheck_text(NATS)


def test_each_service_keeps_its_data_on_its_own_volume() -> None:
    declared = _compose().get("volumes") or {}
    sources = []
    for name in SERVICES:
        data_dir = _environment(name).get("CDP_DATA_DIR", "")
        mounts = _volume_mounts(name)
        assert data_dir in mounts, f"{name}: CDP_DATA_DIR {data_dir!r} is not a mount"
        assert mounts[data_dir] in declared, f"{name}: volume {mounts[data_dir]} undeclared"
        sources.append(mounts[data_dir])
    assert len(set(sources)) == len(sources), f"services share volumes: {sources}"


def _one_shot(name: str) -> bool:
    """A job that runs once before the others (compose waits for it to complete)."""
    return str(_service(name).get("restart", "")) == "no"


def test_every_long_running_container_has_a_healthcheck() -> None:
    for name in _services():
        if not _one_shot(name):
            assert _healthcheck_text(name), name


# -- locked down ------------------------------------------------------------------------------
SECRETS = "secrets"


def _cli_command(name: str) -> list[str]:
    command = _command(name)
    assert command[0] == "cdp", f"{name}: not a cdp command: {command}"
    return command[1:]


def test_credentials_are_made_once_before_nats_starts() -> None:
    assert _one_shot(SECRETS)
    args = _cli_command(SECRETS)
    assert args[0] == "secrets"
    # The command and its options exist in the CLI, with these meanings.
    result = CliRunner().invoke(cli_app, ["secrets", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--dir", "--nats-config"):
        assert option in args and option in result.output, option
    folder = args[args.index("--dir") + 1]
    conf = args[args.index("--nats-config") + 1]
    assert Path(conf).parent == Path(folder)
    assert _volume_mounts(SECRETS).get(folder) == SECRETS
    nats = _service(NATS)
    assert nats["depends_on"][SECRETS]["condition"] == "service_completed_successfully"
    command = _command(NATS)
    assert command[command.index("-c") + 1] == conf, "nats-server does not load the keys"
    assert _volume_mounts(NATS).get(folder) == SECRETS
    assert SECRETS in (_compose().get("volumes") or {})
    assert "/secrets" in DOCKERFILE.read_text(encoding="utf-8"), "volume owner not set"


def test_each_service_connects_with_its_own_key_read_only() -> None:
    folder = _cli_command(SECRETS)[_cli_command(SECRETS).index("--dir") + 1]
    for name in SERVICES:
        assert _environment(name).get("CDP_NATS_NKEY") == f"{folder}/{name}.nk", name
        mounts = [str(m) for m in _service(name).get("volumes") or []]
        own = f"{SECRETS}-{name}"
        assert f"{own}:{folder}:ro" in mounts, f"{name}: its seed not mounted read-only"
        depends_on = _service(name).get("depends_on") or {}
        assert depends_on[SECRETS]["condition"] == "service_completed_successfully", name


def test_each_service_mounts_only_its_own_seed_and_never_the_admin_seed() -> None:
    """Before, every service container mounted the whole secrets volume, admin.nk included."""
    args = _cli_command(SECRETS)
    folder = args[args.index("--dir") + 1]
    assert "--per-service" in args, "the secrets job does not split the seeds"
    assert "--per-service" in CliRunner().invoke(cli_app, ["secrets", "--help"]).output
    declared = _compose().get("volumes") or {}
    writer = _volume_mounts(SECRETS)
    for name in SERVICES:
        own = f"{SECRETS}-{name}"
        assert own in declared, f"{own} undeclared"
        # The secrets job writes <folder>/<service>/<service>.nk into that volume.
        assert writer.get(f"{folder}/{name}") == own, f"secrets job does not fill {own}"
        volumes = set(_volume_mounts(name).values())
        seeds = {v for v in volumes if v.startswith(SECRETS)}
        assert seeds == {own}, f"{name} mounts seeds {sorted(seeds)}"
        assert "admin.nk" not in json.dumps(_service(name)), name


def test_streams_are_created_once_with_the_admin_key_before_the_services_start() -> None:
    setup = "setup"
    assert _one_shot(setup)
    assert _cli_command(setup) == ["setup"]
    assert CliRunner().invoke(cli_app, ["setup", "--help"]).exit_code == 0
    folder = _cli_command(SECRETS)[_cli_command(SECRETS).index("--dir") + 1]
    assert _environment(setup).get("CDP_NATS_NKEY") == f"{folder}/admin.nk"
    assert _volume_mounts(setup).get(folder) == SECRETS
    assert _service(setup)["depends_on"][NATS]["condition"] == "service_healthy"
    for name in SERVICES:
        depends_on = _service(name).get("depends_on") or {}
        assert depends_on[setup]["condition"] == "service_completed_successfully", name


def test_ports_are_published_on_loopback_only() -> None:
    for name in _services():
        for host_ip, host, target in _published(name):
            assert host_ip == LOOPBACK, f"{name}: {host}:{target} is published on {host_ip!r}"


# -- Dockerfile ----------------------------------------------------------------------------
def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each Dockerfile line, continuations joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, arguments = full.partition(" ")
        result.append((keyword.upper(), arguments.strip()))
    return result


def _copy_sources() -> list[str]:
    sources = []
    for keyword, arguments in _instructions():
        if keyword not in ("COPY", "ADD"):
            continue
        words = (
            [str(word) for word in json.loads(arguments)]
            if arguments.startswith("[")
            else arguments.split()
        )
        if any(word.startswith("--from") for word in words):
            continue
        paths = [word for word in words if not word.startswith("--")]
        assert len(paths) >= 2, f"{keyword} {arguments}: needs a source and a destination"
        sources.extend(paths[:-1])
    return sources


def test_dockerfile_installs_the_project() -> None:
    assert DOCKERFILE.read_text(encoding="utf-8").count("pip install") >= 1
    assert any(keyword == "USER" for keyword, _ in _instructions()), "image runs as root"


def test_dockerfile_copies_files_that_exist() -> None:
    sources = _copy_sources()
    assert sources, "the Dockerfile copies nothing"
    ignored = []
    if DOCKERIGNORE.exists():
        lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        ignored = [
            line.strip().strip("/") for line in lines if line.strip() and line[0] not in "#!"
        ]
    for source in sources:
        relative = source.strip("/") or "."
        matches = list(ROOT.glob(relative)) if any(c in relative for c in "*?[") else []
        assert matches or (ROOT / relative).exists(), f"the Dockerfile copies missing {source}"
        excluded = [pattern for pattern in ignored if fnmatch.fnmatch(relative, pattern)]
        assert not excluded, f".dockerignore excludes {source} ({excluded})"


# -- the web console -----------------------------------------------------------------------
CONSOLE = "console"


def test_the_console_runs_with_its_own_read_only_key_and_asks_for_a_login() -> None:
    args = _cli_command(CONSOLE)
    assert args[0] == "console"
    help_text = CliRunner().invoke(cli_app, ["console", "--help"]).output
    assert "--data-dir" in args and "--data-dir" in help_text
    assert "--admin" not in args, "the console in compose is read-only"
    env = _environment(CONSOLE)
    folder = _cli_command(SECRETS)[_cli_command(SECRETS).index("--dir") + 1]
    assert env.get("CDP_CONSOLE_NKEY") == f"{folder}/console.nk"
    assert env.get("CDP_BIND") == "0.0.0.0", "off loopback: every page needs the login token"
    assert urlparse(env.get("CDP_NATS_URL", "")).hostname == NATS
    port = env.get("CDP_CONSOLE_PORT", "")
    assert (LOOPBACK, port, port) in _published(CONSOLE)
    assert f"http://{LOOPBACK}:{port}/healthz" in _healthcheck_text(CONSOLE)
    # Only its own seed, written by the secrets job into a volume of its own.
    own = f"{SECRETS}-{CONSOLE}"
    assert f"{own}:{folder}:ro" in [str(m) for m in _service(CONSOLE).get("volumes") or []]
    assert _volume_mounts(SECRETS).get(f"{folder}/{CONSOLE}") == own
    seeds = {v for v in _volume_mounts(CONSOLE).values() if v.startswith(SECRETS)}
    assert seeds == {own}
    assert "admin.nk" not in json.dumps(_service(CONSOLE))
    data = env.get("CDP_DATA_DIR", "")
    assert _volume_mounts(CONSOLE).get(data) in (_compose().get("volumes") or {})
    depends_on = _service(CONSOLE).get("depends_on") or {}
    assert depends_on[NATS]["condition"] == "service_healthy"


# -- the cluster profile (compose.cluster.yaml, laid over compose.yaml) ------------------------
CLUSTER = ROOT / "compose.cluster.yaml"
NODES = (NATS, "nats-2", "nats-3")


@functools.cache
def _overlay() -> dict[str, Any]:
    data = yaml.safe_load(CLUSTER.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "compose.cluster.yaml is not a mapping"
    return data


def _by_target(entries: list[Any]) -> dict[str, Any]:
    return {str(e).split(":")[1] if ":" in str(e) else str(e): e for e in entries}


def _laid_over(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """A service of compose.yaml with the overlay's as `docker compose -f a -f b` merges
    them: mappings (environment, depends_on) by key, volumes by container path, ports
    added, anything else replaced."""
    out = dict(base)
    for key, value in over.items():
        if key in ("environment", "depends_on", "healthcheck") and isinstance(base.get(key), dict):
            out[key] = {**base[key], **value}
        elif key == "volumes":
            out[key] = list({**_by_target(base.get(key, [])), **_by_target(value)}.values())
        elif key == "ports":
            out[key] = [*base.get(key, []), *value]
        else:
            out[key] = value
    return out


def _cluster_service(name: str) -> dict[str, Any]:
    over = (_overlay().get("services") or {}).get(name)
    base = _services().get(name)
    assert isinstance(over, dict) or isinstance(base, dict), f"no service {name!r}"
    if not isinstance(over, dict):
        assert isinstance(base, dict)
        return base
    return _laid_over(base, over) if isinstance(base, dict) else over


def _flag(command: list[str], flag: str) -> str:
    assert flag in command, f"{flag} not in {command}"
    return command[command.index(flag) + 1]


def test_the_cluster_overlay_changes_only_services_of_compose_yaml_and_adds_nodes() -> None:
    added = set(_overlay()["services"]) - set(_services())
    assert added == {*NODES[1:], *REPLICAS}, added
    assert CLUSTER.name in README.read_text(encoding="utf-8"), "the README does not say how"


def test_the_cluster_runs_three_nodes_of_one_cluster_with_the_same_accounts() -> None:
    declared = {**(_compose().get("volumes") or {}), **(_overlay().get("volumes") or {})}
    single = _command(NATS)
    stores, names, hosts = set(), set(), set()
    for node in NODES:
        service = _cluster_service(node)
        command = [str(part) for part in service["command"]]
        assert "-js" in command, node
        assert _flag(command, "-c") == _flag(single, "-c"), f"{node}: other accounts"
        mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in service.get("volumes") or []}
        store = _flag(command, "-sd")
        assert mounts.get(store) in declared, f"{node}: JetStream not on a declared volume"
        assert mounts.get(str(Path(_flag(single, "-c")).parent)) == SECRETS, node
        stores.add(mounts[store])
        names.add(_flag(command, "--server_name"))
        assert _flag(command, "--cluster_name") == "cdp", node
        listen = urlparse(_flag(command, "--cluster"))
        routes = [urlparse(r) for r in _flag(command, "--routes").split(",")]
        assert {r.hostname for r in routes} == set(NODES) - {node}, f"{node}: routes {routes}"
        assert {r.port for r in routes} == {listen.port}, node
        assert service["depends_on"][SECRETS]["condition"] == "service_completed_successfully"
        health = " ".join(service["healthcheck"]["test"])
        assert "/healthz" in health and "js-enabled-only" not in health, node
        for host_ip, host, _target in [
            (h, p, t) for h, p, t in (str(e).rsplit(":", 2) for e in service.get("ports") or [])
        ]:
            assert host_ip == LOOPBACK, f"{node}: published on {host_ip}"
            assert host not in hosts, f"{node}: host port {host} published twice"
            hosts.add(host)
    assert len(stores) == len(names) == len(NODES), (stores, names)


def test_the_cluster_services_are_given_every_node_and_three_copies() -> None:
    known = _variables_read_by_code()
    mentioned = set(CDP_VARIABLE.findall(CLUSTER.read_text(encoding="utf-8")))
    assert mentioned <= known, f"compose.cluster.yaml names {sorted(mentioned - known)}"
    for name in (*SERVICES, *REPLICAS, "setup", CONSOLE):
        env = _cluster_service(name)["environment"]
        servers = [urlparse(u) for u in nats_servers(env["CDP_NATS_URL"])]
        assert [u.hostname for u in servers] == list(NODES), f"{name}: {servers}"
        assert {u.port for u in servers} == {4222}, name
    setup = _cluster_service("setup")
    assert replicas(setup["environment"]) == len(NODES)
    for node in NODES:
        assert setup["depends_on"][node]["condition"] == "service_healthy", node
    for name in (*SERVICES, *REPLICAS):
        assert replicas(_cluster_service(name)["environment"]) == len(NODES), name
        assert _cluster_service(name)["depends_on"]["setup"]["condition"] == (
            "service_completed_successfully"
        )
        for node in NODES:
            assert _cluster_service(name)["depends_on"][node]["condition"] == "service_healthy"


REPLICAS = {f"{name}-2": name for name in SERVICES}
"""The second container of each service in the cluster profile."""


def test_the_cluster_runs_two_instances_of_every_service() -> None:
    """`<service>` is instance `<service>-1`, `<service>-2` the second: the same module,
    the same key, their own instance id, data volume and port (+ 100, as `cdp up
    --instances` gives it), published on loopback; nothing else differs."""
    declared = {**(_compose().get("volumes") or {}), **(_overlay().get("volumes") or {})}
    data_volumes = set()
    for replica, name in REPLICAS.items():
        first, second = _cluster_service(name), _cluster_service(replica)
        one, two = first["environment"], second["environment"]
        assert one["CDP_INSTANCE"] == f"{name}-1", name
        assert two["CDP_INSTANCE"] == replica, replica
        assert load_settings(name, {"CDP_INSTANCE": two["CDP_INSTANCE"]}).instance_id == replica
        assert second["command"] == first["command"], replica
        assert two["CDP_NATS_NKEY"] == one["CDP_NATS_NKEY"], replica
        port = DEFAULT_PORTS[name] + INSTANCE_PORT_STEP
        assert two[port_variable(name)] == str(port), replica
        assert (LOOPBACK, str(port), str(port)) in [
            tuple(str(e).rsplit(":", 2)) for e in second["ports"]
        ], replica
        assert str(port) in " ".join(second["healthcheck"]["test"]), replica
        differs = {k for k in {*one, *two} if one.get(k) != two.get(k)}
        assert differs <= {"CDP_INSTANCE", port_variable(name)}, (replica, differs)
        mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in second["volumes"]}
        firsts = {str(v).split(":")[1]: str(v).split(":")[0] for v in first["volumes"]}
        assert mounts["/secrets"] == firsts["/secrets"] == f"secrets-{name}", replica
        assert mounts[two["CDP_DATA_DIR"]] in declared, replica
        data_volumes |= {mounts[two["CDP_DATA_DIR"]], firsts[one["CDP_DATA_DIR"]]}
    assert len(data_volumes) == 2 * len(SERVICES), data_volumes


def test_the_cluster_grants_every_instance_its_durables() -> None:
    """The `secrets` job writes the server configuration for the instances the cluster
    runs (`cdp secrets --instances`), and every instance's durables are in it."""
    command = [str(part) for part in _cluster_service(SECRETS)["command"]]
    counts = parse_instances(_flag(command, "--instances"))
    running: dict[str, int] = {}
    for name in (*SERVICES, *REPLICAS):
        service = REPLICAS.get(name, name)
        running[service] = running.get(service, 0) + 1
    assert counts == running
    for name, count in counts.items():
        granted = " ".join(permissions(name, instances=instance_ids(name, count)).publish)
        for _stream, durable in granted_consumers()[name]:
            for instance in instance_ids(name, count):
                assert f".{instance_durable(name, durable, instance)}" in granted, instance
