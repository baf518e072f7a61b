"""The replay contract: a standby applies an active instance's input silently, never its
last published step; on take-over it replays exactly that step, so what the other had
published of it is dropped as duplicate and what it had not is published once."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import pytest
from nats.aio.client import Client

from ops.natsd import NatsServer
from shared.runtime import ConsumerSpec
from shared.runtime.actor import StepRef, last_step, step_of
from tests.actors.counter import OUT_STREAM, CounterActor
from tests.helpers import eventually, settings_for


class StandbyCounter(CounterActor):
    """The counter actor as a second instance: its own durable, following the output."""

    def consumers(self) -> Sequence[ConsumerSpec]:
        return [dataclasses.replace(s, durable="counter-b") for s in super().consumers()]

    def standby_of(self, spec: ConsumerSpec) -> Callable[[], Awaitable[StepRef | None]] | None:
        return lambda: last_step(self.js, OUT_STREAM.name, spec.name)


def rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return list(conn.execute(sql))


async def publish(nc: Client, ids: range) -> None:
    js = nc.jetstream()
    for i in ids:
        await js.publish("test.count.k", json.dumps({"id": i, "key": "k"}).encode())


async def out(nc: Client) -> list[tuple[str, int]]:
    js = nc.jetstream()
    info = await js.stream_info(OUT_STREAM.name)
    msgs = [
        await js.get_msg(OUT_STREAM.name, seq)
        for seq in range(info.state.first_seq, info.state.last_seq + 1)
    ]
    return [((m.headers or {}).get("Nats-Msg-Id", ""), int(m.data or b"-1")) for m in msgs]


def test_a_message_id_names_its_step() -> None:
    assert StepRef("identity", 31, 40).msg_id(2) == "identity:31-40:2"
    assert step_of("identity:31-40:2") == StepRef("identity", 31, 40)
    assert step_of("job-run:abc") is None and step_of(None) is None
    assert step_of("http:abc:0") is None


@pytest.mark.asyncio
async def test_the_standby_replays_the_last_step_exactly_and_nothing_is_published_twice(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    # The active instance applied and published ids 0..29 (seqs 1..30), in steps of 8.
    active = CounterActor(settings_for("counter", nats_server.url, tmp_path / "a", fetch_batch=8))
    await active.start()
    try:
        await publish(nc, range(30))
        await eventually(lambda: _true(active.runners[0].offset == 30))
        await eventually(lambda: _len(nc, 30))
    finally:
        await active.stop()
    # ... then its next step, seqs 31..40, was committed and only 3 of its 10 outputs
    # published before it died (published here by hand, as it would have: same ids).
    await publish(nc, range(30, 40))
    js = nc.jetstream()
    dying = StepRef("counter", 31, 40)
    for n in range(3):
        await js.publish(
            "test.out.k", str(30 + n).encode(), headers={"Nats-Msg-Id": dying.msg_id(n)}
        )

    standby = StandbyCounter(
        settings_for("counter", nats_server.url, tmp_path / "b", fetch_batch=5)
    )
    await standby.start()
    try:
        runner = standby.runners[0]
        assert runner.following
        await eventually(lambda: _true(runner.offset == 30))
        assert await out(nc) == (await out(nc))[:33] and len(await out(nc)) == 33, (
            "the standby published nothing"
        )
        last = await last_step(js, OUT_STREAM.name, "counter")
        assert last == dying
        await standby.take_over("counter", last)
        await eventually(lambda: _true(runner.offset == 40 and not runner.following))
        await eventually(lambda: _len(nc, 40))
        await publish(nc, range(40, 45))
        await eventually(lambda: _len(nc, 45))
        published = await out(nc)
        assert [i for _, i in published] == list(range(45)), "each output once, in order"
        assert [m for m, _ in published[30:40]] == [dying.msg_id(n) for n in range(10)]
        db = standby.settings.db_path
        assert rows(db, "SELECT count(*), count(DISTINCT id) FROM applied") == [(45, 45)]
        assert rows(db, "SELECT total FROM totals") == [(45,)]
    finally:
        await standby.stop()


async def _true(value: bool) -> bool:
    return value


async def _len(nc: Client, n: int) -> bool:
    info = await nc.jetstream().stream_info(OUT_STREAM.name)
    return int(info.state.messages) == n
