"""The console's side of NATS: its connection (its own read-only key, or the admin's with
`--admin`), typed admin requests, and the live membership feed behind /audiences/live."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ops.security import ADMIN, CONSOLE, seed_path
from shared import admin, subjects
from shared.admin import AdminFailure
from shared.config import nats_servers
from shared.messages import MembershipEvent
from shared.subjects import inbox_prefix

T = TypeVar("T")
log = structlog.get_logger(component="console")


class Unavailable(Exception):
    """A service did not answer; the message says which and why."""


def credentials(
    data_dir: Path, *, as_admin: bool, env: Mapping[str, str] | None = None
) -> tuple[Path | None, str]:
    """The seed file and inbox prefix the console connects with: `CDP_CONSOLE_NKEY` (or, with
    --admin, `CDP_NATS_NKEY`) if set, else the data folder's `console.nk` (`admin.nk` with
    --admin) if there is one, else none (a server that admits anyone)."""
    env = os.environ if env is None else env
    account = ADMIN if as_admin else CONSOLE
    given = env.get("CDP_NATS_NKEY" if as_admin else "CDP_CONSOLE_NKEY")
    if given:
        return Path(given), inbox_prefix(account)
    local = seed_path(data_dir / "secrets", account)
    return (local if local.exists() else None), inbox_prefix(account)


DRAIN_TIMEOUT_S = 5.0
"""How long stopping waits for the connection to drain before closing it."""


class Source:
    """One NATS connection, opened by `start()` and closed by `stop()`."""

    def __init__(
        self, url: str, seed: Path | None, prefix: str, *, can_write: bool = False
    ) -> None:
        self.url = url
        self.seed = seed
        self.prefix = prefix
        self.can_write = can_write
        """Started with the admin key (`--admin`): replay and job runs are offered."""
        self.nc: Client | None = None
        self.feed = MembershipFeed()
        self._sub: Subscription | None = None

    async def start(self) -> None:
        async def on_error(exc: Exception) -> None:
            log.warning("nats error", error=str(exc)[:200])

        self.nc = await nats.connect(
            nats_servers(self.url),
            name="cdp-console",
            connect_timeout=5,
            inbox_prefix=self.prefix,
            nkeys_seed=str(self.seed) if self.seed else None,
            error_cb=on_error,
            max_reconnect_attempts=-1,
        )
        self._sub = await self.nc.subscribe(subjects.MEMBERSHIP_ALL, cb=self.feed.on_msg)

    async def stop(self) -> None:
        self.feed.close()
        nc, self.nc = self.nc, None
        if nc is not None:
            # Bounded: a server already gone would keep a drain waiting for a reconnect.
            with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
                await asyncio.wait_for(nc.drain(), DRAIN_TIMEOUT_S)
            if not nc.is_closed:
                await nc.close()

    async def ask(
        self, subject: str, payload: msgspec.Struct, result: type[T], timeout: float = 5.0
    ) -> T:
        """An admin request; a service not running or not answering is `Unavailable`."""
        if self.nc is None:
            raise Unavailable("not connected to NATS")
        try:
            return await admin.request(self.nc, subject, payload, result, timeout=timeout)
        except nats.errors.NoRespondersError:
            raise Unavailable(f"no service answers {subject}") from None
        except nats.errors.TimeoutError:
            raise Unavailable(f"{subject} did not answer within {timeout:.0f}s") from None
        except nats.errors.Error as exc:
            raise Unavailable(f"{subject}: {exc}") from None

    async def gather_or_error(
        self, call: Callable[[Client], Awaitable[T]], what: str
    ) -> tuple[T | None, str | None]:
        """A request every instance of a service answers (`admin.ingest_errors`, ...):
        (result, None), or (None, why)."""
        if self.nc is None:
            return None, "not connected to NATS"
        try:
            return await call(self.nc), None
        except AdminFailure as exc:
            return None, exc.message
        except nats.errors.NoRespondersError:
            return None, f"no service answers {what}"
        except (TimeoutError, nats.errors.TimeoutError):
            return None, f"{what} did not answer in time"
        except nats.errors.Error as exc:
            return None, f"{what}: {exc}"

    async def ask_or_error(
        self, subject: str, payload: msgspec.Struct, result: type[T], timeout: float = 5.0
    ) -> tuple[T | None, str | None]:
        """(result, None), or (None, why) for a refusal or a silent service."""
        try:
            return await self.ask(subject, payload, result, timeout), None
        except (Unavailable, AdminFailure) as exc:
            return None, str(exc.message if isinstance(exc, AdminFailure) else exc)


class MembershipFeed:
    """Counts the membership events seen since the console started, per segment, and
    hands each one to every listener of /audiences/live."""

    def __init__(self) -> None:
        self.entered: dict[str, int] = defaultdict(int)
        self.exited: dict[str, int] = defaultdict(int)
        self.listeners: set[asyncio.Queue[str | None]] = set()
        self._decoder = msgspec.json.Decoder(MembershipEvent)

    async def on_msg(self, msg: Msg) -> None:
        try:
            event = self._decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        if event.segment.startswith("_"):
            return
        entered = event.status != "exited"
        if entered:
            self.entered[event.segment] += 1
        else:
            self.exited[event.segment] += 1
        data = json.dumps(
            {
                "segment": event.segment,
                "delta": 1 if entered else -1,
                "entered": self.entered[event.segment],
                "exited": self.exited[event.segment],
            }
        )
        for queue in list(self.listeners):
            if queue.qsize() < 1000:  # a stalled browser loses updates, not memory
                queue.put_nowait(data)

    def listen(self) -> asyncio.Queue[str | None]:
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.listeners.add(queue)
        return queue

    def forget(self, queue: asyncio.Queue[str | None]) -> None:
        self.listeners.discard(queue)

    def close(self) -> None:
        for queue in self.listeners:
            queue.put_nowait(None)

    def snapshot(self) -> dict[str, Any]:
        names = sorted({*self.entered, *self.exited})
        return {s: {"entered": self.entered[s], "exited": self.exited[s]} for s in names}
