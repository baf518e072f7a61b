"""What every client command needs: a NATS connection and admin requests."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import nats
import nats.errors
from nats.aio.client import Client

from shared.config import DEFAULT_NATS_URL
from shared.errors import CdpError


class ClientError(CdpError):
    """A CLI command could not do its work; the message says why."""

    code = "client"


def nats_url(explicit: str | None = None) -> str:
    return explicit or os.environ.get("CDP_NATS_URL", DEFAULT_NATS_URL)


@asynccontextmanager
async def connect(url: str | None = None) -> AsyncIterator[Client]:
    target = nats_url(url)
    try:
        nc = await nats.connect(
            target,
            name="cdp-cli",
            connect_timeout=3,
            max_reconnect_attempts=0,
            allow_reconnect=False,
        )
    except (nats.errors.Error, OSError) as exc:
        raise ClientError(
            f"cannot reach NATS at {target} ({type(exc).__name__}); is the platform up "
            "(`cdp up`), or is CDP_NATS_URL right?"
        ) from None
    try:
        yield nc
    finally:
        await nc.close()
