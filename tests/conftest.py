"""Fixtures: a real nats-server per test (free port, JetStream in a temp folder)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest_asyncio
from hypothesis import HealthCheck, settings
from nats.aio.client import Client

from ops.natsd import NatsServer, free_port
from shared.log import configure_logging
from shared.streams import ensure_streams
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
    server = NatsServer(tmp_path / "jetstream", port=free_port(), log_file=tmp_path / "nats.log")
    await server.start()
    # Services only check that their streams exist; creating them is the admin's job.
    setup = await nats.connect(server.url)
    try:
        await ensure_streams(setup.jetstream(), (*ALL_STREAMS, *COUNTER_STREAMS))
    finally:
        await setup.close()
    try:
        yield server
    finally:
        await server.stop()


@pytest_asyncio.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[Client]:
    client = await nats.connect(nats_server.url)
    try:
        yield client
    finally:
        await client.close()
