"""Owning tasks: every task a component starts it cancels, then awaits, when it stops."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any


async def cancel(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel each task, then wait until each has ended (its cancellation included)."""
    running = [t for t in tasks if t is not None]
    for task in running:
        task.cancel()
    for task in running:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def cancel_all(tasks: Iterable[asyncio.Task[Any]]) -> None:
    await cancel(*list(tasks))
