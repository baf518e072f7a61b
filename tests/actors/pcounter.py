"""A partitioned test actor: the counter of tests.actors.counter, on the partition runtime.

Input `test.pcount.<partition>` (JSON {id, key, n}), one SQLite file per partition with
`applied` (every applied message, no unique constraint: a message applied twice shows)
and `totals`; one output per applied message on `test.pout.<partition>` (its id).
Run as a process: `python -m tests.actors.pcounter` (CDP_INSTANCE names the instance).
"""

from __future__ import annotations

import msgspec

from shared.db import Migration
from shared.runtime import Step, run_service
from shared.runtime.partitions import PartitionedService
from shared.subjects import StreamSpec

IN_STREAM = StreamSpec("TEST_PCOUNT", ("test.pcount.*",), "partitioned test input")
OUT_STREAM = StreamSpec(
    "TEST_POUT", ("test.pout.*",), "partitioned test output", duplicate_window_s=600.0
)


def input_subject(partition: int) -> str:
    return f"test.pcount.{partition}"


def output_subject(partition: int) -> str:
    return f"test.pout.{partition}"


class Item(msgspec.Struct):
    id: int
    key: str
    n: int = 1


_decode = msgspec.json.Decoder(Item)


class PCounterActor(PartitionedService):
    name = "pcounter"
    streams = (IN_STREAM, OUT_STREAM)
    partition_migrations = (
        Migration(
            "pcounter",
            1,
            """
            CREATE TABLE applied (id INTEGER NOT NULL, key TEXT NOT NULL, seq INTEGER NOT NULL);
            CREATE TABLE totals (key TEXT PRIMARY KEY, total INTEGER NOT NULL)
            """,
        ),
    )

    def partition_input(self, partition: int) -> tuple[StreamSpec, str]:
        return IN_STREAM, input_subject(partition)

    def partition_output(self, partition: int) -> tuple[StreamSpec, str]:
        return OUT_STREAM, output_subject(partition)

    async def handle_partition(self, partition: int, step: Step) -> None:
        for d in step.deliveries:
            item = _decode.decode(d.data)
            step.tx.add(
                "INSERT INTO applied (id, key, seq) VALUES (?, ?, ?)", (item.id, item.key, d.seq)
            )
            step.tx.add(
                "INSERT INTO totals (key, total) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET total = total + excluded.total",
                (item.key, item.n),
            )
            step.emit(output_subject(partition), str(item.id).encode())


if __name__ == "__main__":
    run_service(PCounterActor)
