"""Several instances of a service, coordinated through NATS alone (no coordinator of ours).

- `assign`: which live instance owns which partition. Rendezvous (highest random weight)
  hashing: every instance computes the same owners from the same live set, and a join or
  a leave moves only the partitions it must (about 1/N of them).
- `Registry`: the live instances, in the KV bucket `cdp-instances` (key
  `<service>.<instance>`). Each instance puts its key every third of the bucket's max age;
  the server drops a key that was not put for that long, so an instance that died or was
  paused leaves the live set by itself.
- `Lease`: one holder at a time for a key of the KV bucket `cdp-leases` (max age = the
  lease time). Acquired with a create (refused while anyone holds it), renewed with an
  update on the revision it last wrote (refused once someone else took it); the revision
  at acquisition is the fencing token, strictly increasing per key over the bucket's life.
  The holder also keeps a local monotonic deadline, before the server's expiry: `valid()`
  is False once it passed, whether or not the process noticed (it was stopped).

The buckets are created by the admin (`cdp up`, `cdp setup`: `ensure_buckets`); their max
ages are the TTLs, read back by every instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from shared.subjects import INSTANCES_BUCKET, LEASES_BUCKET

INSTANCE_TTL_S = 6.0
"""How long an instance stays in the live set after its last heartbeat (the bucket's max
age; `ensure_buckets`)."""
LEASE_TTL_S = 6.0
"""How long a lease outlives its last renewal on the server (the bucket's max age)."""

Callback = Callable[[], Awaitable[None] | None]


async def _call(fn: Callable[..., Awaitable[None] | None], *args: object) -> None:
    result = fn(*args)
    if inspect.isawaitable(result):
        await result


# -- assignment -------------------------------------------------------------------------
def weight(service: str, partition: int, instance: str) -> int:
    """The stable 64-bit weight of `instance` for `partition` (same in every process)."""
    digest = hashlib.blake2b(f"{service}/{partition}/{instance}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big")


def assign(partitions: int, instances: Sequence[str], service: str) -> dict[int, str]:
    """The owner of each partition among `instances`: the one of highest weight (ties,
    which a 64-bit hash all but never has, go to the smallest id). Empty without
    instances."""
    live = sorted(set(instances))
    if not live:
        return {}
    return {p: max(live, key=lambda i: (weight(service, p, i), _neg(i))) for p in range(partitions)}


def _neg(instance: str) -> tuple[int, ...]:
    return tuple(-ord(c) for c in instance)


# -- buckets ------------------------------------------------------------------------------
async def ensure_buckets(
    js: JetStreamContext,
    instance_ttl: float = INSTANCE_TTL_S,
    lease_ttl: float = LEASE_TTL_S,
    *,
    replicas: int = 1,
) -> None:
    """Create the coordination buckets if they are missing, or set their TTLs
    (idempotent). Instances read the TTLs back from the buckets when they start."""
    for bucket, ttl in ((INSTANCES_BUCKET, instance_ttl), (LEASES_BUCKET, lease_ttl)):
        try:
            info = await js.stream_info(f"KV_{bucket}")
        except NotFoundError:
            await js.create_key_value(
                KeyValueConfig(bucket=bucket, history=1, ttl=ttl, replicas=replicas)
            )
            continue
        config = info.config
        if config.max_age != ttl:
            config.max_age = ttl
            config.duplicate_window = min(ttl, 120.0)
            await js.update_stream(config)


def bucket_ttls(env: Mapping[str, str]) -> tuple[float, float]:
    """`ensure_buckets`' TTLs (instances, leases) from `CDP_INSTANCE_TTL` and
    `CDP_LEASE_TTL` (seconds), else the defaults."""
    out = []
    for variable, default in (("CDP_INSTANCE_TTL", INSTANCE_TTL_S), ("CDP_LEASE_TTL", LEASE_TTL_S)):
        raw = env.get(variable, "")
        try:
            value = float(raw) if raw else default
        except ValueError:
            value = 0.0
        if value < 1.0:
            raise ValueError(f"{variable}={raw!r}: expected a number of seconds >= 1")
        out.append(value)
    return out[0], out[1]


async def bucket_ttl(kv: KeyValue) -> float:
    ttl = (await kv.status()).ttl
    if not ttl:
        raise ValueError(f"KV bucket {kv._name} has no max age: it cannot expire anything")
    return float(ttl)


# -- the registry of live instances ------------------------------------------------------
class InstanceInfo(msgspec.Struct, frozen=True):
    instance: str
    started_at: float
    role: str = ""


_info_encoder = msgspec.json.Encoder()


class Registry:
    """This instance's heartbeat in `cdp-instances`, and the live set of its service.

    `on_change(live)` is called (from the heartbeat task) when the live set of the
    service changes, with the sorted ids; `live()` asks the server now."""

    def __init__(
        self,
        js: JetStreamContext,
        service: str,
        instance: str,
        *,
        on_change: Callable[[list[str]], Awaitable[None] | None] | None = None,
    ) -> None:
        self.service = service
        self.instance = instance
        self._js = js
        self._on_change = on_change
        self._kv: KeyValue | None = None
        self._task: asyncio.Task[None] | None = None
        self._known: list[str] = []
        self._stopping = asyncio.Event()
        self._started_at = time.time()
        self.role = ""
        self.ttl = INSTANCE_TTL_S
        self._log = structlog.get_logger(service=service, instance=instance)

    @property
    def key(self) -> str:
        return f"{self.service}.{self.instance}"

    @property
    def known(self) -> list[str]:
        """The live set as of the last heartbeat."""
        return list(self._known)

    async def start(self) -> None:
        self._kv = await self._js.key_value(INSTANCES_BUCKET)
        self.ttl = await bucket_ttl(self._kv)
        await self.heartbeat()
        self._known = await self.live()
        self._task = asyncio.create_task(self._run(), name=f"registry:{self.key}")

    async def heartbeat(self) -> None:
        assert self._kv is not None
        info = InstanceInfo(self.instance, self._started_at, self.role)
        await self._kv.put(self.key, _info_encoder.encode(info))

    async def live(self, service: str | None = None) -> list[str]:
        """The sorted ids of the live instances of `service` (this one's by default)."""
        kv = self._kv
        assert kv is not None
        # The bucket's subjects (one request, no consumer), then each key's last entry: a
        # key removed by a planned leave ends in a delete marker until it expires.
        root = f"$KV.{INSTANCES_BUCKET}."
        info = await self._js.stream_info(
            f"KV_{INSTANCES_BUCKET}", subjects_filter=f"{root}{service or self.service}.*"
        )
        live = []
        for subject in info.state.subjects or {}:
            key = subject[len(root) :]
            try:
                await kv.get(key)
            except NotFoundError:  # deleted, or expired since
                continue
            live.append(key.split(".", 1)[1])
        return sorted(live)

    async def _run(self) -> None:
        # The flag, not only the cancellation, ends the loop: a cancellation that lands as
        # a request completes can be lost in a client's wait_for (Python < 3.12).
        while not self._stopping.is_set():
            await asyncio.sleep(self.ttl / 3)
            if self._stopping.is_set():
                return
            try:
                await self.heartbeat()
                live = await self.live()
            except (TimeoutError, nats.errors.Error) as exc:
                self._log.warning("heartbeat failed", error=repr(exc))
                continue
            if live != self._known:
                self._log.info("live instances changed", was=self._known, now=live)
                self._known = live
                if self._on_change is not None:
                    await _call(self._on_change, live)

    async def stop(self, *, leave: bool = True) -> None:
        """Stop heartbeating; `leave`: remove the key now (a planned stop) rather than let
        it expire. Idempotent."""
        self._stopping.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if leave and self._kv is not None:
            with contextlib.suppress(Exception):
                await self._kv.delete(self.key)
        self._kv = None


# -- leases -------------------------------------------------------------------------------
class Lease:
    """One holder of `key` in `cdp-leases` at a time.

    `try_acquire()` once, or `acquire()` until it succeeds; once held, a task renews it
    every third of the TTL (unless `auto_renew=False`: then the owner calls `renew()`).
    A renewal refused by the server (someone else holds it, or the key expired) or not
    done before the local deadline loses the lease: `on_lost` is called once. `token` is
    the fencing token of the current holding (the revision at acquisition)."""

    def __init__(
        self,
        js: JetStreamContext,
        key: str,
        holder: str,
        *,
        margin: float = 1.0,
        on_lost: Callback | None = None,
        auto_renew: bool = True,
    ) -> None:
        self.key = key
        self.holder = holder
        self.margin = margin
        self._js = js
        self._on_lost = on_lost
        self._auto_renew = auto_renew
        self._kv: KeyValue | None = None
        self.ttl = LEASE_TTL_S
        self.token: int | None = None
        self._revision = 0
        self._deadline = 0.0
        self._task: asyncio.Task[None] | None = None
        self._log = structlog.get_logger(lease=key, holder=holder)

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            kv = await self._js.key_value(LEASES_BUCKET)
            self.ttl = await bucket_ttl(kv)
            if self.margin >= self.ttl / 2:
                raise ValueError(f"lease margin {self.margin}s: at most half the TTL {self.ttl}s")
            self._kv = kv
        return self._kv

    @property
    def held(self) -> bool:
        """Acquired and not known to be lost (see `valid` for whether to act on it)."""
        return self.token is not None

    def valid(self) -> bool:
        """Held, and its local deadline (last renewal + TTL - margin) is not past."""
        return self.token is not None and time.monotonic() < self._deadline

    def remaining(self) -> float:
        return max(0.0, self._deadline - time.monotonic()) if self.token is not None else 0.0

    async def try_acquire(self) -> bool:
        """Take the lease if nobody holds it. True if this holder has it now."""
        kv = await self._bucket()
        if self.token is not None:
            return True
        sent = time.monotonic()
        try:
            revision = await kv.create(self.key, self.holder.encode())
        except (nats.js.errors.KeyWrongLastSequenceError, NotFoundError):
            return False
        except nats.js.errors.APIError as exc:
            self._log.debug("lease not acquired", error=repr(exc))
            return False
        self.token = self._revision = revision
        self._deadline = sent + self.ttl - self.margin
        self._log.info("lease acquired", fencing=revision)
        if self._auto_renew:
            self._task = asyncio.create_task(self._renewing(), name=f"lease:{self.key}")
        return True

    async def acquire(self, poll: float | None = None) -> None:
        """Wait until this holder has the lease (cancel to give up). It is looked at every
        `poll` seconds (a sixth of the TTL by default): an expiry by age is not announced
        to watchers."""
        await self._bucket()
        every = poll if poll is not None else self.ttl / 6
        while True:
            try:
                if await self.try_acquire():
                    return
            except (TimeoutError, nats.errors.Error) as exc:
                self._log.warning("lease acquisition failed", error=repr(exc))
            await asyncio.sleep(every)

    async def holder_of(self) -> tuple[str, int] | None:
        """Who holds the lease now on the server, and its revision (none: nobody)."""
        kv = await self._bucket()
        try:
            entry = await kv.get(self.key)
        except NotFoundError:
            return None
        return (entry.value or b"").decode(), int(entry.revision or 0)

    async def renew(self) -> bool:
        """Extend the lease; False (and the lease lost) if it is not ours any more."""
        if self.token is None:
            return False
        kv = await self._bucket()
        sent = time.monotonic()
        try:
            revision = await kv.update(self.key, self.holder.encode(), last=self._revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            await self._lose("taken or expired")
            return False
        except (TimeoutError, nats.errors.Error) as exc:
            # Not refused, not confirmed: keep it until the local deadline, then it is lost.
            if time.monotonic() >= self._deadline:
                await self._lose(f"not renewed in time: {exc!r}")
                return False
            self._log.warning("lease renewal failed", error=repr(exc))
            return True
        # Accepted on the revision this holder wrote last: nobody held it in between (an
        # expired key has no revision to match), even if this holder was paused past its
        # deadline meanwhile (and, not `valid()`, did nothing under it).
        self._revision = revision
        self._deadline = sent + self.ttl - self.margin
        return True

    async def _renewing(self) -> None:
        while self.token is not None:  # release() clears it first (see Registry._run)
            await asyncio.sleep(self.ttl / 3)
            if self.token is None or not await self.renew():
                return

    async def _lose(self, reason: str) -> None:
        if self.token is None:
            return
        self._log.warning("lease lost", fencing=self.token, reason=reason)
        self.token = None
        self._deadline = 0.0
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        if self._on_lost is not None:
            await _call(self._on_lost)

    async def release(self) -> None:
        """Give the lease up now (only if it is still ours: the delete names the revision
        this holder last wrote). Idempotent; `on_lost` is not called."""
        held, self.token = self.token, None
        self._deadline = 0.0
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if held is None or self._kv is None:
            return
        with contextlib.suppress(Exception):
            await self._kv.delete(self.key, last=self._revision)
        self._log.info("lease released")
