"""The ingest actor's step at the handler level: deliveries of the ingest stream in, what
it commits (the error store, the counts) and what it publishes out, with a real SQLite
and no NATS."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import pytest_asyncio
from hypothesis import given
from hypothesis import strategies as st

from services.ingest.files import Row
from services.ingest.handlers import Records
from services.ingest.records import identity_keys, payload_keys
from services.ingest.registry import Registry
from services.ingest.retention import Retention
from services.ingest.rules import Forget, Forward, Incoming, Reject, route, sort_rows, validate_rows
from services.ingest.state import IngestState
from services.ingest.store import MIGRATIONS, Store
from services.ingest.validation import Limits
from shared import subjects
from shared.messages import (
    Identity,
    PrivacyDelete,
    PrivacyReport,
    Probe,
    RecordEnvelope,
    json_encoder,
)
from shared.runtime.actor import Delivery
from shared.runtime.harness import StepHarness, StepOutput

CONFIG: dict[str, list[dict[str, Any]]] = {
    "schemas": [
        {
            "name": "crm-profile",
            "class": "profile",
            "fields": {
                "crm_id": {"type": "string", "required": True, "identity": "crm_id"},
                "email": {"type": "string", "identity": "email"},
                "age": {"type": "integer"},
            },
        }
    ],
    "datasets": [
        {"name": "crm", "schema": "crm-profile", "profile_enabled": True},
        {"name": "archive", "schema": "crm-profile"},
    ],
}
MAX_BYTES = 100_000_000


def configured(config: dict[str, list[dict[str, Any]]]) -> IngestState:
    registry = Registry()
    for kind in ("namespace", "schema", "dataset"):
        for raw in config.get(f"{kind}s", []):
            spec, _ = registry.plan(kind, raw)
            registry.put(spec)
    return IngestState(Limits(), "US", registry)


class Ingest:
    """A harness with the ingest tables and the ingest step over them."""

    def __init__(self, h: StepHarness, max_bytes: int) -> None:
        self.h = h
        self.store = Store(h.db)
        self.retention = Retention(self.store, max_age_days=30.0, max_bytes=max_bytes)
        self.step = Records(configured(CONFIG), self.retention)

    def record(self, dataset: str, value: Any, msg_id: str | None = None) -> Delivery:
        body = value if isinstance(value, bytes) else json.dumps(value).encode()
        return self.h.delivery(subjects.ingest(dataset), body, msg_id)

    def delete(self, request_id: str, namespace: str, value: str) -> Delivery:
        request = PrivacyDelete(
            request_id=request_id, identity=Identity(namespace, value), requested_at=1.0
        )
        return self.h.delivery(subjects.PRIVACY_DELETE, msgspec.json.encode(request))

    async def run(self, *deliveries: Delivery) -> StepOutput:
        return await self.h.run(self.step, list(deliveries), consumer="ingest")

    async def rows(self, sql: str) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in await self.h.db.execute_fetchall(sql)]


@pytest_asyncio.fixture
async def ingest() -> AsyncIterator[Ingest]:
    async with StepHarness.open(MIGRATIONS) as h:
        await Store(h.db).prepare()
        yield Ingest(h, MAX_BYTES)


def envelopes(out: StepOutput) -> list[RecordEnvelope]:
    return [
        msgspec.msgpack.decode(m.payload, type=RecordEnvelope) for m in out.on(subjects.RECORDS)
    ]


def forwarded(out: StepOutput) -> list[str]:
    return [r.payload["crm_id"] for e in envelopes(out) for r in e.records]


# -- records ------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_accepted_records_go_to_identity_in_order_with_their_record_ids(
    ingest: Ingest,
) -> None:
    out = await ingest.run(
        ingest.record("crm", {"crm_id": "A"}), ingest.record("crm", {"crm_id": "B"})
    )
    (envelope,) = envelopes(out)
    assert [(r.record_id, r.payload["crm_id"]) for r in envelope.records] == [
        ("r1", "A"),
        ("r2", "B"),
    ]
    assert [i.namespace for i in envelope.records[0].identities] == ["crm_id"]


@pytest.mark.asyncio
async def test_a_record_of_a_dataset_not_enabled_for_profiles_is_counted_not_forwarded(
    ingest: Ingest,
) -> None:
    out = await ingest.run(ingest.record("archive", {"crm_id": "A"}))
    assert out.messages == []
    assert await ingest.rows("SELECT dataset, accepted, rejected FROM dataset_counts") == [
        ("archive", 1, 0)
    ]


@pytest.mark.asyncio
async def test_a_rejected_record_is_kept_with_its_reason_and_not_forwarded(
    ingest: Ingest,
) -> None:
    out = await ingest.run(
        ingest.record("crm", {"crm_id": "A", "age": "old"}), ingest.record("crm", {"crm_id": "B"})
    )
    assert forwarded(out) == ["B"]
    assert await ingest.rows(
        "SELECT record_id, dataset, source, reason, path, expected FROM rejected_records"
    ) == [("r1", "crm", "nats", "wrong type", "age", "integer")]
    assert await ingest.rows("SELECT dataset, accepted, rejected FROM dataset_counts") == [
        ("crm", 1, 1)
    ]


@pytest.mark.asyncio
async def test_a_record_of_an_unknown_dataset_is_rejected_as_such(ingest: Ingest) -> None:
    out = await ingest.run(ingest.record("nowhere", {"crm_id": "A"}))
    assert out.messages == []
    assert await ingest.rows("SELECT reason FROM rejected_records") == [("unknown dataset",)]


@pytest.mark.asyncio
async def test_a_record_sent_through_the_http_door_is_rejected_with_http_as_its_source(
    ingest: Ingest,
) -> None:
    await ingest.run(ingest.record("crm", b"{oops", msg_id="http:abc:0"))
    assert await ingest.rows("SELECT source, reason FROM rejected_records") == [
        ("http", "malformed JSON")
    ]


@pytest.mark.asyncio
async def test_a_batch_delivered_again_keeps_one_copy_and_publishes_under_the_same_ids(
    ingest: Ingest,
) -> None:
    """A redelivery (the runtime skips those at or below its offset; this is the step's own
    guard): rejected records are keyed by record id, outgoing messages by the batch's last
    sequence, so the stream de-duplicates what is published again."""
    batch = [
        ingest.record("crm", {"crm_id": "A"}),
        ingest.record("crm", {"crm_id": "B", "age": "x"}),
    ]
    first = await ingest.run(*batch)
    again = await ingest.run(*batch)
    assert [m.msg_id for m in again.messages] == [m.msg_id for m in first.messages]
    assert forwarded(again) == forwarded(first) == ["A"]
    assert await ingest.rows("SELECT record_id FROM rejected_records") == [("r2",)]


# -- control messages -------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_a_probe_follows_the_records_before_it(ingest: Ingest) -> None:
    out = await ingest.run(
        ingest.record("crm", {"crm_id": "A"}),
        ingest.h.delivery(subjects.PROBE, json_encoder.encode(Probe("p1"))),
        ingest.record("crm", {"crm_id": "B"}),
    )
    shapes = [
        ([r.record_id for r in e.records], [p.probe_id for p in e.probes]) for e in envelopes(out)
    ]
    assert shapes == [(["r1"], []), ([], ["p1"]), (["r3"], [])]


@pytest.mark.asyncio
async def test_a_privacy_delete_removes_the_persons_rejected_records_passes_on_and_reports(
    ingest: Ingest,
) -> None:
    await ingest.run(
        ingest.record("nowhere", {"email": "Ann@Example.com"}),
        ingest.record("nowhere", {"email": "ann@example.com.evil"}),
    )
    out = await ingest.run(
        ingest.record("crm", {"crm_id": "A"}),
        ingest.record("nowhere", b"ann@example.com wrote this"),
        ingest.delete("d1", "email", "ANN@example.com "),
        ingest.record("nowhere", {"email": "ann@example.com"}),
    )
    shapes = [
        ([r.record_id for r in e.records], [d.request_id for d in e.deletes])
        for e in envelopes(out)
    ]
    assert shapes == [(["r3"], []), ([], ["d1"])], "the record before the delete goes first"
    (reported,) = out.on(subjects.privacy_report("d1", "ingest"))
    report = msgspec.json.decode(reported.payload, type=PrivacyReport)
    assert report.removed == {"rejected_records": 2}
    left = await ingest.rows("SELECT record_id FROM rejected_records ORDER BY record_id")
    assert left == [("r2",), ("r6",)], "a lookalike and a record after the delete stay"


@pytest.mark.asyncio
async def test_a_malformed_privacy_delete_is_ignored_and_the_batch_applied(ingest: Ingest) -> None:
    out = await ingest.run(
        ingest.h.delivery(subjects.PRIVACY_DELETE, b"{not a delete"),
        ingest.record("crm", {"crm_id": "A"}),
    )
    assert (out.handled, out.failed) == (2, 0)
    assert forwarded(out) == ["A"]


# -- retention --------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_past_its_size_limit_the_error_store_drops_its_oldest_records() -> None:
    async with StepHarness.open(MIGRATIONS) as h:
        await Store(h.db).prepare()
        small = Ingest(h, max_bytes=5_000)
        for n in range(40):
            await small.run(small.record("nowhere", {"n": n, "pad": "x" * 200}))
        kept = [
            json.loads(p)["n"] for (p,) in await small.rows("SELECT payload FROM rejected_records")
        ]
        (size,) = (await small.rows("SELECT sum(size) FROM rejected_records"))[0]
        assert size <= 5_000
        assert sorted(kept) == list(range(40 - len(kept), 40))
        assert await small.store.dropped() == 40 - len(kept)


# -- the rule alone ----------------------------------------------------------------------------
def test_the_rule_orders_effects_as_the_messages_came() -> None:
    state = configured(CONFIG)
    delete = PrivacyDelete(request_id="d", identity=Identity("crm_id", "B"), requested_at=1.0)
    messages = [
        Incoming(subjects.ingest("crm"), b'{"crm_id": "A"}', "r1"),
        Incoming(subjects.ingest("crm"), b'{"crm_id": "B", "age": "x"}', "r2"),
        Incoming(subjects.PRIVACY_DELETE, msgspec.json.encode(delete), "r3"),
    ]
    effects = route(messages, state.compiled, 1.0, "US")
    assert [type(e) for e in effects.steps] == [Reject, Forward, Forget]
    forget = effects.steps[2]
    assert isinstance(forget, Forget) and forget.pending == ["r2"] and forget.keys == ["b"]
    assert effects.counts == {"crm": (1, 1)}


def test_a_batch_files_bad_rows_are_kept_with_their_row_numbers_and_good_ones_go_on() -> None:
    found = configured(CONFIG).compiled("crm")
    assert found is not None
    rows = [
        Row(1, "flat", {"crm_id": "A", "age": "41"}, b'{"crm_id":"A","age":"41"}'),
        Row(2, "flat", {"crm_id": "B", "__error__": "row has 1 cell"}, b'{"crm_id":"B"}'),
        Row(3, "flat", {"crm_id": "C", "age": "old"}, b'{"crm_id":"C","age":"old"}'),
    ]
    records, rejected = sort_rows(
        validate_rows(rows, found[1]), batch_id="b1", dataset="crm", record_class="profile", now=1.0
    )
    assert [(r.record_id, r.batch_id, r.payload["age"]) for r in records] == [("bb1-1", "b1", 41)]
    assert [(r.record_id, r.row_number, r.source, r.reason) for r in rejected] == [
        ("bb1-2", 2, "batch", "malformed row"),
        ("bb1-3", 3, "batch", "wrong type"),
    ]


# -- the key index against its reference ----------------------------------------------------
VALUES = [
    "ann@example.com",
    "Ann@Example.com",
    " ann@example.com ",
    "ann@example.com.evil",
    "bob@example.com",
    "+1 201 555 0100",
    "(201) 555-0100",
    "+12015550100",
    "NK0016",
    "nk0016x",
]
payloads = st.one_of(
    st.builds(lambda v: json.dumps({"email": v}).encode(), st.sampled_from(VALUES)),
    st.builds(
        lambda v, w: f"from {v}; cc {w}".encode(), st.sampled_from(VALUES), st.sampled_from(VALUES)
    ),
)


@given(
    before=st.lists(payloads, max_size=6),
    same_step=st.lists(payloads, max_size=6),
    after=st.lists(payloads, max_size=3),
    target=st.sampled_from(VALUES),
)
def test_a_privacy_delete_removes_exactly_what_the_reference_finds(
    before: list[bytes], same_step: list[bytes], after: list[bytes], target: str
) -> None:
    """The delete finds stored records through the key index (filled by a trigger) and
    those rejected earlier in its step through the rule: together exactly the records whose
    payload keys hold one of the target's keys, never a record rejected after it."""
    wanted = identity_keys(target, "US")
    doomed = [p for p in before + same_step if set(payload_keys(p, "US")) & wanted]
    kept = sorted([p for p in before + same_step if p not in doomed] + after)

    async def scenario() -> tuple[list[bytes], int]:
        async with StepHarness.open(MIGRATIONS) as h:
            await Store(h.db).prepare()
            ingest = Ingest(h, MAX_BYTES)
            await ingest.run(*(ingest.record("nowhere", p) for p in before))
            out = await ingest.run(
                *(ingest.record("nowhere", p) for p in same_step),
                ingest.delete("d", "email", target),
                *(ingest.record("nowhere", p) for p in after),
            )
            (reported,) = out.on(subjects.privacy_report("d", "ingest"))
            removed = msgspec.json.decode(reported.payload, type=PrivacyReport).removed
            left = await ingest.rows("SELECT payload FROM rejected_records")
            return sorted(bytes(p) for (p,) in left), removed["rejected_records"]

    left, removed = asyncio.run(scenario())
    assert left == kept
    assert removed == len(doomed)
