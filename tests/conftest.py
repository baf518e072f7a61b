"""Fixtures: a real nats-server per test (free port, JetStream in a temp folder)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest_asyncio
from hypothesis import HealthCheck, settings
from nats.aio.client import Client

from ops.natsd import NatsServer
from ops.platform import Platform
from shared.log import configure_logging
from shared.subjects import ALL_STREAMS
from tests.actors.counter import IN_STREAM, OUT_STREAM

configure_logging("warning", "json")

# Two cores shared with nats-server and services: generation speed is no test subject here.
settings.register_profile(
    "cdp",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("cdp")

COUNTER_STREAMS = (IN_STREAM, OUT_STREAM)


@pytest_asyncio.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """The platform without its services: nats-server (JetStream in `tmp_path/nats`) and
    the streams. Services only check that their streams exist; creating them is the
    admin's job."""
    platform = Platform(tmp_path, services=(), streams=(*ALL_STREAMS, *COUNTER_STREAMS))
    await platform.start()
    try:
        assert platform.server is not None
        yield platform.server
    finally:
        await platform.stop()


@pytest_asyncio.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[Client]:
    client = await nats.connect(nats_server.url)
    try:
        yield client
    finally:
        await client.close()
