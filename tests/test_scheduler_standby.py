"""Two schedulers: one active (the holder of the lease `scheduler.active`), one standby
(ready, running no schedule). SIGKILL the active one: the standby takes over and runs the
next due occurrence, once."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from nats.aio.client import Client

from ops.natsd import NatsServer, free_port
from shared import subjects
from shared.runtime.coordination import ensure_buckets
from tests.helpers import eventually
from tests.processes import ROOT

pytestmark = pytest.mark.asyncio
EVERY = 3  # seconds between two occurrences of the test's schedule


class Scheduler:
    def __init__(self, instance: str, data: Path, nats_url: str) -> None:
        self.data = data
        self.port = free_port()
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "CDP_NATS_URL": nats_url,
            "CDP_DATA_DIR": str(data),
            "CDP_INSTANCE": instance,
            "CDP_SCHEDULER_PORT": str(self.port),
            "CDP_LEASE_MARGIN": "0.5",
            "CDP_SEGMENTATION_SCHEDULE": f"* * * * * */{EVERY}",
            "CDP_LOG_LEVEL": "info",
            "CDP_LOG_FORMAT": "json",
        }
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        log = (self.data / "scheduler.log").open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.scheduler", env=self.env, stdout=log, stderr=log
        )
        log.close()

    async def ready(self) -> dict[str, Any]:
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{self.port}/readyz") as r,
            ):
                return dict(await r.json(content_type=None))
        except aiohttp.ClientError:
            return {}

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def requests(nc: Client) -> list[str]:
    """The message ids of the segmentation job requests on CDP_JOBS, in order."""
    js = nc.jetstream()
    sub = await js.subscribe(subjects.SEGMENTATION_JOB_RUN, ordered_consumer=True)
    ids: list[str] = []
    try:
        while True:
            msg = await sub.next_msg(timeout=0.5)
            ids.append((msg.headers or {}).get("Nats-Msg-Id", ""))
    except TimeoutError:
        pass
    finally:
        await sub.unsubscribe()
    return ids


@pytest.mark.timeout(120)
async def test_the_standby_runs_the_next_due_schedule_once_after_the_active_one_dies(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    await ensure_buckets(nc.jetstream(), 6.0, 2.0)
    a = Scheduler("scheduler-a", tmp_path / "a", nats_server.url)
    b = Scheduler("scheduler-b", tmp_path / "b", nats_server.url)
    try:
        await a.start()
        await eventually(lambda: _ready_as(a, "active"), timeout=30)
        await b.start()
        await eventually(lambda: _ready_as(b, "standby"), timeout=30)
        await eventually(lambda: _count(nc, 2), timeout=EVERY * 4)
        assert a.proc is not None
        a.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        before = await requests(nc)
        await eventually(lambda: _ready_as(b, "active"), timeout=15)
        took = time.monotonic() - killed
        await eventually(lambda: _count(nc, len(before) + 2), timeout=EVERY * 4)
        ids = await requests(nc)
        assert len(ids) == len(set(ids)), "each occurrence requested once"
        dues = sorted(int(i.rsplit("-", 1)[1]) for i in ids)
        gaps = {y - x for x, y in itertools.pairwise(dues)}
        assert all(g % EVERY == 0 for g in gaps), dues
        print(f"\nscheduler take-over: {took:.2f}s after the SIGKILL (lease 2.0s)")
    finally:
        await b.stop()
        await a.stop()


async def _ready_as(s: Scheduler, role: str) -> bool:
    state = await s.ready()
    return state.get("ready") is True and state.get("role") == role


async def _count(nc: Client, n: int) -> bool:
    return len(await requests(nc)) >= n
