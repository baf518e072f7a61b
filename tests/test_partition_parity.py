"""The partition a client computes (`subjects.partition_of`) is the one nats-server puts
a subject token in with a `{{partition(N,1)}}` subject transform."""

from __future__ import annotations

import uuid

import pytest
from nats.aio.client import Client
from nats.js.api import StreamConfig, SubjectTransform

from shared import subjects

pytestmark = pytest.mark.asyncio

PARTITIONS = 8


def keys() -> list[str]:
    out: list[str] = []
    for i in range(700):
        out.append(str(uuid.UUID(int=(i * 0x9E3779B97F4A7C15 + 12345) % (1 << 128))))
    for i in range(700):
        # One subject token: no dot (a profile id never has one; it is a uuid).
        out.append(f"user+{i}@example{i % 13}-com")
    words = ("zoë", "Łódź", "東京", "straße", "naïve", "🙂", "Ωmega", "çà", "ß", "ĳ")
    for i in range(600):
        out.append(f"{words[i % len(words)]}{i}{words[(i * 7) % len(words)]}")
    return out


async def test_python_and_the_server_put_every_key_in_the_same_partition(nc: Client) -> None:
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(
            name="PARITY",
            subjects=["t.*"],
            subject_transform=SubjectTransform(
                src="t.*", dest=f"p.{{{{partition({PARTITIONS},1)}}}}.{{{{wildcard(1)}}}}"
            ),
        )
    )
    ks = keys()
    assert len(set(ks)) == 2000
    for k in ks:
        await js.publish(f"t.{k}", b"")
    sub = await js.subscribe("p.>", stream="PARITY", ordered_consumer=True)
    seen: dict[str, int] = {}
    while len(seen) < len(ks):
        msg = await sub.next_msg(timeout=5)
        _, part, key = msg.subject.split(".", 2)
        seen[key] = int(part)
    await sub.unsubscribe()
    wrong = {k: (p, subjects.partition_of(k, PARTITIONS)) for k, p in seen.items()}
    wrong = {k: v for k, v in wrong.items() if v[0] != v[1]}
    assert not wrong, f"{len(wrong)} keys disagree, e.g. {list(wrong.items())[:3]}"
    assert set(seen) == set(ks)
    assert set(seen.values()) == set(range(PARTITIONS)), "every partition used"
