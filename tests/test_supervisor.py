"""Exactly once across crashes: SIGKILL an actor process mid-stream, the supervisor
restarts it, and every message is applied once to its SQLite state and emitted once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
from pathlib import Path

import pytest
from nats.aio.client import Client

from ops.natsd import NatsServer, free_port
from ops.supervisor import ProcessSpec, Supervisor
from tests.helpers import eventually

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
TOTAL = 20_000


def count(db: Path, sql: str) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return int(conn.execute(sql).fetchone()[0])
    except sqlite3.OperationalError:  # table not created yet
        return 0


@pytest.mark.timeout(180)
async def test_sigkill_midstream_applies_every_message_exactly_once(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    db = tmp_path / "counter.db"
    spec = ProcessSpec(
        "counter",
        [sys.executable, "-m", "tests.actors.counter"],
        env={
            "CDP_NATS_URL": nats_server.url,
            "CDP_DATA_DIR": str(tmp_path),
            "CDP_COUNTER_PORT": str(free_port()),
            "CDP_FETCH_BATCH": "50",
            "CDP_LOG_FORMAT": "json",
            "PYTHONPATH": str(ROOT),
        },
        log_file=tmp_path / "counter.log",
    )
    sup = Supervisor([spec], backoff_initial=0.2)
    await sup.start()
    try:
        js = nc.jetstream()
        await eventually(lambda: _has_stream(nc, "TEST_COUNT"), timeout=30)

        async def produce() -> None:
            for i in range(TOTAL):
                await js.publish(
                    f"test.count.k{i % 7}", json.dumps({"id": i, "key": f"k{i % 7}"}).encode()
                )

        producer = asyncio.create_task(produce())
        applied = "SELECT count(*) FROM applied"
        for kills, threshold in enumerate((TOTAL // 4, TOTAL // 2), start=1):

            async def reached(t: int = threshold) -> bool:
                return count(db, applied) >= t

            async def restarted(k: int = kills) -> bool:
                return sup.starts("counter") == k + 1

            await eventually(reached, timeout=60)
            pid = sup.pid("counter")
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            await eventually(restarted, timeout=30)
        await producer
        await eventually(lambda: _true(count(db, applied) >= TOTAL), timeout=90)
        await eventually(lambda: _stream_at_least(nc, "TEST_OUT", TOTAL), timeout=30)
        await asyncio.sleep(0.5)  # anything applied twice would land by now

        assert count(db, applied) == TOTAL
        assert count(db, "SELECT count(DISTINCT id) FROM applied") == TOTAL
        assert count(db, "SELECT sum(total) FROM totals") == TOTAL
        out = await js.stream_info("TEST_OUT")
        assert out.state.messages == TOTAL, "an output was emitted twice or lost"
        assert sup.starts("counter") == 3
    finally:
        codes = await sup.stop()
    assert codes["counter"] == 0, (tmp_path / "counter.log").read_text()[-3000:]


async def _true(value: bool) -> bool:
    return value


async def _has_stream(nc: Client, name: str) -> bool:
    try:
        await nc.jetstream().stream_info(name)
    except Exception:
        return False
    return True


async def _stream_at_least(nc: Client, name: str, n: int) -> bool:
    return bool((await nc.jetstream().stream_info(name)).state.messages >= n)
