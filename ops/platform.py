"""The one way to bring the platform up, for `cdp up`, the tests and the benchmark.

    async with Platform(data_dir) as p:           # nats-server, streams, six processes
        ...
    async with Platform(data_dir, nats_url=url, in_process=True) as p:
        p.services["profile"]                     # the service objects, in this process

`start()` starts nats-server (unless `nats_url` names one; with `cluster=3`, three nodes
routed to each other) with the credentials of every key when `secure`, creates the
streams and the batch-file bucket with the admin key (on a cluster, kept by `replicas`
nodes),
starts the services (as OS processes under the supervisor, or in this process), and waits
until every one answers 200 on /readyz. `stop()` stops them in reverse, then nats-server;
it is idempotent, and `start()` stops what it started before raising.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Self

import aiohttp
import msgspec
import nats
from nats.aio.client import Client

from ops.natsd import NatsCluster, NatsServer, NatsWatchdog, free_port, port_taken
from ops.security import (
    ADMIN,
    activation_subjects,
    app_names,
    ensure_credentials,
    seed_path,
    server_authorization,
    token_file,
)
from ops.supervisor import ProcessSpec, Supervisor
from shared.config import SERVICES, load_settings, nats_servers, port_variable
from shared.config import replicas as replicas_setting
from shared.errors import CdpError
from shared.runtime import Service
from shared.runtime.coordination import bucket_ttls, ensure_buckets
from shared.runtime.snapshots import ensure_snapshot_buckets
from shared.streams import ensure_streams
from shared.subjects import ALL_STREAMS, StreamSpec, inbox_prefix

PROFILE_TOKEN_FILE = "profile.token"


class PlatformError(CdpError):
    code = "platform"


class PortsTaken(PlatformError):
    """Another process listens where the platform would: nothing was started."""

    def __init__(self, taken: list[str]) -> None:
        super().__init__(f"in use by another process: {', '.join(taken)}")
        self.taken = taken


class NotReady(PlatformError):
    """Some services did not answer 200 on /readyz in time (the platform was stopped)."""

    def __init__(self, states: dict[str, str]) -> None:
        super().__init__(f"services not ready: {states}")
        self.states = states


def service_class(name: str) -> type[Service]:
    """The service class `services.<name>.service` defines (its `name` is `name`)."""
    module = importlib.import_module(f"services.{name}.service")
    found = [
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, Service)
        and value.__module__ == module.__name__
        and value.name == name
    ]
    if len(found) != 1:
        raise PlatformError(f"services.{name}.service defines {len(found)} services named {name}")
    return found[0]


def profile_token(secrets: Path) -> tuple[str, Path | None]:
    """The bearer token of `GET /v1/profiles`: CDP_PROFILE_TOKEN when given, else the one in
    `<secrets>/profile.token`, written (0600) at first start."""
    return token_file(secrets, PROFILE_TOKEN_FILE, "CDP_PROFILE_TOKEN")


def probe_host(bind: str) -> str:
    return "127.0.0.1" if bind in ("0.0.0.0", "::", "") else bind


def health_urls(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Each service's HTTP address as the environment configures it."""
    urls = {}
    for name in SERVICES:
        s = load_settings(name, env)
        urls[name] = f"http://{probe_host(s.bind)}:{s.port}"
    return urls


