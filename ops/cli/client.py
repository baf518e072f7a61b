"""What every client command needs: a NATS connection and admin requests."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import nats
import nats.errors
from nats.aio.client import Client

from ops.security import cli_credentials
from shared.config import DEFAULT_NATS_URL, nats_servers
from shared.errors import CdpError


class ClientError(CdpError):
    """A CLI command could not do its work; the message says why."""

    code = "client"


def nats_url(explicit: str | None = None) -> str:
    return explicit or os.environ.get("CDP_NATS_URL", DEFAULT_NATS_URL)


@asynccontextmanager
async def connect(url: str | None = None) -> AsyncIterator[Client]:
    """A connection with the caller's credentials (see `ops.security.cli_credentials`).
    When the server refuses something for lack of permission, the command fails saying so
    instead of with the timeout that follows."""
    target = nats_url(url)
    seed, prefix = cli_credentials()
    refused: list[str] = []

    async def on_error(exc: Exception) -> None:
        if "permissions violation" in str(exc).lower():
            refused.append(str(exc).removeprefix("nats: "))

    try:
        nc = await nats.connect(
            nats_servers(target),
            name="cdp-cli",
            connect_timeout=3,
            max_reconnect_attempts=0,
            allow_reconnect=False,
            inbox_prefix=prefix,
            nkeys_seed=str(seed) if seed else None,
            error_cb=on_error,
        )
    except (nats.errors.Error, OSError) as exc:
        raise ClientError(
            f"cannot reach NATS at {target} ({type(exc).__name__}: {exc}); is the platform up "
            "(`cdp up`), are CDP_NATS_URL and CDP_NATS_NKEY right?"
        ) from None
    try:
        yield nc
    except (nats.errors.Error, CdpError) as exc:
        if refused:
            raise ClientError(
                f"NATS refused these credentials: {refused[0]}. Configuration, jobs and "
                "privacy requests need the admin credentials (CDP_NATS_NKEY=<data dir>/"
                "secrets/admin.nk)"
            ) from exc
        raise
    finally:
        await nc.close()
