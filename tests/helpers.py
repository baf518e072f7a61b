"""Small helpers for tests: eventual conditions, settings for in-process services."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec

from shared.config import Settings


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
