"""Small helpers for tests: eventual conditions, settings for in-process services."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from ops.cli.apply import apply_objects, load_file
from ops.platform import Platform
from shared import subjects
from shared.config import Settings
from shared.messages import Probe, RecordEnvelope, json_encoder
from shared.runtime import Service


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 20.0, interval: float = 0.02
) -> None:
    """Wait until `check()` is true; fail with AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def settings_for(service: str, nats_url: str, data_dir: Path, **overrides: object) -> Settings:
    base = Settings(service=service, nats_url=nats_url, data_dir=data_dir, port=0)
    return msgspec.structs.replace(base, **overrides)


ROOT = Path(__file__).resolve().parent.parent
RETAIL_CONFIG = ROOT / "examples" / "retail" / "config.yaml"


@asynccontextmanager
async def running(
    classes: Sequence[type[Service]],
    nats_url: str,
    data_dir: Path,
    nc: Client,
    **overrides: object,
) -> AsyncIterator[dict[str, Service]]:
    """Start these services in-process against one nats-server (the platform's in-process
    bring-up), apply the retail example's configuration, and stop them (in reverse order)
    afterwards. `overrides` are settings every service gets (e.g. `phone_region="FR"`).
    The dict it yields is the platform's: a service put in its place is the one stopped."""
    platform = Platform(
        data_dir,
        nats_url=nats_url,
        in_process=True,
        services=[c.name for c in classes],
        settings=overrides,
    )
    async with platform:
        await apply_objects(nc, load_file(RETAIL_CONFIG), dry_run=False, file=str(RETAIL_CONFIG))
        yield platform.services


async def all_ready(session: aiohttp.ClientSession, ports: dict[str, int]) -> bool:
    """Every service on these HTTP ports answers /readyz with 200."""
    for port in ports.values():
        try:
            async with session.get(f"http://127.0.0.1:{port}/readyz") as r:
                if r.status != 200:
                    return False
        except aiohttp.ClientError:
            return False
    return True


async def lose_db(services: dict[str, Service], name: str) -> Service:
    """Stop service `name`, delete its SQLite file (as a lost volume would), and put a
    fresh, not yet started instance with the same settings in its place."""
    old = services[name]
    await old.stop()
    db = old.settings.db_path
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)  # noqa: ASYNC240 - a test's setup step
    fresh = type(old)(old.settings)
    services[name] = fresh
    return fresh


async def ingest_drained(nc: Client, timeout: float = 20.0) -> None:
    """Wait until the ingest service has applied everything published to the ingest stream
    before this call: a probe published behind it comes out on the records stream (no
    other service needs to run)."""
    probe_id = f"drain-{secrets.token_hex(6)}"
    passed = asyncio.Event()

    async def on_records(msg: Msg) -> None:
        try:
            envelope = msgspec.msgpack.decode(msg.data, type=RecordEnvelope)
        except msgspec.DecodeError:
            return
        if any(p.probe_id == probe_id for p in envelope.probes):
            passed.set()

    sub = await nc.subscribe(subjects.RECORDS, cb=on_records)
    try:
        await nc.jetstream().publish(subjects.PROBE, json_encoder.encode(Probe(probe_id)))
        await asyncio.wait_for(passed.wait(), timeout)
    finally:
        await sub.unsubscribe()