async def readiness(
    session: aiohttp.ClientSession, base: str, timeout: float = 2.0
) -> tuple[bool, str]:
    try:
        async with session.get(
            f"{base}/readyz", timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            body = await resp.json(content_type=None)
            if resp.status == 200:
                return True, "ready"
            return False, str(body.get("reason", resp.status))
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        return False, f"unreachable ({type(exc).__name__})"


async def wait_ready(urls: Mapping[str, str], timeout: float) -> dict[str, tuple[bool, str]]:
    """Poll every /readyz until all answer 200 or `timeout` passes; each one's state."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            states = dict(
                zip(
                    urls,
                    await asyncio.gather(*(readiness(session, u) for u in urls.values())),
                    strict=True,
                )
            )
            if all(ok for ok, _ in states.values()) or time.monotonic() > deadline:
                return states
            await asyncio.sleep(0.1)


def ports_taken(
    nats_port: int | Sequence[int] | None,
    env: Mapping[str, str] | None = None,
    services: Sequence[str] = SERVICES,
) -> list[str]:
    """What the platform would listen on that another process holds: its NATS ports (None:
    an external server; several: the nodes of a cluster, client and route ports) and every
    service's HTTP port (0: any)."""
    wanted: list[tuple[str, int, str]] = []
    if isinstance(nats_port, int):
        wanted.append(("127.0.0.1", nats_port, "NATS"))
    elif nats_port is not None:
        wanted += [("127.0.0.1", p, "NATS") for p in nats_port]
    for name in services:
        settings = load_settings(name, env)
        if settings.port:
            wanted.append((probe_host(settings.bind), settings.port, f"the {name} service"))
    return [
        f"port {port} on {host} ({what})" for host, port, what in wanted if port_taken(host, port)
    ]


class Platform:
    """nats-server, the streams and the services, up until `stop()`.

    - `nats_url`: a running server to use (several, comma-separated: a cluster's nodes;
      none: start one on `nats_port`, or a free port, storing under `<data_dir>/nats`);
      `setup_seed`: the seed file (and inbox prefix) that creates the streams on a given
      server.
    - `cluster`: start that many nodes instead, routed to each other (client ports from
      `nats_port` up, route ports from `route_port` up, or free ones; JetStream under
      `<data_dir>/nats-cluster/cdp-<n>`); `replicas`: how many nodes keep each stream and
      bucket (default: CDP_REPLICAS for a given server, else the cluster's size, 3 at most).
    - `secure`: as `cdp up` runs it: an embedded server admits only the keys of
      `<data_dir>/secrets` (made if missing), each service connecting with its own; the
      profile lookup over HTTP takes the bearer token of `profile_token`.
    - `ports`: each service's HTTP port (none: free ones; in process: any).
    - `env`: environment of every service (processes also inherit this process's; in
      process, settings are read from this alone, then `settings` replaces fields).
    - `watch_nats`: keep an embedded nats-server running (see NatsWatchdog), telling what
      happens to this callback; `on_event`: the supervisor's (service, what happened).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        nats_url: str | None = None,
        nats_port: int | None = None,
        setup_seed: tuple[Path | None, str] | None = None,
        in_process: bool = False,
        services: Sequence[str] = SERVICES,
        secure: bool = False,
        ports: Mapping[str, int] | None = None,
        env: Mapping[str, str] | None = None,
        settings: Mapping[str, object] | None = None,
        watch_nats: Callable[[str], None] | None = None,
        on_event: Callable[[str, str], None] | None = None,
        backoff_initial: float = 0.5,
        ready_timeout: float = 60.0,
        streams: Sequence[StreamSpec] = ALL_STREAMS,
        cluster: int = 1,
        route_port: int | None = None,
        replicas: int | None = None,
    ) -> None:
        if settings and not in_process:
            raise PlatformError("settings replace fields of in-process services only")
        if cluster < 1 or (cluster > 1 and nats_url):
            raise PlatformError("a cluster of at least one node, and only an embedded one")
        self.data_dir = data_dir.resolve()
        self.logs = self.data_dir / "logs"
        self.secrets = self.data_dir / "secrets"
        self.in_process = in_process
        self.names = tuple(services)
        self.secure = secure
        self.ports: dict[str, int] = dict(
            ports or {n: 0 if in_process else free_port() for n in self.names}
        )
        self.env = dict(env or {})
        self.overrides = dict(settings or {})
        self.ready_timeout = ready_timeout
        self.streams = tuple(streams)
        self._given_url = nats_url
        self._setup_seed = setup_seed
        self._watch_nats = watch_nats
        self._on_event = on_event
        self._backoff_initial = backoff_initial
        self.nats_port = None if nats_url else (nats_port or free_port())
        self.cluster_size = cluster
        self.nats_ports: list[int] = []
        """The client ports of the embedded nodes."""
        self.route_ports: list[int] = []
        if self.nats_port is not None:
            self.nats_ports = [self.nats_port] + [
                nats_port + i if nats_port else free_port() for i in range(1, cluster)
            ]
            if cluster > 1:
                self.route_ports = [
                    route_port + i if route_port else free_port() for i in range(cluster)
                ]
        if replicas is None:
            replicas = replicas_setting({**os.environ, **self.env}) if nats_url else min(cluster, 3)
        if self.embedded and replicas > cluster:
            raise PlatformError(f"{replicas} replicas need as many nodes, not {cluster}")
        self.replicas = replicas
        """How many nodes keep a copy of each stream and bucket."""
        self.server: NatsServer | None = None
        """The embedded nats-server (none: `nats_url` was given, a cluster, or not started)."""
        self.cluster: NatsCluster | None = None
        """The embedded cluster's nodes (with `cluster` > 1, once started)."""
        self.watchdog: NatsWatchdog | None = None
        self.watchdogs: list[NatsWatchdog] = []
        self._supervisor: Supervisor | None = None
        self.services: dict[str, Service] = {}
        """The service objects (in process), by name; a test may put a fresh one in place."""
        self.urls: dict[str, str] = {}
        """Each service's HTTP address (in process: known once started)."""
        self.profile_token: str | None = None
        self.token_file: Path | None = None
        """Where the profile lookup's token was read from (none: CDP_PROFILE_TOKEN, or not
        `secure`)."""
        self.codes: dict[str, int | None] = {}
        """The services' exit statuses, once stopped."""
        self._started = False
        self._stopped = False

    # -- what callers need ------------------------------------------------------------
    @property
    def nats_url(self) -> str:
        """The NATS server's URL, or the nodes' (comma-separated), as CDP_NATS_URL holds it."""
        if self._given_url is not None:
            return self._given_url
        return ",".join(f"nats://127.0.0.1:{port}" for port in self.nats_ports)

    @property
    def nodes(self) -> list[NatsServer]:
        """The embedded nats-server processes: the one server, or the cluster's nodes."""
        if self.cluster is not None:
            return list(self.cluster.nodes)
        return [self.server] if self.server is not None else []

    @property
    def embedded(self) -> bool:
        return self._given_url is None

    def seed(self, account: str) -> Path | None:
        """The seed file `account` connects with (none: the server admits anyone)."""
        if self.embedded and self.secure:
            return seed_path(self.secrets, account)
        return None

    def admin_credentials(self) -> tuple[Path | None, str]:
        """The seed file and inbox prefix an operator's connection uses."""
        if self.embedded:
            return self.seed(ADMIN), inbox_prefix(ADMIN)
        return self._setup_seed or (None, inbox_prefix(ADMIN))

    async def connect(self, name: str = "cdp-platform") -> Client:
        """A NATS connection with the admin's credentials."""
        seed, prefix = self.admin_credentials()
        return await nats.connect(
            nats_servers(self.nats_url),
            name=name,
            connect_timeout=5,
            inbox_prefix=prefix,
            nkeys_seed=str(seed) if seed else None,
        )

    @property
    def supervisor(self) -> Supervisor:
        """The service processes' supervisor (process mode, once started)."""
        if self._supervisor is None:
            raise PlatformError("no service processes: in process, or not started")
        return self._supervisor

    def db(self, service: str) -> Path:
        return self.data_dir / f"{service}.db"

    def log_tail(self, service: str, chars: int = 3000) -> str:
        path = self.logs / f"{service}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def service_env(self, name: str) -> dict[str, str]:
        """The environment `name` runs with (over this process's, for a process)."""
        out = {
            "CDP_DATA_DIR": str(self.data_dir),
            "CDP_NATS_URL": self.nats_url,
            "CDP_REPLICAS": str(self.replicas),
            "CDP_LOG_FORMAT": os.environ.get("CDP_LOG_FORMAT", "json"),
            **{port_variable(n): str(p) for n, p in self.ports.items()},
            **self.env,
        }
        if name == "profile" and self.profile_token is not None:
            out["CDP_PROFILE_TOKEN"] = self.profile_token
        seed = self.seed(name)
        if seed is not None:
            out["CDP_NATS_NKEY"] = str(seed)
        return out

    # -- lifecycle ----------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self, *, wait: bool = True) -> None:
        """Bring everything up; with `wait`, until every service is ready (else NotReady).
        Raises PortsTaken (nothing started) or NatsServerError; stops what it started
        before raising."""
        if self._started:
            raise PlatformError("a platform starts once")
        self._started = True
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.in_process:
            taken = ports_taken(
                [*self.nats_ports, *self.route_ports] if self.embedded else None,
                {**os.environ, **self._merged_env()},
                services=self.names,
            )
            if taken:
                raise PortsTaken(taken)
        try:
            await self._start_nats()
            await self._setup()
            if self.in_process:
                await self._start_in_process()
            else:
                await self._start_processes()
            if wait:
                await self._require_ready()
        except BaseException:
            await self.stop()
            raise

    def _merged_env(self) -> dict[str, str]:
        return {port_variable(n): str(p) for n, p in self.ports.items()} | self.env

    async def _start_nats(self) -> None:
        if not self.embedded:
            return
        authorization = None
        if self.secure:
            keys = ensure_credentials(self.secrets, app_names())
            authorization = server_authorization(keys, activation_subjects())
        self.logs.mkdir(parents=True, exist_ok=True)
        assert self.nats_port is not None
        if self.cluster_size > 1:
            self.cluster = NatsCluster(
                self.data_dir / "nats-cluster",
                self.cluster_size,
                ports=self.nats_ports,
                route_ports=self.route_ports,
                log_dir=self.logs,
                authorization=authorization,
            )
            await self.cluster.start()
            if self._watch_nats is not None:
                for node in self.cluster.nodes:
                    watchdog = NatsWatchdog(node, self._node_events(node.server_name))
                    watchdog.start()
                    self.watchdogs.append(watchdog)
            return
        self.server = NatsServer(
            self.data_dir / "nats",
            port=self.nats_port,
            log_file=self.logs / "nats.log",
            authorization=authorization,
            monitor_port=free_port(),
        )
        await self.server.start()
        if self._watch_nats is not None:
            self.watchdog = NatsWatchdog(self.server, self._watch_nats)
            self.watchdog.start()
            self.watchdogs.append(self.watchdog)

    def _node_events(self, node: str) -> Callable[[str], None]:
        report = self._watch_nats
        assert report is not None
        return lambda what: report(f"{node}: {what}")

    async def _setup(self) -> None:
        """The streams and the batch-file bucket (`cdp setup`), with the admin key; the
        profile lookup's bearer token."""
        nc = await self.connect("cdp-setup")
        try:
            await ensure_streams(nc.jetstream(), self.streams, replicas=self.replicas)
            await ensure_buckets(
                nc.jetstream(), *bucket_ttls({**os.environ, **self.env}), replicas=self.replicas
            )
            await ensure_snapshot_buckets(nc.jetstream(), replicas=self.replicas)
        finally:
            await nc.close()
        if self.secure:
            self.profile_token, self.token_file = profile_token(self.secrets)

    async def _start_processes(self) -> None:
        specs = [
            ProcessSpec(
                name,
                [sys.executable, "-m", f"services.{name}"],
                env=self.service_env(name),
                log_file=self.logs / f"{name}.log",
            )
            for name in self.names
        ]
        for name in self.names:
            s = load_settings(name, {**os.environ, **self.service_env(name)})
            self.urls[name] = f"http://{probe_host(s.bind)}:{s.port}"
        self._supervisor = Supervisor(
            specs, backoff_initial=self._backoff_initial, on_event=self._on_event
        )
        await self._supervisor.start()

    async def _start_in_process(self) -> None:
        for name in self.names:
            settings = load_settings(name, self.service_env(name))
            settings = msgspec.structs.replace(settings, **self.overrides)
            svc = service_class(name)(settings)
            self.services[name] = svc
            await svc.start()  # returns once the service is ready
            self.urls[name] = f"http://{probe_host(settings.bind)}:{svc.health.port}"

    async def _require_ready(self) -> None:
        states = await self.wait_ready(self.ready_timeout)
        not_ready = {n: why for n, (ok, why) in states.items() if not ok}
        if not_ready:
            raise NotReady(not_ready)

    async def wait_ready(self, timeout: float) -> dict[str, tuple[bool, str]]:
        """Until every service answers 200 on /readyz, `timeout` at most: (ok, why) each."""
        return await wait_ready(self.urls, timeout)

    async def ready(self, service: str) -> bool:
        """Whether `service` answers 200 on /readyz now."""
        async with aiohttp.ClientSession() as session:
            ok, _why = await readiness(session, self.urls[service])
        return ok

    async def all_ready(self) -> dict[str, str]:
        """The services that do not answer 200 on /readyz, with why (empty: all ready)."""
        async with aiohttp.ClientSession() as session:
            out = {}
            for name, url in self.urls.items():
                ok, why = await readiness(session, url)
                if not ok:
                    out[name] = why
            return out

    def pids(self) -> dict[str, int | None]:
        """Each service's process id (process mode; none: not running), and nats-server's."""
        out: dict[str, int | None] = {}
        if self._supervisor is not None:
            out = {n: self._supervisor.pid(n) for n in self.names}
        if self.server is not None and self.server.proc is not None:
            out["nats-server"] = self.server.proc.pid
        if self.cluster is not None:
            for node in self.cluster.nodes:
                out[node.server_name] = node.proc.pid if node.proc is not None else None
        return out

    async def stop(self) -> dict[str, int | None]:
        """Stop the services (in reverse order), then nats-server. Idempotent; returns
        each service's exit status."""
        if self._stopped:
            return self.codes
        self._stopped = True
        try:
            if self._supervisor is not None:
                self.codes = await self._supervisor.stop()
            for name, svc in reversed(list(self.services.items())):
                await svc.stop()
                self.codes[name] = svc.exit_code
            for watchdog in self.watchdogs:
                await watchdog.stop()
            for node in self.nodes:
                await node.stop()
        finally:
            for node in self.nodes:
                node.kill()  # interrupted while stopping: leave no nats-server behind
        return self.codes
