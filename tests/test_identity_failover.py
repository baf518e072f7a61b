"""identity's warm standby: two identity processes, each with its own SQLite; one is the
writer (it holds the lease `identity.writer`), the other tails the records silently. Under
a continuous load of records, SIGKILL the writer: the standby takes over within seconds,
and at the end every person is what the model says (identity graphs, attributes and
events, nothing lost and nothing applied twice)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from nats.aio.client import Client

from ops.cli import people
from ops.cli.apply import apply_objects, load_file
from ops.cli.check import wait_landed
from ops.natsd import NatsServer, free_port
from shared import subjects
from shared.admin import AdminFailure
from tests.helpers import RETAIL_CONFIG, eventually
from tests.journeys import (
    ModelState,
    Person,
    RecordStep,
    big_journey,
    differences,
    event_id,
    journey_identities,
    model,
)
from tests.processes import ROOT, Platform

pytestmark = pytest.mark.asyncio
LEASE_TTL = 2.0
TAKEOVER_BOUND = 8.0
"""Seconds from the SIGKILL to the standby publishing as the writer, at most."""


class Identity:
    """One identity process (`python -m services.identity`) of its own data folder."""

    def __init__(self, instance: str, data: Path, nats_url: str) -> None:
        self.instance = instance
        self.data = data
        self.port = free_port()
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "CDP_NATS_URL": nats_url,
            "CDP_DATA_DIR": str(data),
            "CDP_INSTANCE": instance,
            "CDP_IDENTITY_PORT": str(self.port),
            "CDP_LEASE_MARGIN": "0.5",
            "CDP_LOG_LEVEL": "info",
            "CDP_LOG_FORMAT": "json",
        }
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        log = (self.data / "identity.log").open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.identity", env=self.env, stdout=log, stderr=log
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

    async def role(self) -> str | None:
        return (await self.ready()).get("role")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)

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

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        db = self.data / "identity.db"
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
            return [tuple(r) for r in conn.execute(sql).fetchall()]


async def observed(nc: Client, writer: Identity, keys: frozenset[str]) -> ModelState:
    groups: dict[str, set[str]] = defaultdict(set)
    for key, pid in writer.rows("SELECT key, profile_id FROM nodes"):
        if key in keys:
            groups[str(pid)].add(str(key))
    found = []
    for pid, identities in groups.items():
        try:
            view = await people.profile(nc, "", None, 5000, profile_id=pid)
        except AdminFailure as exc:  # a graph no record was attributed to (a refused card)
            assert exc.code == "not_found", exc.message
            view = {"attributes": {}, "events": []}
        ids = [event_id(e["dataset"], e["payload"]) for e in view["events"]]
        assert len(ids) == len(set(ids)), f"an event applied twice on {sorted(identities)[0]}"
        found.append(
            Person(
                identities=frozenset(identities),
                attributes=view["attributes"],
                events=frozenset(event_id(e["dataset"], e["payload"]) for e in view["events"]),
                segments=frozenset(),
            )
        )
    return ModelState(found)


def without_segments(state: ModelState) -> ModelState:
    return ModelState(
        [Person(p.identities, p.attributes, p.events, frozenset()) for p in state.people]
    )


@pytest.mark.timeout(400)
async def test_the_standby_takes_over_from_a_killed_writer_and_nothing_is_lost(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    js = nc.jetstream()
    journey = big_journey("fo-", time.time(), 400, seed=16)
    steps = [s for s in journey.steps if isinstance(s, RecordStep)]
    journey = msgspec.structs.replace(journey, steps=list(steps))  # records only
    a = Identity("identity-a", tmp_path / "ida", nats_server.url)
    b = Identity("identity-b", tmp_path / "idb", nats_server.url)
    others = ("ingest", "profile", "segmentation", "destination")
    env = {"CDP_LEASE_TTL": str(LEASE_TTL)}  # the platform's set-up sets the buckets' TTLs
    async with Platform(tmp_path / "var", nats_url=nats_server.url, services=others, env=env):
        try:
            await a.start()
            await eventually(lambda: _is(a.role(), "writer"), timeout=60)
            await b.start()
            await eventually(lambda: _ready_as(b, "standby"), timeout=60)
            await apply_objects(
                nc, load_file(RETAIL_CONFIG), dry_run=False, file=str(RETAIL_CONFIG)
            )

            # A continuous load; the writer is killed a third of the way in.
            chunks = [steps[i : i + 40] for i in range(0, len(steps), 40)]
            killed_at = 0.0
            for n, chunk in enumerate(chunks):
                for step in chunk:
                    body = json.dumps(step.payload).encode()
                    await js.publish_async(subjects.ingest(step.dataset), body)
                await js.publish_async_completed()
                if n == len(chunks) // 3:
                    a.kill()
                    killed_at = time.monotonic()
                await asyncio.sleep(0.05)
            await eventually(lambda: _is(b.role(), "writer"), timeout=TAKEOVER_BOUND * 2)
            result = await wait_landed(nc, 180)
            assert result.landed, f"not landed: {result.missing}"
            took = await took_over(b, killed_at)
            print(f"\ntake-over: {took:.2f}s after the SIGKILL (lease {LEASE_TTL}s)")
            assert took <= TAKEOVER_BOUND

            expected = without_segments(model(journey))
            actual = await observed(nc, b, journey_identities(journey))
            problems = differences(expected, actual)
            assert not problems, "\n".join(problems[:40])
            applied = b.rows("SELECT stream_seq FROM rt_offsets WHERE consumer = 'identity'")
            last = (await js.stream_info(subjects.STREAM_RECORDS.name)).state.last_seq
            assert applied == [(last,)], "the new writer applied every record"
        finally:
            await b.stop()
            await a.stop()


async def took_over(b: Identity, killed_at: float) -> float:
    """Seconds from the kill to the standby's take-over, from its log ("took over")."""
    log = (b.data / "identity.log").read_text()
    for line in log.splitlines():
        if '"taking over as the writer"' in line:
            at = json.loads(line)["timestamp"]
            return _wall(at) - (time.time() - (time.monotonic() - killed_at))
    raise AssertionError("the standby never took over:\n" + log[-3000:])


def _wall(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def _ready_as(p: Identity, role: str) -> bool:
    state = await p.ready()
    return state.get("ready") is True and state.get("role") == role


async def _is(role: Any, expected: str) -> bool:
    return bool(await role == expected)
