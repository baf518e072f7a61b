"""A test actor built on the runtime: applies numbered messages to SQLite counters.

It keeps every applied message in `applied` without a unique constraint, so applying a
message twice would show; and it emits one output per message, so a duplicate
downstream would show too. Run as a process: `python -m tests.actors.counter`.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from shared.db import Migration
from shared.runtime import ConsumerSpec, Service, Step, run_service
from shared.subjects import StreamSpec

IN_STREAM = StreamSpec("TEST_COUNT", ("test.count.*",), "test input")
OUT_STREAM = StreamSpec("TEST_OUT", ("test.out.*",), "test output", duplicate_window_s=600.0)


class Item(msgspec.Struct):
    id: int
    key: str
    n: int = 1


_decode = msgspec.json.Decoder(Item)


class CounterActor(Service):
    name = "counter"
    streams = (IN_STREAM, OUT_STREAM)
    migrations = (
        Migration(
            "counter",
            1,
            """
            CREATE TABLE applied (id INTEGER NOT NULL, key TEXT NOT NULL, seq INTEGER NOT NULL);
            CREATE TABLE totals (key TEXT PRIMARY KEY, total INTEGER NOT NULL)
            """,
        ),
    )

    def consumers(self) -> Sequence[ConsumerSpec]:
        return (ConsumerSpec("counter", IN_STREAM, self.handle),)

    async def handle(self, batch: Step) -> None:
        for d in batch.deliveries:
            item = _decode.decode(d.data)
            if item.key == "poison":
                raise ValueError(f"poison message {item.id}")
            batch.tx.add(
                "INSERT INTO applied (id, key, seq) VALUES (?, ?, ?)", (item.id, item.key, d.seq)
            )
            batch.tx.add(
                "INSERT INTO totals (key, total) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET total = total + excluded.total",
                (item.key, item.n),
            )
            batch.emit(f"test.out.{item.key}", str(item.id).encode())


if __name__ == "__main__":
    run_service(CounterActor)
