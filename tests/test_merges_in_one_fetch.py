"""Merges, moves and deletes met in one fetch, or in any interleaving of partitions and
fetch boundaries, each written as the user would see it (found reviewing the ordering
contract; each failed before its fix).

Where a case needs two items in one fetch of a service, the test stops that service,
lets the items queue up in its stream, and starts it again: its first fetch then takes
everything pending at once, as a busy consumer does under a burst.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import pytest_asyncio
from nats.aio.client import Client
from nats.aio.msg import Msg

from ops.cli import people
from ops.cli.check import check
from ops.cli.ingest import run_batch
from ops.natsd import NatsServer
from services.destination.service import DestinationService
from services.identity.service import IdentityService
from services.segmentation.service import SegmentationService
from shared import admin, subjects
from shared.admin import ApplyMany, ApplyManyResult, ConfigObject, JobInfo, JobList, JobRun
from shared.messages import (
    ChangeEnvelope,
    ChangeItem,
    ExperienceEvent,
    Identity,
    MembershipEnvelope,
    MembershipEvent,
    PrivacyDelete,
    ProfileChanged,
    ProfileDeleted,
    ProfileMerged,
    Recheck,
    msgpack_encoder,
)
from shared.runtime import Service
from tests.helpers import eventually, running, settings_for
from tests.test_merges import (
    CLASSES,
    SEGMENTS,
    crm,
    ingest,
    iso,
    landed,
    login,
    profile_of,
    two_cards,
    view,
    write_file,
)

pytestmark = pytest.mark.asyncio

EVER_VIEWED = "ever-viewed"
"""A batch segment (an event condition without a window)."""


# -- helpers -------------------------------------------------------------------------------------
@pytest_asyncio.fixture
async def platform(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> AsyncIterator[dict[str, Service]]:
    """The platform of tests/test_merges.py: five services in-process, the retail example,
    two streaming segments."""
    async with running(CLASSES, nats_server.url, tmp_path / "data", nc) as services:
        for name, expression in SEGMENTS.items():
            await apply_segment(nc, name, expression)
        yield services


def rows(tmp_path: Path, db: str, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with sqlite3.connect(tmp_path / "data" / db) as conn:
        return [tuple(r) for r in conn.execute(sql, args).fetchall()]


async def until(check_: Callable[[], bool], timeout: float = 30.0) -> None:
    async def ok() -> bool:
        return check_()

    await eventually(ok, timeout=timeout)


async def restart(
    services: dict[str, Service], cls: type[Service], nats_url: str, data_dir: Path
) -> None:
    """Start a fresh instance of a stopped service on the same data (its consumer resumes
    from the committed offset and takes whatever queued up in one fetch)."""
    svc = cls(settings_for(cls.name, nats_url, data_dir))
    services[cls.name] = svc
    await svc.start()


async def send_file(
    nc: Client, tmp_path: Path, dataset: str, records: list[dict[str, Any]]
) -> None:
    """A batch file through ingest, without waiting for the later stages (one is stopped)."""
    path = write_file(tmp_path / "files", dataset, records)
    info = await run_batch(nc, dataset, path, "jsonl", lambda _: None, timeout=60)
    assert info.status == "success", info


async def apply_segment(nc: Client, name: str, expression: str) -> None:
    result = await admin.request(
        nc,
        subjects.admin("segmentation", "apply"),
        ApplyMany([ConfigObject("segment", {"name": name, "expression": expression})]),
        ApplyManyResult,
    )
    assert not getattr(result, "errors", None), result


async def run_job(nc: Client) -> None:
    job = await admin.request(
        nc, subjects.admin("segmentation", "job.run"), JobRun(), JobInfo, timeout=30.0
    )

    async def done() -> bool:
        jobs = await admin.request(
            nc, subjects.admin("segmentation", "jobs"), admin.ListRequest(), JobList
        )
        return any(j.job_id == job.job_id and j.status == "succeeded" for j in jobs.jobs)

    await eventually(done, timeout=30.0)
    await landed(nc)


def profile_id_of(tmp_path: Path, identity: str) -> str:
    ns, value = identity.split(":", 1)
    found = rows(
        tmp_path,
        "profile.db",
        "SELECT profile_id FROM identities WHERE namespace = ? AND value = ?",
        (ns, value),
    )
    assert found, identity
    return str(found[0][0])


def folded_into(tmp_path: Path, profile_id: str) -> str | None:
    got = rows(
        tmp_path,
        "profile.db",
        "SELECT folded_into FROM profiles WHERE profile_id = ?",
        (profile_id,),
    )
    return None if not got else got[0][0]


# -- profile: a privacy delete after a split -----------------------------------------------------
APP_SCHEMA = {
    "name": "app-profile",
    "class": "profile",
    "timestamp_field": "updated_at",
    "fields": {
        "crm_id": {"type": "string", "identity": "crm_id"},
        "email": {"type": "string", "identity": "email"},
        "ecid": {"type": "string", "identity": "ecid"},
        "prefs": {"type": "object", "fields": {"newsletter": {"type": "string"}}},
        "updated_at": {"type": "datetime"},
    },
}


async def test_a_delete_reaches_attributes_left_behind_when_their_person_split_off(
    platform: dict[str, Service], nc: Client, tmp_path: Path
) -> None:
    """k@example.com signs up for the newsletter in the app on the family tablet; C1 and
    then C2 sign in on the tablet, which goes to C2 and splits k off C1 (the signup's
    attributes stay with C1, as the rules say). `cdp delete email:k@example.com` removes
    them from C1 too: they came from a record anchored on k."""
    await admin.request(
        nc,
        subjects.admin("ingest", "apply"),
        ApplyMany(
            [
                ConfigObject("schema", APP_SCHEMA),
                ConfigObject(
                    "dataset", {"name": "app", "schema": "app-profile", "profile_enabled": True}
                ),
            ]
        ),
        ApplyManyResult,
    )
    await ingest(
        nc,
        tmp_path,
        "app",
        [
            {
                "email": "k@example.com",
                "ecid": "tab",
                "prefs": {"newsletter": "weekly"},
                "updated_at": iso(900),
            }
        ],
    )
    await ingest(nc, tmp_path, "app", [{"crm_id": "C1", "ecid": "tab", "updated_at": iso(800)}])
    await ingest(nc, tmp_path, "app", [{"crm_id": "C2", "ecid": "tab", "updated_at": iso(700)}])
    one = await profile_of(nc, "crm_id:C1")
    k = await profile_of(nc, "email:k@example.com")
    assert k["profile_id"] != one["profile_id"], "k split off C1 when the tablet moved"
    assert one["attributes"]["prefs"] == {"newsletter": "weekly"}, "attributes stay"

    await people.delete(nc, "email:k@example.com", timeout=30)
    await landed(nc)
    one = await profile_of(nc, "crm_id:C1")
    assert "k@example.com" not in json.dumps(one), one["attributes"]
    assert "prefs" not in one["attributes"], one["attributes"]


# -- identity: a refusal and the delete of the person it names, in one fetch ---------------------
async def test_a_refusal_met_in_the_fetch_of_a_delete_does_not_outlive_it(
    platform: dict[str, Service], nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    """A loyalty row names C1 and C2's card L2 (refused: one card per person), and C2 is
    deleted right after, both read by identity in one fetch. The refused link, whose
    reason names the deleted person's card, goes with the delete."""
    await ingest(nc, tmp_path, "loyalty", two_cards())
    await platform["identity"].stop()
    await send_file(
        nc,
        tmp_path,
        "loyalty",
        [{"loyalty_id": "L2", "crm_id": "C1", "loyalty": {"points": 7}, "updated_at": iso(8e4)}],
    )
    deleting = asyncio.create_task(people.delete(nc, "crm_id:C2", timeout=60))
    js = nc.jetstream()

    async def queued() -> bool:  # the record and the delete wait for identity
        info = await js.consumer_info(subjects.STREAM_RECORDS.name, "identity")
        return bool(info.num_pending == 2)

    await eventually(queued)
    await restart(platform, IdentityService, nats_server.url, tmp_path / "data")
    await deleting
    await landed(nc)
    graph = await people.identity_graph(nc, "crm_id:C1")
    left = rows(
        tmp_path,
        "identity.db",
        "SELECT a, b, reason FROM refused_links WHERE a LIKE '%L2%' OR b LIKE '%L2%' "
        "OR reason LIKE '%C2%' OR reason LIKE '%L2%'",
    )
    assert left == [], left
    assert "L2" not in json.dumps(graph), graph["refused"]


