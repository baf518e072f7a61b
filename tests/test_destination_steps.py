"""The destination's actor steps on deliveries, with a real SQLite and no NATS: what each
step queues for delivery, what it publishes, and what it remembers."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import msgspec
import pytest
import pytest_asyncio
import structlog

from services.destination.exporter import Exporter
from services.destination.handlers import Handlers
from services.destination.model import Activation
from services.destination.state import State
from services.destination.store import MIGRATIONS, DestinationStore
from shared import subjects
from shared.admin import ExportResult, ExportRun, JobInfo, PublishedSegment
from shared.config import Settings
from shared.messages import (
    ChangeEnvelope,
    ChangeItem,
    Identity,
    MembershipChange,
    MembershipEnvelope,
    MembershipEvent,
    MembershipItem,
    PrivacyDelete,
    PrivacyReport,
    Probe,
    ProfileChanged,
    ProfileDeleted,
    msgpack_encoder,
    probe_report_decoder,
)
from shared.resources import Destination
from shared.runtime.actor import Delivery
from shared.runtime.harness import StepHarness

pytestmark = pytest.mark.asyncio
_json = msgspec.json.Encoder()
HOOK = msgspec.convert(
    {"name": "hook", "type": "webhook", "segments": ["vip"], "connection": {"url": "x"}},
    Destination,
)
FILE = msgspec.convert(
    {
        "name": "crm-file",
        "type": "file",
        "segments": ["vip"],
        "export": {"folder": "exports", "schedule": "after_segmentation"},
    },
    Destination,
)


class Destinations:
    """The steps of one destination service, and what they asked the worker to wake."""

    def __init__(self, h: StepHarness, data_dir: Path) -> None:
        self.h = h
        self.store = DestinationStore(h.db)
        self.state = State()
        self.woken: list[str] = []
        settings = Settings(service="destination", data_dir=data_dir)
        log = structlog.get_logger()
        self.handlers = Handlers(
            self.store, self.state, Exporter(self.store, settings, log), self.wake, log
        )
        for dest in (HOOK, FILE):
            self.state.put_destination(dest)

    def wake(self, names: Iterable[str]) -> None:
        self.woken += sorted(names)

    async def queued(self) -> list[tuple[str, str, str]]:
        rows = await self.h.db.execute_fetchall(
            "SELECT destination, segment, profile_id FROM queue ORDER BY id"
        )
        return [(str(r[0]), str(r[1]), str(r[2])) for r in rows]


@pytest_asyncio.fixture
async def dest(tmp_path: Path) -> AsyncIterator[Destinations]:
    async with StepHarness.open(MIGRATIONS) as h:
        yield Destinations(h, tmp_path)


def joined(
    pid: str, at: float = 100.0, segment: str = "vip", status: str = "realized"
) -> MembershipChange:
    event = MembershipEvent(
        profile_id=pid,
        segment=segment,
        status=status,
        at=at,
        method="streaming",
        identities=[Identity("email", f"{pid}@example.com")],
    )
    return MembershipChange(event)


def members(h: StepHarness, *batch: MembershipItem, partition: int = 0) -> Delivery:
    envelope = MembershipEnvelope(list(batch))
    return h.delivery(subjects.members(partition), msgpack_encoder.encode(envelope))


async def test_a_membership_change_for_a_streaming_destination_queues_one_delivery(
    dest: Destinations,
) -> None:
    h = dest.h
    await h.run(dest.handlers.memberships, [members(h, joined("p1"))])
    assert await dest.queued() == [("hook", "vip", "p1")]
    assert dest.woken == ["hook"]


async def test_a_change_delivered_again_queues_nothing_new(dest: Destinations) -> None:
    h = dest.h
    change = joined("p1")
    await h.run(dest.handlers.memberships, [members(h, change)])
    await h.run(
        dest.handlers.memberships,
        [
            members(h, change),
            members(h, change),
        ],
    )
    assert await dest.queued() == [("hook", "vip", "p1")]


async def test_a_later_change_of_the_same_member_is_queued(dest: Destinations) -> None:
    h = dest.h
    await h.run(
        dest.handlers.memberships,
        [
            members(h, joined("p1", at=100.0)),
            members(h, joined("p1", at=200.0)),
        ],
    )
    assert await dest.queued() == [("hook", "vip", "p1"), ("hook", "vip", "p1")]


async def test_a_change_of_a_segment_no_destination_activates_queues_nothing(
    dest: Destinations,
) -> None:
    h = dest.h
    change = joined("p1", segment="other")
    await h.run(dest.handlers.memberships, [members(h, change)])
    assert await dest.queued() == []
    assert dest.woken == []


async def test_a_deleted_segment_stops_deliveries(dest: Destinations) -> None:
    h = dest.h
    await h.run(dest.handlers.memberships, [members(h, joined("p1"))])
    gone = _json.encode(PublishedSegment(name="vip", deleted=True))
    await h.run(dest.handlers.segments, [h.delivery(subjects.config("segment", "vip"), gone)])
    assert await dest.queued() == []
    await h.run(dest.handlers.memberships, [members(h, joined("p2"))])
    assert await dest.queued() == []


async def test_a_published_segment_is_remembered_with_its_metadata(dest: Destinations) -> None:
    h = dest.h
    seg = PublishedSegment(name="vip", description="big spenders", method="streaming")
    await h.run(
        dest.handlers.segments, [h.delivery(subjects.config("segment", "vip"), _json.encode(seg))]
    )
    assert dest.state.meta("vip").description == "big spenders"
    assert [(r.name, r.deleted) for r in await dest.store.segments()] == [("vip", 0)]


async def test_an_export_run_request_publishes_one_done_event(dest: Destinations) -> None:
    h = dest.h
    request = _json.encode(ExportRun("crm-file", job_id="job-1"))
    out = await h.run(dest.handlers.jobs, [h.delivery(subjects.export_run("crm-file"), request)])
    done = [msgspec.json.decode(m.payload, type=ExportResult) for m in out.messages]
    assert [m.subject for m in out.messages] == [subjects.export_done("crm-file")]
    assert [(r.job_id, r.status, r.destination) for r in done] == [
        ("job-1", "succeeded", "crm-file")
    ]


async def test_an_export_run_delivered_again_runs_once(dest: Destinations) -> None:
    h = dest.h
    request = _json.encode(ExportRun("crm-file", job_id="job-1"))
    await h.run(dest.handlers.jobs, [h.delivery(subjects.export_run("crm-file"), request)])
    again = await h.run(dest.handlers.jobs, [h.delivery(subjects.export_run("crm-file"), request)])
    assert again.messages == []
    assert [r.job_id for _, r in await dest.store.exports(10)] == ["job-1"]


async def test_an_export_of_an_unknown_destination_publishes_a_failed_result(
    dest: Destinations,
) -> None:
    h = dest.h
    request = _json.encode(ExportRun("nowhere", job_id="job-2"))
    out = await h.run(dest.handlers.jobs, [h.delivery(subjects.export_run("nowhere"), request)])
    done = [msgspec.json.decode(m.payload, type=ExportResult) for m in out.messages]
    assert [(r.destination, r.status) for r in done] == [("nowhere", "failed")]


async def test_a_segmentation_job_that_succeeded_runs_the_exports_after_segmentation_once(
    dest: Destinations,
) -> None:
    h = dest.h
    info = JobInfo(
        job_id="seg-1", kind="segmentation", trigger="manual", status="succeeded", started_at=1.0
    )
    done = h.delivery(subjects.SEGMENTATION_JOB_DONE, _json.encode(info))
    out = await h.run(dest.handlers.jobs, [done])
    assert [m.subject for m in out.messages] == [subjects.export_done("crm-file")]
    again = h.delivery(subjects.SEGMENTATION_JOB_DONE, _json.encode(info))
    assert (await h.run(dest.handlers.jobs, [again])).messages == []


async def test_a_segmentation_job_that_failed_runs_no_export(dest: Destinations) -> None:
    h = dest.h
    info = JobInfo(
        job_id="seg-2", kind="segmentation", trigger="manual", status="failed", started_at=1.0
    )
    out = await h.run(
        dest.handlers.jobs, [h.delivery(subjects.SEGMENTATION_JOB_DONE, _json.encode(info))]
    )
    assert out.messages == []
    assert await dest.store.exports(10) == []


async def test_a_privacy_delete_queues_the_persons_exits_and_reports_what_went(
    dest: Destinations,
) -> None:
    h = dest.h
    await h.run(dest.handlers.memberships, [members(h, joined("p1"))])
    request = PrivacyDelete(
        request_id="r1", identity=Identity("email", "p1@example.com"), requested_at=1.0
    )
    deleted = ProfileDeleted(profile_ids=["p1"], request=request)
    out = await h.run(dest.handlers.memberships, [members(h, deleted)])
    rows = await h.db.execute_fetchall("SELECT payload FROM queue ORDER BY id")
    statuses = [msgspec.msgpack.decode(r[0], type=Activation).status for r in rows]
    assert statuses == ["realized", "exited"]
    reports = [msgspec.json.decode(m.payload, type=PrivacyReport) for m in out.messages]
    assert [(r.service, r.removed) for r in reports] == [
        ("destination", {"memberships": 1, "profiles": 0})
    ]
    assert await h.db.execute_fetchall("SELECT * FROM memberships") == []


async def test_an_envelope_of_many_changes_queues_each_in_order(dest: Destinations) -> None:
    h = dest.h
    burst = [joined(f"p{i}", at=100.0 + i) for i in range(50)]
    await h.run(
        dest.handlers.memberships,
        [members(h, *burst[:20], partition=1), members(h, *burst[20:], partition=3)],
    )
    assert await dest.queued() == [("hook", "vip", f"p{i}") for i in range(50)]
    assert dest.woken == ["hook"]


async def test_a_privacy_delete_behind_a_realization_in_the_same_step_sends_its_exit(
    dest: Destinations,
) -> None:
    """The realization is not committed when the delete comes: its exit is sent all the
    same, behind it, and nothing of the person is left."""
    h = dest.h
    request = PrivacyDelete(
        request_id="r2", identity=Identity("email", "p1@example.com"), requested_at=1.0
    )
    deleted = ProfileDeleted(profile_ids=["p1"], request=request)
    await h.run(dest.handlers.memberships, [members(h, joined("p1"), joined("p2"), deleted)])
    rows = await h.db.execute_fetchall("SELECT payload FROM queue ORDER BY id")
    sent = [msgspec.msgpack.decode(r[0], type=Activation) for r in rows]
    assert [(a.profile_id, a.status) for a in sent] == [
        ("p1", "realized"),
        ("p2", "realized"),
        ("p1", "exited"),
    ]
    left = await h.db.execute_fetchall("SELECT profile_id FROM memberships")
    assert [tuple(r) for r in left] == [("p2",)]


async def test_a_change_after_a_privacy_delete_in_the_same_envelope_is_queued(
    dest: Destinations,
) -> None:
    h = dest.h
    await h.run(dest.handlers.memberships, [members(h, joined("p1"))])
    request = PrivacyDelete(
        request_id="r3", identity=Identity("email", "p1@example.com"), requested_at=1.0
    )
    deleted = ProfileDeleted(profile_ids=["p1"], request=request)
    await h.run(dest.handlers.memberships, [members(h, deleted, joined("p3"))])
    assert await dest.queued() == [
        ("hook", "vip", "p1"),  # realized
        ("hook", "vip", "p1"),  # exited: the delete
        ("hook", "vip", "p3"),
    ]


async def test_an_envelope_reports_its_probe_as_the_destination_stage(dest: Destinations) -> None:
    h = dest.h
    probe = Probe("pr9", partition=1, partitions=4)
    out = await h.run(dest.handlers.memberships, [members(h, joined("p1"), probe, partition=1)])
    assert await dest.queued() == [("hook", "vip", "p1")]
    reports = [probe_report_decoder.decode(payload) for _, payload in out.notes]
    assert [(r.probe_id, r.stage, r.partition) for r in reports] == [("pr9", "destination", 1)]


async def test_a_change_that_carries_events_only_keeps_the_profile_view(
    dest: Destinations,
) -> None:
    """The profile's view arrives with its first change; a later change that carries
    only events (`same_view`), in the same step and in the next, leaves it as it was."""
    view = ProfileChanged(
        "p1",
        ["c1"],
        100.0,
        attributes={"first_name": "Ada"},
        identities=[Identity("email", "ada@example.com")],
    )
    events_only = ProfileChanged("p1", ["e1"], 101.0, same_view=True)

    def changes(*items: ChangeItem) -> Delivery:
        return dest.h.delivery(
            subjects.changes(0), msgpack_encoder.encode(ChangeEnvelope(list(items)))
        )

    await dest.h.run(dest.handlers.profiles, [changes(view, events_only)])
    await dest.h.run(dest.handlers.profiles, [changes(events_only)])
    held = (await dest.store.views(["p1"]))["p1"]
    assert (held.attributes, held.identities) == (
        {"first_name": "Ada"},
        [Identity("email", "ada@example.com")],
    )


async def test_profiles_not_activated_are_counted_by_reason(dest: Destinations) -> None:
    h = dest.h
    phones = msgspec.convert(
        {
            "name": "phones",
            "type": "webhook",
            "segments": ["vip"],
            "connection": {"url": "x"},
            "identity": "phone",
        },
        Destination,
    )
    consenting = msgspec.convert(
        {
            "name": "consenting",
            "type": "webhook",
            "segments": ["vip"],
            "connection": {"url": "x"},
            "consent": {"path": "consents.sms", "allow": ["y"]},
        },
        Destination,
    )
    dest.state.put_destination(phones)
    dest.state.put_destination(consenting)
    await h.run(dest.handlers.memberships, [members(h, joined("p1"), joined("p2"))])
    # p1 and p2 have an email only, and no consent attribute.
    assert await dest.store.exclusions() == {
        "consenting": {"no_consent": 2},
        "phones": {"missing_identity": 2},
    }
    stats = await dest.store.stats()
    assert (stats["phones"].skipped, stats["consenting"].skipped) == (2, 2)
    assert [q for q in await dest.queued() if q[0] != "hook"] == []
    # An exit goes to a destination whatever the consent: nothing more excluded there.
    await h.run(dest.handlers.memberships, [members(h, joined("p1", 200.0, status="exited"))])
    assert (await dest.store.exclusions())["consenting"] == {"no_consent": 2}
    assert (await dest.store.exclusions())["phones"] == {"missing_identity": 3}


async def test_an_export_lists_the_files_it_wrote_newest_first(dest: Destinations) -> None:
    h = dest.h
    await h.run(dest.handlers.memberships, [members(h, joined("p1"), joined("p2"))])
    first = _json.encode(ExportRun("crm-file", job_id="job-1"))
    out = await h.run(dest.handlers.jobs, [h.delivery(subjects.export_run("crm-file"), first)])
    [done] = [msgspec.json.decode(m.payload, type=ExportResult) for m in out.messages]
    [listed] = (await dest.store.export_files())["crm-file"]
    path = Path(done.files[0])
    size = await asyncio.to_thread(os.path.getsize, path)
    assert (listed.name, listed.rows, listed.bytes) == (path.name, 2, size)
    assert listed.created_at >= done.started_at
    assert done.excluded == {} and (await dest.store.exclusions()) == {}
    await h.run(dest.handlers.memberships, [members(h, joined("p3"))])
    again = _json.encode(ExportRun("crm-file", job_id="job-2"))
    out = await h.run(dest.handlers.jobs, [h.delivery(subjects.export_run("crm-file"), again)])
    [later] = [msgspec.json.decode(m.payload, type=ExportResult) for m in out.messages]
    files = (await dest.store.export_files())["crm-file"]
    if Path(later.files[0]).name == path.name:  # the same second: the same name, replaced
        assert [(f.name, f.rows) for f in files] == [(path.name, 3)]
    else:
        assert [(f.name, f.rows) for f in files] == [(Path(later.files[0]).name, 3), (path.name, 2)]
