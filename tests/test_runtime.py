"""The actor runtime against a real nats-server and real SQLite files."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from nats.aio.client import Client

from ops.natsd import NatsServer
from tests.actors.counter import CounterActor
from tests.helpers import eventually, settings_for

pytestmark = pytest.mark.asyncio


def rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return list(conn.execute(sql))


def applied_count(db: Path) -> int:
    (count,) = rows(db, "SELECT count(*) FROM applied")[0]
    assert isinstance(count, int)
    return count


async def publish_items(nc: Client, ids: range, key: str = "k") -> None:
    js = nc.jetstream()
    for i in ids:
        await js.publish(f"test.count.{key}", json.dumps({"id": i, "key": key}).encode())


async def out_ids(nc: Client) -> list[int]:
    """Every message in the TEST_OUT stream, read by sequence."""
    js = nc.jetstream()
    info = await js.stream_info("TEST_OUT")
    msgs = await asyncio.gather(
        *(
            js.get_msg("TEST_OUT", seq)
            for seq in range(info.state.first_seq, info.state.last_seq + 1)
        )
    )
    return [int(m.data or b"-1") for m in msgs]


@pytest_asyncio.fixture
async def actor(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[CounterActor]:
    svc = CounterActor(settings_for("counter", nats_server.url, tmp_path, fetch_batch=64))
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()


async def test_every_message_applied_once_and_emitted_once(actor: CounterActor, nc: Client) -> None:
    await publish_items(nc, range(2000))
    db = actor.settings.db_path
    await eventually(lambda: _async(applied_count(db) == 2000))
    assert rows(db, "SELECT total FROM totals WHERE key = 'k'") == [(2000,)]
    assert rows(db, "SELECT count(DISTINCT id) FROM applied") == [(2000,)]
    await eventually(lambda: _stream_count(nc, "TEST_OUT", 2000))
    assert sorted(await out_ids(nc)) == list(range(2000))


async def test_a_lone_message_is_not_held_back_for_a_full_batch(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    # The fetch waits up to 60 s for a full batch of 256; one message must still go through.
    svc = CounterActor(settings_for("counter", nats_server.url, tmp_path))
    svc_spec_wait = 60.0
    await svc.start()
    try:
        assert all(r.spec.max_wait <= svc_spec_wait for r in svc.runners)
        await publish_items(nc, range(1))
        await eventually(lambda: _async(applied_count(svc.settings.db_path) == 1), timeout=3)
    finally:
        await svc.stop()


async def test_restart_resumes_after_the_committed_offset(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    settings = settings_for("counter", nats_server.url, tmp_path, fetch_batch=16)
    first = CounterActor(settings)
    await first.start()
    await publish_items(nc, range(500))
    await eventually(lambda: _async(applied_count(settings.db_path) >= 100))
    await first.stop()  # mid-stream: the batch in flight finishes, the rest waits
    stopped_at = applied_count(settings.db_path)
    await publish_items(nc, range(500, 1000))
    second = CounterActor(settings)
    await second.start()
    try:
        await eventually(lambda: _async(applied_count(settings.db_path) == 1000))
        assert stopped_at < 1000
        assert rows(settings.db_path, "SELECT count(DISTINCT id) FROM applied") == [(1000,)]
        await eventually(lambda: _stream_count(nc, "TEST_OUT", 1000))
        assert sorted(await out_ids(nc)) == list(range(1000))
    finally:
        await second.stop()


async def test_a_failing_message_is_kept_and_the_rest_applied_in_order(
    actor: CounterActor, nc: Client
) -> None:
    js = nc.jetstream()
    await publish_items(nc, range(10))
    await js.publish("test.count.poison", json.dumps({"id": 10, "key": "poison"}).encode())
    await publish_items(nc, range(11, 20))
    db = actor.settings.db_path
    await eventually(lambda: _async(applied_count(db) == 19))
    assert [r[0] for r in rows(db, "SELECT id FROM applied ORDER BY seq")] == [
        *range(10),
        *range(11, 20),
    ]
    failed = rows(db, "SELECT subject, error FROM rt_failed")
    assert failed == [("test.count.poison", "ValueError: poison message 10")]
    text = await _metrics(actor)
    assert 'cdp_messages_failed_total{consumer="counter",service="counter"} 1.0' in text


async def test_health_endpoints(actor: CounterActor, nats_server: NatsServer) -> None:
    base = f"http://127.0.0.1:{actor.health.port}"
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/healthz") as r:
            body = await r.json()
            assert r.status == 200
            assert body["service"] == "counter"
            assert body["version"]
            assert body["uptime_s"] >= 0
        async with s.get(f"{base}/readyz") as r:
            assert r.status == 200
            assert (await r.json())["ready"] is True
        async with s.get(f"{base}/metrics") as r:
            text = await r.text()
            assert "cdp_handler_latency_seconds" in text
            assert "cdp_consumer_lag" in text
        nats_server.kill()
        await eventually(lambda: _not_ready(s, base), timeout=10)
        async with s.get(f"{base}/readyz") as r:
            body = await r.json()
            assert r.status == 503
            assert "nats" in body["reason"]


async def test_not_ready_until_started(nats_server: NatsServer, tmp_path: Path) -> None:
    svc = CounterActor(settings_for("counter", "nats://127.0.0.1:1", tmp_path))
    starting = asyncio.create_task(svc.start())  # NATS unreachable: start keeps trying
    try:
        await eventually(lambda: _async(svc.health.port != 0 and svc.health._runner is not None))
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"http://127.0.0.1:{svc.health.port}/readyz") as r,
        ):
            assert r.status == 503
            assert "connecting to NATS" in (await r.json())["reason"]
    finally:
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        await svc.stop()


async def test_stop_is_idempotent(actor: CounterActor) -> None:
    await actor.stop()
    await actor.stop()
    assert not actor.ready


# -- helpers -------------------------------------------------------------------
async def _async(value: bool) -> bool:
    return value


async def _stream_count(nc: Client, stream: str, n: int) -> bool:
    info = await nc.jetstream().stream_info(stream)
    return bool(info.state.messages >= n)


async def _not_ready(s: aiohttp.ClientSession, base: str) -> bool:
    async with s.get(f"{base}/readyz") as r:
        return r.status == 503


async def _metrics(svc: CounterActor) -> str:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{svc.health.port}/metrics") as r,
    ):
        return await r.text()
