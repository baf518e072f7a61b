"""A service process: NATS + JetStream + SQLite + HTTP health, with a clean lifecycle.

`start()` returns once the service is ready: NATS connected, streams and consumers
created, SQLite open and migrated, leftover outbox published, consumers fetching.
`stop()` stops fetching, lets the batch in flight finish, drains NATS and closes SQLite;
it is idempotent. `run_service` wires both to SIGTERM/SIGINT for a process entry point.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import ClassVar

import aiosqlite
import nats
import nats.errors
import structlog
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from shared import admin, subjects
from shared.config import Settings, load_settings, nats_servers
from shared.db import Migration, open_db
from shared.errors import StartupError
from shared.health import HealthServer
from shared.listing import serve_listings
from shared.log import configure_logging
from shared.metrics import ServiceMetrics
from shared.runtime.actor import (
    RUNTIME_MIGRATIONS,
    ConsumerRunner,
    ConsumerSpec,
    StepRef,
    flush_outbox,
)
from shared.runtime.competing import CompetingRunner
from shared.runtime.coordination import Callback, Lease
from shared.streams import PartitionCountFixed, missing_streams
from shared.subjects import ALL_STREAMS, StreamSpec, inbox_prefix

PUBLISH_FAULT_S = 10.0
"""How long a publish that was not acknowledged keeps a service not ready."""


class Service:
    """Base class of the six services (and of test actors).

    Subclasses set `name` and `migrations`, return their consumers from `consumers()`
    and may extend `on_start`/`on_stop` (admin subscriptions, caches, HTTP routes).
    """

    name: ClassVar[str] = "service"
    migrations: ClassVar[tuple[Migration, ...]] = ()
    streams: ClassVar[tuple[StreamSpec, ...]] = ALL_STREAMS
    listings: ClassVar[dict[str, str]] = {}
    """Named listings of the service's state for `cdp check` (see shared.listing)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.log = structlog.get_logger(service=self.name)
        self.metrics = ServiceMetrics(self.name)
        self.health = HealthServer(
            self.name,
            self.metrics,
            self.readiness,
            settings.bind,
            settings.port,
            liveness=self.liveness,
            details=self.details,
        )
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._db: aiosqlite.Connection | None = None
        self.runners: list[ConsumerRunner] = []
        self._phase = "not started"
        self._ready = False
        self._stopping = False
        self._stopped = asyncio.Event()
        self._fatal: asyncio.Event = asyncio.Event()
        self._fatal_reason: str | None = None
        self._publish_fault: tuple[str, float] | None = None
        self._status_sub: Subscription | None = None
        self._listing_sub: Subscription | None = None
        self.exit_code = 0

    # -- what subclasses provide ----------------------------------------------------
    def consumers(self) -> Sequence[ConsumerSpec]:
        return ()

    @property
    def role(self) -> str | None:
        """This instance's role among its service's instances, if it has one."""
        return None

    def details(self) -> dict[str, str]:
        """What /readyz adds to its answer: the instance, and its role if it has one."""
        out = {"instance": self.settings.instance_id}
        if (role := self.role) is not None:
            out["role"] = role
        return out

    async def on_connected(self) -> bool:
        """Called with NATS and SQLite ready, before the outbox a previous run left is
        published; False: this instance must not publish it (a standby: the active one
        redoes those steps). Decide a role here."""
        return True

    def standby_of(self, spec: ConsumerSpec) -> Callable[[], Awaitable[StepRef | None]] | None:
        """For a standby instance: where the active instance is on this consumer's input
        (the last step it published), so that the runner follows it silently; none: the
        consumer runs as usual. A standby becomes active with `take_over`."""
        return None

    def guard_of(self, spec: ConsumerSpec) -> Callable[[], None] | None:
        """What runs right before each commit and each publish of this consumer, and
        raises to refuse them (fencing: a lease no longer held); none: nothing."""
        return None

    standby_poll: ClassVar[float] = 0.2
    """How often a standby that caught up asks again where the active instance is."""

    async def take_over(self, spec_name: str, last: StepRef | None) -> None:
        """Make the standby runner of consumer `spec_name` active (see ConsumerRunner)."""
        for runner in self.runners:
            if runner.spec.name == spec_name:
                runner.take_over(last)

    async def on_start(self) -> None:
        """Called with NATS and SQLite ready, before the consumers start."""

    async def on_stop(self) -> None:
        """Called after the consumers stopped, before NATS drains and SQLite closes."""

    # -- accessors --------------------------------------------------------------------
    @property
    def nc(self) -> Client:
        if self._nc is None:
            raise RuntimeError(f"{self.name}: NATS is not connected")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError(f"{self.name}: JetStream is not ready")
        return self._js

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError(f"{self.name}: SQLite is not open")
        return self._db

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def nats_connected(self) -> bool:
        """Whether the NATS connection is up now (not connecting, reconnecting or closed)."""
        nc = self._nc
        return nc is not None and nc.is_connected

    @property
    def fatal(self) -> asyncio.Event:
        """Set when a consumer died: the process should stop and exit non-zero."""
        return self._fatal

    # -- lifecycle ----------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        self._phase = "starting: HTTP"
        await self.health.start()
        self._phase = "starting: connecting to NATS"
        self._nc = await self._connect()
        self._js = self._nc.jetstream()
        await self._wait_streams()
        self._phase = "starting: opening SQLite"
        self._db = await open_db(s.db_path, RUNTIME_MIGRATIONS + self.migrations)
        if await self.on_connected():
            await flush_outbox(self._js, self._db, self.log, lambda: self._stopping)
        self._phase = "starting: service"
        await self.on_start()
        self._phase = "starting: consumers"
        for spec in self.consumers():
            runner_type = CompetingRunner if spec.competing else ConsumerRunner
            runner = runner_type(
                spec,
                service=self.name,
                nc=self._nc,
                js=self._js,
                db=self._db,
                metrics=self.metrics,
                fetch_batch=s.fetch_batch,
                ack_wait=s.ack_wait,
                step_max_bytes=s.step_max_bytes,
                guard=self.guard_of(spec),
            )
            follow = self.standby_of(spec)
            if follow is not None:
                runner.follow(follow, self.standby_poll)
            await runner.prepare()
            self.runners.append(runner)
        for runner in self.runners:
            runner.start()
            assert runner.task is not None
            runner.task.add_done_callback(self._on_runner_done)
        # Every instance answers a status request (a queue group of its own): `cdp status`
        # gathers the replies of all of them (admin.gather).
        self._status_sub = await admin.serve(
            self._nc,
            subjects.admin(self.name, "status"),
            admin.StatusRequest,
            self.status,
            queue=f"status-{self.settings.instance_id}",
        )
        if self.listings:
            self._listing_sub = await serve_listings(self._nc, self.name, self._db, self.listings)
        self._phase = "ready"
        self._ready = True
        self.log.info("ready", port=self.health.port, db=str(s.db_path))

    async def _wait_streams(self) -> None:
        """Wait, not ready, until the streams exist: only the admin key creates them."""
        assert self._js is not None
        said = ""
        while True:
            try:
                missing = await missing_streams(self._js, self.streams, self.settings.partitions)
            except PartitionCountFixed as exc:
                raise StartupError(self.name, "partitions", str(exc)) from exc
            except Exception as exc:
                raise StartupError(self.name, "streams", repr(exc)) from exc
            if not missing:
                return
            self._phase = f"stream {missing[0]} missing: run `cdp up` or `cdp setup`"
            if self._phase != said:
                self.log.warning("waiting for streams", missing=missing)
                said = self._phase
            await asyncio.sleep(0.5)

    async def _connect(self) -> Client:
        backoff = 0.1
        while True:
            try:
                return await nats.connect(
                    nats_servers(self.settings.nats_url),
                    name=f"cdp-{self.name}",
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    connect_timeout=2,
                    inbox_prefix=inbox_prefix(self.name),
                    nkeys_seed=str(nkey) if (nkey := self.settings.nats_nkey) else None,
                    reconnected_cb=self._on_reconnected,
                    disconnected_cb=self._on_disconnected,
                    error_cb=self._on_error,
                )
            except (nats.errors.Error, OSError) as exc:
                self.log.warning("NATS not reachable", error=repr(exc), retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _on_reconnected(self) -> None:
        self.log.info("NATS reconnected")
        for runner in self.runners:
            runner.request_resync()

    async def _on_disconnected(self) -> None:
        if not self._stopping:
            self.log.warning("NATS disconnected")

    async def _on_error(self, exc: Exception) -> None:
        if "permissions violation" in str(exc).lower():
            # A subject this service's credentials do not allow: a bug or a stale
            # configuration of the server, never normal operation.
            self.log.error("NATS refused a subject to this service", error=str(exc))
            return
        self.log.warning("NATS error", error=repr(exc))

    def _on_runner_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._stopping:
            return
        exc = task.exception()
        self.log.error("consumer stopped unexpectedly", task=task.get_name(), error=repr(exc))
        self._fatal_reason = f"{task.get_name()} died: {type(exc).__name__}: {exc}"
        self._ready = False
        self.exit_code = 1
        self._fatal.set()

    async def role_lease(self, key: str, on_lost: Callback) -> tuple[Lease | None, bool]:
        """The lease `key` that decides this instance's role, and whether it holds it now.
        The deployment's only instance (no CDP_INSTANCE) takes none and acts: (None, True);
        a lease would only let a loop kept busy past its expiry stop the one there is. A
        named instance needs the lease bucket (`cdp setup`), unless it is named after its
        service (set up before leases existed: it runs as it always ran)."""
        if not self.settings.instance:
            return None, True
        instance = self.settings.instance_id
        lease = Lease(self.js, key, instance, margin=self.settings.lease_margin, on_lost=on_lost)
        try:
            return lease, await lease.try_acquire()
        except NotFoundError:
            if instance != self.name:
                raise StartupError(
                    self.name, "lease", f"no bucket {subjects.LEASES_BUCKET}: run `cdp setup`"
                ) from None
            self.log.warning("no lease bucket: running as the only instance; run `cdp setup`")
            return None, True

    def fail(self, reason: str) -> None:
        """Stop the process with exit status 1 (it is restarted): it must not go on."""
        self.log.error("stopping", reason=reason)
        self._fatal_reason = reason
        self._ready = False
        self.exit_code = 1
        self._fatal.set()

    def publish_failed(self, reason: str) -> None:
        """A publish was not acknowledged: readiness reports `reason` until one is, for
        PUBLISH_FAULT_S at most (with nothing to publish, nothing shows it still holds)."""
        self._publish_fault = (reason, time.monotonic())

    def publish_succeeded(self) -> None:
        self._publish_fault = None

    def liveness(self) -> str | None:
        """None while alive; else why the process must be restarted (served on /healthz)."""
        return self._fatal_reason

    async def stop(self) -> None:
        """Stop fetching, finish the batch in flight, drain NATS, close SQLite. Idempotent."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        self._ready = False
        self._phase = "stopping"
        # Every step runs whatever the one before it raised: a step left out (SQLite's
        # thread not closed, the HTTP port not released) would keep the process alive.
        try:
            async with self._step("consumers"):
                for runner in self.runners:
                    await runner.stop()
            async with self._step("subscriptions"):
                subs = [x for x in (self._status_sub, self._listing_sub) if x is not None]
                self._status_sub = self._listing_sub = None
                await admin.unsubscribe_all(subs)
            async with self._step("on_stop"):
                await self.on_stop()
            async with self._step("nats"):
                nc, self._nc = self._nc, None
                if nc is not None and not nc.is_closed:
                    try:
                        await asyncio.wait_for(nc.drain(), timeout=5)
                    except (TimeoutError, nats.errors.Error):
                        await nc.close()
            async with self._step("http"):
                await self.health.stop()
            async with self._step("sqlite"):
                db, self._db = self._db, None
                if db is not None:
                    await db.close()
            self.log.info("stopped")
        finally:
            self._stopped.set()

    @contextlib.asynccontextmanager
    async def _step(self, what: str) -> AsyncIterator[None]:
        """One step of `stop`: an error is logged (and makes the exit status 1), not raised."""
        try:
            yield
        except Exception as exc:
            self.log.exception("stop step failed", step=what, error=repr(exc))
            self.exit_code = 1

    async def status(self, _request: admin.StatusRequest) -> admin.ServiceStatus:
        """The service's backlog: what its consumers have not applied yet, what its
        outbox has not published (`cdp status`, `cdp.admin.<service>.status`)."""
        reason = await self.readiness()
        consumers = []
        js = self._js
        for runner in self.runners:
            spec = runner.spec
            pending = ack_pending = 0
            error = None
            if js is not None:
                try:
                    info = await js.consumer_info(spec.stream.name, spec.durable_name, timeout=2)
                    pending = int(info.num_pending or 0)
                    ack_pending = int(info.num_ack_pending or 0)
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}"
            consumers.append(
                admin.ConsumerStatus(
                    name=spec.name,
                    stream=spec.stream.name,
                    pending=pending,
                    ack_pending=ack_pending,
                    offset=runner.offset,
                    error=error,
                )
            )
        outbox = failed = 0
        if self._db is not None:
            rows = await self._db.execute_fetchall(
                "SELECT (SELECT count(*) FROM rt_outbox), (SELECT count(*) FROM rt_failed)"
            )
            outbox, failed = (int(x) for x in next(iter(rows)))
        return admin.ServiceStatus(
            service=self.name,
            ready=reason is None,
            reason=reason,
            consumers=consumers,
            outbox=outbox,
            failed=failed,
            instance=self.settings.instance_id,
            role=self.role,
        )

    async def readiness(self) -> str | None:
        """None when ready; else why not (served on /readyz)."""
        if not self._ready:
            return self._phase
        nc, js, db = self._nc, self._js, self._db
        if nc is None or js is None or db is None or not nc.is_connected:
            return "nats: not connected"
        if self._fatal_reason is not None:
            return self._fatal_reason
        fault = self._publish_fault
        if fault is not None and time.monotonic() - fault[1] < PUBLISH_FAULT_S:
            return fault[0]
        for runner in self.runners:
            spec = runner.spec
            if runner.fault is not None:
                return runner.fault
            try:
                await js.consumer_info(spec.stream.name, spec.durable_name, timeout=1)
            except NotFoundError as exc:
                return f"consumer {spec.stream.name}/{spec.durable_name}: {type(exc).__name__}"
            except Exception as exc:
                # Nobody answers for JetStream: it disables itself when it cannot write.
                return f"nats: JetStream storage full or unavailable ({type(exc).__name__})"
        try:
            await db.execute_fetchall("SELECT 1")
        except Exception as exc:
            return f"sqlite: {exc}"
        return None


async def serve(service: Service) -> int:
    """Run `service` until SIGTERM/SIGINT (or a fatal error); returns the exit status."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.create_task(service.start(), name="start")
    stop_wait = asyncio.create_task(stop.wait(), name="stop-signal")
    fatal_wait = asyncio.create_task(service.fatal.wait(), name="fatal")
    try:
        await asyncio.wait({starting, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done() and starting.exception() is None:
            await asyncio.wait({stop_wait, fatal_wait}, return_when=asyncio.FIRST_COMPLETED)
        elif starting.done():
            exc = starting.exception()
            service.log.error("start failed", error=repr(exc))
            service.exit_code = 1
    finally:
        for task in (starting, stop_wait, fatal_wait):
            task.cancel()
        for task in (starting, stop_wait, fatal_wait):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        t0 = time.monotonic()
        await service.stop()
        service.log.debug("shutdown took", seconds=round(time.monotonic() - t0, 3))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return service.exit_code


def run_service(cls: type[Service]) -> None:
    """Process entry point: `python -m services.<name>`."""
    os.umask(0o077)  # data, logs and exports are the owner's alone: files 0600, folders 0700
    settings = load_settings(cls.name)
    configure_logging(settings.log_level, settings.log_format)
    sys.exit(asyncio.run(serve(cls(settings))))
