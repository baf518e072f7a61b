"""The bare pipeline's pass-through handlers, step by step with the runtime's commit and no
NATS: every event comes out at the end as one membership event, batched as the platform
batches in between."""

from __future__ import annotations

import msgspec
import pytest

from bench import passthrough
from shared import subjects
from shared.messages import MembershipChange, MembershipEvent, members_batch_decoder
from shared.runtime.harness import StepHarness

PARTITIONS = 8
_records = msgspec.msgpack.Decoder(list[bytes])
_membership = msgspec.json.Decoder(MembershipEvent)


def events(n: int) -> list[bytes]:
    return [b'{"eventType":"web.pageview","ecid":"c%d"}' % i for i in range(n)]


@pytest.mark.asyncio
async def test_ingest_forwards_a_fetch_in_messages_of_at_most_500_records() -> None:
    async with StepHarness.open(()) as h:
        sent = events(1_200)
        out = await h.run(
            passthrough.forward, [h.delivery(subjects.ingest("web"), e) for e in sent]
        )
        assert [m.subject for m in out.messages] == [subjects.RECORDS] * 3
        batches = [_records.decode(m.payload) for m in out.messages]
        assert [len(b) for b in batches] == [500, 500, 200]
        assert [r for b in batches for r in b] == sent


@pytest.mark.asyncio
async def test_a_record_keeps_its_partition_and_each_partition_gets_one_message() -> None:
    handler = passthrough.repartition(subjects.PROFILES_PREFIX, PARTITIONS)
    async with StepHarness.open(()) as h:
        sent = events(300)
        records = msgspec.msgpack.encode(sent)
        out = await h.run(handler, [h.delivery(subjects.RECORDS, records)])
        subjects_seen = [m.subject for m in out.messages]
        assert len(subjects_seen) == len(set(subjects_seen)) <= PARTITIONS
        received = []
        for m in out.messages:
            part = int(m.subject.rpartition(".")[2])
            batch = _records.decode(m.payload)
            assert all(passthrough.partition_of(r, PARTITIONS) == part for r in batch)
            received += batch
        assert sorted(received) == sorted(sent)


@pytest.mark.asyncio
async def test_every_event_ends_as_one_membership_event() -> None:
    identity = passthrough.repartition(subjects.PROFILES_PREFIX, PARTITIONS)
    profile = passthrough.repartition(subjects.CHANGES_PREFIX, PARTITIONS)
    async with StepHarness.open(()) as h:
        sent = events(700)
        stage = await h.run(passthrough.forward, [h.delivery("cdp.ingest.web", e) for e in sent])
        for handler in (identity, profile, passthrough.memberships(PARTITIONS)):
            stage = await h.run(handler, [h.delivery(m.subject, m.payload) for m in stage.messages])
        public = stage.on(subjects.membership(passthrough.SEGMENT))
        decoded = [_membership.decode(m.payload) for m in public]
        assert len(decoded) == len(sent)
        assert {e.status for e in decoded} == {"realized"}
        # The same changes, batched per partition for profile and destination.
        batched = [
            item.event
            for m in stage.on(subjects.MEMBERS_PREFIX)
            for item in members_batch_decoder.decode(m.payload).items
            if isinstance(item, MembershipChange)
        ]
        assert sorted(e.profile_id for e in batched) == sorted(e.profile_id for e in decoded)
        assert len(public) + len(stage.on(subjects.MEMBERS_PREFIX)) == len(stage.messages)
