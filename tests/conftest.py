"""Fixtures: a real nats-server per test (free port, JetStream in a temp folder)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest_asyncio
from nats.aio.client import Client

from shared.log import configure_logging
from shared.natsd import NatsServer, free_port

configure_logging("warning", "json")


@pytest_asyncio.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    server = NatsServer(tmp_path / "jetstream", port=free_port(), log_file=tmp_path / "nats.log")
    await server.start()
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
