"""The identity actor's steps at the handler level: records and privacy deletes delivered to
the handler, with a real SQLite and no NATS; what it stores and what it tells the profile
service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
import pytest

from services.identity.handlers import IdentityHandlers
from services.identity.store import MIGRATIONS, IdentityStore
from shared import subjects
from shared.messages import (
    Deleted,
    Fragment,
    Identity,
    Merged,
    PrivacyDelete,
    ProfileItem,
    Reassigned,
    Record,
    RecordEnvelope,
    msgpack_encoder,
    privacy_report_decoder,
    profile_batch_decoder,
)
from shared.resources import Namespace
from shared.runtime.actor import Delivery, Outgoing
from shared.runtime.harness import StepHarness

pytestmark = pytest.mark.asyncio
PARTITIONS = 4


class Identities:
    """A harness around the identity handlers, with its store."""

    def __init__(self, h: StepHarness, handlers: IdentityHandlers) -> None:
        self.h = h
        self.handlers = handlers
        self.clock = 0.0

    def record(self, *keys: str, record_id: str | None = None) -> Record:
        self.clock += 1
        return Record(
            record_id=record_id or f"r{int(self.clock)}",
            dataset="crm",
            ingested_at=self.clock,
            payload={},
            identities=[Identity(*k.split(":", 1)) for k in keys],
        )

    def delivery(self, envelope: RecordEnvelope) -> Delivery:
        return self.h.delivery(subjects.RECORDS, msgpack_encoder.encode(envelope))

    async def run(self, *deliveries: Delivery) -> list[Outgoing]:
        out = await self.h.run(self.handlers.on_records, list(deliveries), "identity")
        assert out.failed == 0, await self.h.failed()
        return out.messages

    async def nodes(self) -> dict[str, str]:
        rows = await self.h.db.execute_fetchall("SELECT key, profile_id FROM nodes")
        return {str(r[0]): str(r[1]) for r in rows}

    async def count(self, table: str) -> int:
        rows = await self.h.db.execute_fetchall(f"SELECT count(*) FROM {table}")
        return int(next(iter(rows))[0])


@asynccontextmanager
async def identities(announced_until: int = 0) -> AsyncIterator[Identities]:
    async with StepHarness.open(MIGRATIONS) as h:
        handlers = IdentityHandlers(
            IdentityStore(h.db),
            partitions=PARTITIONS,
            max_identities=50,
            phone_region="US",
            announced_until=announced_until,
        )
        yield Identities(h, handlers)


def items(messages: list[Outgoing]) -> list[ProfileItem]:
    """The items for the profile service, in the order they are published."""
    out: list[ProfileItem] = []
    for m in messages:
        if m.subject.startswith(subjects.PROFILES_PREFIX + "."):
            envelope = profile_batch_decoder.decode(m.payload)
            for item in envelope.items:
                if isinstance(item, Fragment):
                    pid = item.profile_id
                    assert m.subject == subjects.profiles(subjects.partition_of(pid, PARTITIONS))
            out += envelope.items
    return out


async def test_records_that_share_an_identity_link_into_one_profile() -> None:
    async with identities() as ids:
        messages = await ids.run(
            ids.delivery(RecordEnvelope([ids.record("crm_id:C1", "email:a@example.com")])),
            ids.delivery(RecordEnvelope([ids.record("email:a@example.com", "ecid:cookie-1")])),
        )
        fragments = [i for i in items(messages) if isinstance(i, Fragment)]
        assert [f.record.record_id for f in fragments] == ["r1", "r2"]
        assert len({f.profile_id for f in fragments}) == 1
        assert await ids.nodes() == dict.fromkeys(
            ["crm_id:C1", "email:a@example.com", "ecid:cookie-1"], fragments[0].profile_id
        )
        assert await ids.count("profiles") == 1


async def test_a_merge_is_announced_behind_both_profiles_records_and_before_later_ones() -> None:
    async with identities() as ids:
        messages = await ids.run(
            ids.delivery(RecordEnvelope([ids.record("crm_id:C1")])),
            ids.delivery(RecordEnvelope([ids.record("email:e@example.com")])),
            ids.delivery(RecordEnvelope([ids.record("crm_id:C1", "email:e@example.com")])),
            ids.delivery(RecordEnvelope([ids.record("email:e@example.com")])),
        )
        seen = items(messages)
        first, second = (
            i for i in seen if isinstance(i, Fragment) and i.record.record_id in ("r1", "r2")
        )
        assert first.profile_id != second.profile_id
        merges = [i for i in seen if isinstance(i, Merged)]
        assert merges == [Merged(first.profile_id, [second.profile_id], 3.0)]
        order = [
            i.record.record_id if isinstance(i, Fragment) else "merged"
            for i in seen
            if isinstance(i, Fragment | Merged)
        ]
        assert order.index("r1") < order.index("merged")
        assert order.index("r2") < order.index("merged")
        assert order.index("merged") < order.index("r3") < order.index("r4")
        later = [i for i in seen if isinstance(i, Fragment) and i.record.record_id in ("r3", "r4")]
        assert {f.profile_id for f in later} == {first.profile_id}
        assert set((await ids.nodes()).values()) == {first.profile_id}
        rows = await ids.h.db.execute_fetchall(
            "SELECT profile_id, folded_into FROM profiles ORDER BY created_at"
        )
        assert [tuple(r) for r in rows] == [
            (first.profile_id, None),
            (second.profile_id, first.profile_id),
        ]


async def test_a_device_that_moves_to_another_person_is_announced_between_their_records() -> None:
    async with identities() as ids:
        messages = await ids.run(
            ids.delivery(RecordEnvelope([ids.record("crm_id:C1", "ecid:tablet")])),
            ids.delivery(RecordEnvelope([ids.record("crm_id:C2", "ecid:tablet")])),
        )
        seen = [i for i in items(messages) if isinstance(i, Fragment | Reassigned)]
        assert [type(i) for i in seen] == [Fragment, Reassigned, Fragment]
        first, moved, second = seen
        assert isinstance(first, Fragment) and isinstance(second, Fragment)
        assert moved == Reassigned(
            first.profile_id, second.profile_id, [Identity("ecid", "tablet")], "moved", 2.0
        )
        assert (await ids.nodes())["ecid:tablet"] == second.profile_id


async def test_a_record_delivered_again_links_to_the_same_profile_and_changes_nothing() -> None:
    async with identities() as ids:
        record = ids.record("crm_id:C1", "email:a@example.com", "ecid:cookie-1")
        first = items(await ids.run(ids.delivery(RecordEnvelope([record]))))
        before = await ids.nodes()
        again = items(await ids.run(ids.delivery(RecordEnvelope([record]))))
        assert [type(i) for i in again] == [Fragment]
        assert isinstance(first[0], Fragment) and isinstance(again[0], Fragment)
        assert again[0].profile_id == first[0].profile_id
        assert await ids.nodes() == before
        assert await ids.count("profiles") == 1
        assert await ids.count("edges") == 2


async def test_the_same_records_give_the_same_messages_and_profile_ids_on_a_new_graph() -> None:
    """A replay after identity.db is lost: same stream positions, same profile ids, same
    message ids (so JetStream drops what it already stored)."""
    outputs = []
    for _ in range(2):
        async with identities() as ids:
            outputs.append(
                await ids.run(
                    ids.delivery(RecordEnvelope([ids.record("crm_id:C1", "ecid:c")])),
                    ids.delivery(RecordEnvelope([ids.record("crm_id:C2", "ecid:c")])),
                )
            )
    assert outputs[0] == outputs[1]


async def test_records_already_announced_are_linked_and_stored_but_not_announced_again() -> None:
    async with identities(announced_until=1) as ids:
        messages = await ids.run(
            ids.delivery(RecordEnvelope([ids.record("crm_id:C1")])),
            ids.delivery(RecordEnvelope([ids.record("crm_id:C1", "email:a@example.com")])),
        )
        assert [i.record.record_id for i in items(messages) if isinstance(i, Fragment)] == ["r2"]
        assert set(await ids.nodes()) == {"crm_id:C1", "email:a@example.com"}


async def test_a_privacy_delete_forgets_the_whole_graph_and_reports_what_it_removed() -> None:
    """The delete comes in the same fetch as the merge that folded a profile into the graph:
    the folded profile goes too, and nothing of the graph is written after the delete."""
    async with identities() as ids:
        await ids.run(ids.delivery(RecordEnvelope([ids.record("crm_id:C1", "ecid:c")])))
        request = PrivacyDelete(
            request_id="req-1", identity=Identity("email", "E@example.com"), requested_at=9.0
        )
        messages = await ids.run(
            ids.delivery(RecordEnvelope([ids.record("email:e@example.com")])),
            ids.delivery(RecordEnvelope([ids.record("crm_id:C1", "email:e@example.com")])),
            ids.delivery(RecordEnvelope([ids.record("crm_id:C2", "crm_id:C1")])),  # refused
            ids.delivery(RecordEnvelope([], deletes=[request])),
        )
        seen = items(messages)
        survivor = next(i for i in seen if isinstance(i, Merged)).profile_id
        deleted = [i for i in seen if isinstance(i, Deleted)]
        assert deleted == [Deleted([survivor], request, ["crm_id:C1", "email:e@example.com"])]
        assert isinstance(seen[-1], Deleted), "behind everything before it"
        assert await ids.nodes() == {"crm_id:C2": next(iter((await ids.nodes()).values()))}
        assert await ids.count("edges") == 0
        assert await ids.count("refused_links") == 0
        rows = await ids.h.db.execute_fetchall("SELECT profile_id FROM profiles")
        assert [r[0] for r in rows] == [(await ids.nodes())["crm_id:C2"]]
        reports = [m for m in messages if m.subject.startswith(subjects.PRIVACY_PREFIX)]
        assert [m.subject for m in reports] == [subjects.privacy_report("req-1", "identity")]
        report = privacy_report_decoder.decode(reports[0].payload)
        assert (report.service, report.profile_ids, report.removed) == (
            "identity",
            [survivor],
            {"identities": 3},
        )


async def test_a_privacy_delete_of_an_identity_no_graph_holds_still_reaches_its_records() -> None:
    async with identities() as ids:
        request = PrivacyDelete(
            request_id="req-2", identity=Identity("crm_id", "NOPE"), requested_at=1.0
        )
        messages = await ids.run(ids.delivery(RecordEnvelope([], deletes=[request])))
        assert [i for i in items(messages) if isinstance(i, Deleted)] == [
            Deleted([], request, ["crm_id:NOPE"])
        ]
        (sent,) = [m for m in messages if m.subject.startswith(subjects.PRIVACY_PREFIX)]
        assert privacy_report_decoder.decode(sent.payload).removed == {"identities": 0}


async def test_namespaces_from_the_configuration_stream_change_the_linking_once_committed() -> None:
    async with identities() as ids:
        unique_email = Namespace("email", "person", unique=True, priority=30)
        config = ids.h.delivery(
            subjects.config("namespace", "email"), msgspec.json.encode(unique_email)
        )
        out = await ids.h.run(ids.handlers.on_namespaces, [config], "identity-namespaces")
        assert out.handled == 1
        assert ids.handlers.graph.namespace("email").unique
        stored = await IdentityStore(ids.h.db).namespaces()
        assert stored == [unique_email]
        await ids.run(
            ids.delivery(RecordEnvelope([ids.record("email:a@example.com")])),
            ids.delivery(
                RecordEnvelope([ids.record("email:a@example.com", "email:b@example.com")])
            ),
        )
        nodes = await ids.nodes()
        assert nodes["email:a@example.com"] != nodes["email:b@example.com"], "refused: unique"
        assert await ids.count("refused_links") == 1