# -- segmentation: batch memberships moved onto a survivor that goes in the same fetch -----------
async def _cookie_in_a_batch_segment(nc: Client, tmp_path: Path) -> str:
    """A cookie's page view makes its profile a member of a batch segment (by a job)."""
    await apply_segment(nc, EVER_VIEWED, 'event(type = "web.pageview")')
    await ingest(nc, tmp_path, "web", [view("k", "/home")])
    await run_job(nc)
    cookie = profile_id_of(tmp_path, "ecid:k")
    member = rows(
        tmp_path,
        "segmentation.db",
        "SELECT status FROM memberships WHERE profile_id = ? AND segment = ?",
        (cookie, EVER_VIEWED),
    )
    assert member == [("realized",)], member
    return cookie


async def test_a_chain_of_merges_in_one_fetch_leaves_no_membership_on_the_middle_profile(
    platform: dict[str, Service], nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    """Cookie k (a member of a batch segment) logs in as s@, whose profile S the CRM then
    links to T; segmentation reads both merges in one fetch. The batch membership ends on
    T alone: S, a profile that no longer exists, is a member of nothing."""
    await ingest(nc, tmp_path, "crm", [crm("T1", "t@example.com")])
    await ingest(nc, tmp_path, "web", [login("s", "s@example.com", "/login-s")])
    cookie = await _cookie_in_a_batch_segment(nc, tmp_path)
    s = profile_id_of(tmp_path, "email:s@example.com")
    t = profile_id_of(tmp_path, "crm_id:T1")

    await platform["segmentation"].stop()
    await send_file(nc, tmp_path, "web", [login("k", "s@example.com", "/login-k")])
    await until(lambda: folded_into(tmp_path, cookie) == s)
    await send_file(nc, tmp_path, "crm", [crm("T1", "s@example.com")])
    await until(lambda: folded_into(tmp_path, s) == t)
    await restart(platform, SegmentationService, nats_server.url, tmp_path / "data")
    await landed(nc)

    held = rows(
        tmp_path,
        "segmentation.db",
        "SELECT profile_id, status FROM memberships WHERE segment = ? AND status = 'realized'",
        (EVER_VIEWED,),
    )
    assert held == [(t, "realized")], held
    report = await check(nc)
    assert report.ok, report.violations


async def test_a_delete_of_a_profile_that_absorbed_a_member_in_the_same_fetch_leaves_no_membership(
    platform: dict[str, Service], nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    """Cookie k (a member of a batch segment) logs in as P1, and P1 asks to be forgotten
    right away; segmentation reads the merge and the delete in one fetch. Neither the
    cookie's profile nor P1's is a member of anything afterwards."""
    await ingest(nc, tmp_path, "crm", [crm("P1", "one@example.com")])
    cookie = await _cookie_in_a_batch_segment(nc, tmp_path)
    person = profile_id_of(tmp_path, "crm_id:P1")

    await platform["segmentation"].stop()
    await send_file(nc, tmp_path, "web", [login("k", "one@example.com", "/login")])
    await until(lambda: folded_into(tmp_path, cookie) == person)
    deleting = asyncio.create_task(people.delete(nc, "crm_id:P1", timeout=60))
    await until(
        lambda: (
            not rows(
                tmp_path, "profile.db", "SELECT 1 FROM profiles WHERE profile_id = ?", (person,)
            )
        )
    )
    await restart(platform, SegmentationService, nats_server.url, tmp_path / "data")
    await deleting
    await landed(nc)

    held = rows(
        tmp_path,
        "segmentation.db",
        "SELECT profile_id, segment, status FROM memberships WHERE profile_id IN (?, ?)",
        (cookie, person),
    )
    assert held == [], held
    report = await check(nc)
    assert report.ok, report.violations


# -- segmentation alone, fed the changes the profile service publishes ---------------------------
LOGGED_IN = "logged-in-today"
PARTITIONS = 8


@pytest_asyncio.fixture
async def segmentation(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> AsyncIterator[dict[str, Service]]:
    services: dict[str, Service] = {}
    await restart(services, SegmentationService, nats_server.url, tmp_path / "data")
    try:
        await apply_segment(nc, LOGGED_IN, 'event(type = "app.login") within 1 day')
        yield services
    finally:
        for svc in services.values():
            await svc.stop()


def part(profile_id: str) -> int:
    return subjects.partition_of(profile_id, PARTITIONS)


def pick(prefix: str, accept: Callable[[int], bool]) -> str:
    return next(f"{prefix}{i}" for i in range(100) if accept(part(f"{prefix}{i}")))


async def publish(nc: Client, profile_id: str, *items: ChangeItem) -> int:
    """One message of the profile service on the partition of `profile_id`."""
    body = msgpack_encoder.encode(ChangeEnvelope(list(items)))
    ack = await nc.jetstream().publish(subjects.changes(part(profile_id)), body)
    return int(ack.seq)


async def applied(tmp_path: Path, seq: int) -> None:
    """Wait until segmentation has committed everything up to stream sequence `seq`."""

    def done() -> bool:
        got = rows(
            tmp_path,
            "segmentation.db",
            "SELECT stream_seq FROM rt_offsets WHERE consumer = ?",
            ("segmentation",),
        )
        return bool(got) and int(got[0][0]) >= seq

    await until(done)


def web_event(rid: str, event_type: str = "app.login", ago_s: float = 3600.0) -> ExperienceEvent:
    return ExperienceEvent(
        record_id=rid,
        dataset="web",
        event_type=event_type,
        timestamp=time.time() - ago_s,
        payload={"ecid": "tab", "eventType": event_type},
    )


def changed(pid: str, idents: list[str], **kw: Any) -> ProfileChanged:
    identities = [Identity(*i.split(":", 1)) for i in idents]
    return ProfileChanged(pid, kw.pop("record_ids", []), time.time(), identities=identities, **kw)


def seg_events(tmp_path: Path) -> list[tuple[Any, ...]]:
    return rows(tmp_path, "segmentation.db", "SELECT record_id, profile_id FROM events")


def member(tmp_path: Path, pid: str) -> list[tuple[Any, ...]]:
    return rows(
        tmp_path,
        "segmentation.db",
        "SELECT status FROM memberships WHERE profile_id = ? AND segment = ?",
        (pid, LOGGED_IN),
    )


async def test_an_event_that_moved_to_a_split_off_profile_survives_the_remerge(
    segmentation: dict[str, Service], nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    """k@ logs in on the family tablet, which links k to C1 (profile A). C2 signs in on the
    tablet: it moves to C2 and k splits off A into N, with its login event E (anchored on
    k). The CRM then links k to C1 again: N folds back into A, E with it.

    The profile service publishes, in stream order: "E arrived on N" (N's partition comes
    first), "E left A", then the merge. Segmentation's fetch ends between the first two;
    the departure from A read later must not remove the E the merge brings to A: A stays
    in "logged-in-today" when a timer rechecks it."""
    a = pick("p-a-", lambda p: p > 0)
    n = pick("p-n-", lambda p: p < part(a))
    e = web_event("r-login")
    seq = await publish(
        nc, a, changed(a, ["crm_id:C1", "email:k", "ecid:tab"], events=[e], record_ids=["r-login"])
    )
    await applied(tmp_path, seq)
    assert member(tmp_path, a) == [("realized",)]

    # Profile fetch 1 (the tablet moves, k splits off): its messages, N's partition first.
    # Segmentation's fetch ends after the first.
    await segmentation["segmentation"].stop()
    seq = await publish(nc, n, changed(n, ["email:k"], events=[e]))
    await restart(segmentation, SegmentationService, nats_server.url, tmp_path / "data")
    await applied(tmp_path, seq)
    # Each profile's copy is its own row: A's goes when its departure is read.
    assert sorted(seg_events(tmp_path)) == sorted([("r-login", a), ("r-login", n)])

    # The rest of profile fetch 1, then profile fetch 2 (the merge back), in one fetch.
    await segmentation["segmentation"].stop()
    await publish(nc, a, changed(a, ["crm_id:C1"], removed_events=["r-login"]))
    await publish(nc, n, ProfileMerged(a, [n], time.time()))
    seq = await publish(
        nc, a, changed(a, ["crm_id:C1", "email:k"], folded=[n], record_ids=["r-crm"])
    )
    await restart(segmentation, SegmentationService, nats_server.url, tmp_path / "data")
    await applied(tmp_path, seq)

    # A timer (or a batch job) sends A through the actor again.
    seq = await publish(nc, a, Recheck([a], time.time()))
    await applied(tmp_path, seq)
    assert member(tmp_path, a) == [("realized",)], "A logged in an hour ago"
    assert seg_events(tmp_path) == [("r-login", a)]


async def test_an_event_moved_there_and_back_is_kept_whatever_order_the_partitions_are_read_in(
    segmentation: dict[str, Service], nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    """P1 and P2 take turns on the family tablet: its anonymous page view E moves from P1's
    profile A to P2's profile B, then back to A, in two fetches of the profile service.
    Each partition is read in order, but the two partitions in another interleaving than
    the stream's (as a reader per partition would, which the ordering contract allows):
    A's departure, A's arrival, B's arrival, B's departure. E ends on A, as in the
    profile service."""
    a = pick("p-a-", lambda p: True)
    b = pick("p-b-", lambda p: p != part(a))
    e = web_event("r-view", "web.pageview")
    seq = await publish(
        nc, a, changed(a, ["crm_id:P1", "ecid:tab"], events=[e], record_ids=["r-view"])
    )
    await applied(tmp_path, seq)
    assert seg_events(tmp_path) == [("r-view", a)]

    await segmentation["segmentation"].stop()  # what follows is read in one fetch
    await publish(nc, a, changed(a, ["crm_id:P1"], removed_events=["r-view"]))  # fetch 1, A
    await publish(nc, a, changed(a, ["crm_id:P1", "ecid:tab"], events=[e]))  # fetch 2, A
    await publish(nc, b, changed(b, ["crm_id:P2", "ecid:tab"], events=[e]))  # fetch 1, B
    seq = await publish(nc, b, changed(b, ["crm_id:P2"], removed_events=["r-view"]))  # fetch 2, B
    await restart(segmentation, SegmentationService, nats_server.url, tmp_path / "data")
    await applied(tmp_path, seq)
    assert seg_events(tmp_path) == [("r-view", a)]


# -- destination: its two consumers of one person's delete ---------------------------------------
async def offset(tmp_path: Path, consumer: str, seq: int) -> None:
    def done() -> bool:
        got = rows(
            tmp_path,
            "destination.db",
            "SELECT stream_seq FROM rt_offsets WHERE consumer = ?",
            (consumer,),
        )
        return bool(got) and int(got[0][0]) >= seq

    await until(done)


async def test_a_destination_view_is_not_rebuilt_after_the_delete_by_a_lagging_consumer(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    """The destination follows profile changes (its view: identities and attributes) and
    membership changes (with privacy deletes) with two consumers that each go at their own
    pace. When the view consumer lags behind, the membership consumer applies P's privacy
    delete first; the view consumer then reads P's last change and the delete: no view of
    P is left."""
    services: dict[str, Service] = {}
    await restart(services, DestinationService, nats_server.url, tmp_path / "data")
    try:
        js = nc.jetstream()
        p = "p-deleted-person"
        view_of_p = ChangeEnvelope(
            [changed(p, ["email:p@example.com"], attributes={"email": "p@example.com"})]
        )
        ack = await js.publish(subjects.changes(part(p)), msgpack_encoder.encode(view_of_p))
        await offset(tmp_path, "destination-profiles", ack.seq)
        assert rows(tmp_path, "destination.db", "SELECT profile_id FROM profiles") == [(p,)]

        request = PrivacyDelete(
            request_id="r1", identity=Identity("email", "p@example.com"), requested_at=time.time()
        )
        gone = ProfileDeleted([p], request)
        # Segmentation passed the delete on: the membership consumer applies it first.
        envelope = MembershipEnvelope([gone])
        ack = await js.publish(subjects.members(part(p)), msgpack_encoder.encode(envelope))
        await offset(tmp_path, "destination-members", ack.seq)
        assert rows(tmp_path, "destination.db", "SELECT profile_id FROM profiles") == []
        # The view consumer catches up: P's last change, then the delete, in the stream.
        last = ChangeEnvelope(
            [
                changed(p, ["email:p@example.com"], attributes={"email": "p@example.com", "x": 1}),
                gone,
            ]
        )
        ack = await js.publish(subjects.changes(part(p)), msgpack_encoder.encode(last))
        await offset(tmp_path, "destination-profiles", ack.seq)
        left = rows(tmp_path, "destination.db", "SELECT profile_id, identities FROM profiles")
        assert left == [], left
    finally:
        for svc in services.values():
            await svc.stop()


async def test_a_batch_membership_moved_by_a_merge_names_the_person_who_joined(
    platform: dict[str, Service], nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    """Cookie k is in a batch audience; it logs in as P1 (crm_id P1, one@example.com), and
    segmentation reads the merge and P1's change in one fetch. P1's "realized" change names
    P1's identities (email included), so that destinations that need them reach P1."""
    await ingest(nc, tmp_path, "crm", [crm("P1", "one@example.com")])
    cookie = await _cookie_in_a_batch_segment(nc, tmp_path)
    person = profile_id_of(tmp_path, "crm_id:P1")
    seen: list[MembershipEvent] = []

    async def on_msg(msg: Msg) -> None:
        seen.append(msgspec.json.decode(msg.data, type=MembershipEvent))

    sub = await nc.subscribe(subjects.membership(EVER_VIEWED), cb=on_msg)
    await platform["segmentation"].stop()
    await send_file(nc, tmp_path, "web", [login("k", "one@example.com", "/login")])
    await until(lambda: folded_into(tmp_path, cookie) == person)
    await restart(platform, SegmentationService, nats_server.url, tmp_path / "data")
    await landed(nc)
    await sub.unsubscribe()

    joined = [e for e in seen if e.profile_id == person and e.status == "realized"]
    assert len(joined) == 1, seen
    names = {f"{i.namespace}:{i.value}" for i in joined[0].identities}
    assert {"crm_id:P1", "email:one@example.com"} <= names, names


# -- identity: the size limit and privacy deletes ------------------------------------------------
@pytest_asyncio.fixture
async def small_graphs(
    nats_server: NatsServer, nc: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[dict[str, Service]]:
    """The platform with identity graphs of at most 3 identities."""
    monkeypatch.setenv("CDP_IDENTITY_MAX_GRAPH_SIZE", "3")
    async with running(CLASSES, nats_server.url, tmp_path / "data", nc) as services:
        yield services


async def test_a_delete_of_an_identity_the_size_limit_dropped_removes_its_events(
    small_graphs: dict[str, Service], nc: Client, tmp_path: Path
) -> None:
    """C1 logs in on the web with a@example.com, then the CRM gives C1 two newer emails; the
    graph outgrows its limit and drops a@ (its login stays on C1's profile, as the rules
    say). `cdp delete email:a@example.com` still removes that login."""
    await ingest(nc, tmp_path, "crm", [crm("C1", "a@example.com")])
    await ingest(nc, tmp_path, "web", [login("ka", "a@example.com", "/login-a")])
    await ingest(nc, tmp_path, "crm", [crm("C1", "b@example.com")])
    await ingest(nc, tmp_path, "crm", [crm("C1", "c@example.com")])
    one = await profile_of(nc, "crm_id:C1")
    assert "email:a@example.com" not in {
        f"{i['namespace']}:{i['value']}" for i in one["identities"]
    }
    assert [e["payload"].get("email") for e in one["events"]] == ["a@example.com"]

    await people.delete(nc, "email:a@example.com", timeout=30)
    await landed(nc)
    one = await profile_of(nc, "crm_id:C1")
    assert "a@example.com" not in json.dumps(one["events"]), one["events"]


# -- profile: the index of records that carry someone else's identity ----------------------------
async def test_a_delete_leaves_no_carried_row_under_a_profile_folded_into_the_person(
    platform: dict[str, Service], nc: Client, tmp_path: Path
) -> None:
    """C1 hands in a loyalty row naming C2's card L2 (the link is refused; the record is
    indexed as carrying L2, under C1's profile X). C1's CRM row then gives C1 the email of
    an older web profile S: X folds into S. `cdp delete crm_id:C1` leaves nothing of C1 in
    that index, not even under X's id."""
    await ingest(
        nc,
        tmp_path,
        "loyalty",
        [
            {
                "loyalty_id": "L2",
                "crm_id": "C2",
                "loyalty": {"tier": "bronze"},
                "updated_at": iso(9e4),
            }
        ],
    )
    await ingest(nc, tmp_path, "web", [login("ks", "s@example.com", "/login-s")])
    await ingest(nc, tmp_path, "crm", [crm("C1", "c1@example.com")])
    x = profile_id_of(tmp_path, "crm_id:C1")
    await ingest(
        nc,
        tmp_path,
        "loyalty",
        [{"loyalty_id": "L2", "crm_id": "C1", "loyalty": {"points": 7}, "updated_at": iso(8e4)}],
    )
    indexed = rows(tmp_path, "profile.db", "SELECT key FROM carried WHERE profile_id = ?", (x,))
    assert ("loyalty_id:L2",) in indexed, indexed
    await ingest(nc, tmp_path, "crm", [crm("C1", "s@example.com")])
    s = profile_id_of(tmp_path, "crm_id:C1")
    assert folded_into(tmp_path, x) == s

    await people.delete(nc, "crm_id:C1", timeout=30)
    await landed(nc)
    left = rows(
        tmp_path,
        "profile.db",
        "SELECT key, record_id, profile_id FROM carried "
        "WHERE profile_id NOT IN (SELECT profile_id FROM profiles)",
    )
    assert left == [], left


# -- cdp check ----------------------------------------------------------------------------------
async def test_check_finds_an_event_segmentation_lost(
    platform: dict[str, Service], nc: Client, tmp_path: Path
) -> None:
    """Segmentation's copy lost a page view the profile service holds: `cdp check` says so.
    (The loss is planted, as the regression test of `cdp check` plants a ghost profile.)"""
    await ingest(nc, tmp_path, "web", [view("k", "/home")])
    with sqlite3.connect(tmp_path / "data" / "segmentation.db") as conn:
        conn.execute("DELETE FROM events")
    report = await check(nc)
    assert not report.ok, report
