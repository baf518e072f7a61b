"""Fault tests: the six services run as OS processes under the supervisor (as `cdp up` runs
them) with the retail example's configuration and a webhook destination on a real local
server, while a stream of 20,000 records whose outcome is known in advance flows in.

One test SIGKILLs each service once, mid-stream; another restarts the nats-server
mid-stream. Afterwards every record is reflected exactly once: ingest counted each once,
the profile service holds each event once under the right person, every segment holds
exactly the members the data implies, each membership change is on the membership stream
once, and the webhook received every change.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest
from nats.aio.client import Client

from ops.cli.apply import apply_objects, load_file
from ops.natsd import NatsServer, NatsWatchdog, free_port
from services.ingest.service import IngestService
from shared import admin, subjects
from shared.admin import ApplyMany, ApplyManyResult, ConfigObject
from shared.db import Tx, apply, open_db
from shared.resources import OWNERS
from shared.streams import ensure_streams
from tests.destination_servers import WebhookServer
from tests.helpers import RETAIL_CONFIG, eventually, settings_for
from tests.processes import Platform

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

SECRET = "fault-test-signing-secret"
PEOPLE = 1000
BLOCK = 50
"""People whose records are sent together: a block's CRM records, then its loyalty
records, its store orders and its web events, so membership changes happen all along."""
WEB_EVENTS = 15
ORDERS = 3
PER_PERSON = 2 + ORDERS + WEB_EVENTS
TOTAL = PEOPLE * PER_PERSON
EVENTS = PEOPLE * (ORDERS + WEB_EVENTS)
WEB_TYPES = ("web.pageview", "web.productview", "cart.add", "web.search", "app.open")
HOOK_SEGMENTS = ("email-optin", "gold-members", "gold-optin", "cart-abandoners")
KILL_ORDER = ("ingest", "identity", "profile", "segmentation", "scheduler", "destination")
MAIN_CONSUMER = {
    "ingest": ("CDP_INGEST", "ingest"),
    "identity": ("CDP_RECORDS", "identity"),
    "profile": ("CDP_PROFILES", "profile"),
    "segmentation": ("CDP_CHANGES", "segmentation"),
}
"""The stream and durable consumer each service's main work comes from."""

Record = tuple[str, dict[str, Any]]
Change = tuple[int, str, str]
"""(person, segment, status)"""


# -- the data ---------------------------------------------------------------------------------
def email(p: int) -> str:
    return f"person{p}@example.com"


def person_of(email_value: str) -> int:
    return int(email_value.removeprefix("person").split("@")[0])


def expected_segments(p: int) -> set[str]:
    """The segments person p ends in, by the retail example's definitions."""
    out = set()
    if p % 2 == 0:
        out.add("email-optin")  # consents.marketing.email = "y", and an email
    if p % 3 == 0:
        out.add("gold-members")  # loyalty.tier = "gold" (the others are silver)
    if p % 6 == 0:
        out.add("gold-optin")  # in both of the above
    if p % 4 != 1:
        out.add("cart-abandoners")  # cart.add today, no purchase (only p % 4 == 1 buys)
    return out


def expected_changes() -> set[Change]:
    """Every membership change the stream causes. Each is an entry: a person's records
    only ever add conditions that hold (the purchases of buyers come before their first
    cart.add), so however records are batched, each (person, segment) changes once."""
    return {(p, s, "realized") for p in range(PEOPLE) for s in expected_segments(p)}


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def stream(now: float) -> list[Record]:
    """Every record in the order sent. A person's CRM record (crm_id, email) comes first,
    then the loyalty record (loyalty_id linked to the crm_id), then store orders (by
    loyalty_id) and web events (cookie and email), so each person is one identity graph
    from the start and no graph ever merges. Timestamps lie within the last hour, inside
    the segments' 1-day windows."""
    out: list[Record] = []
    clock = now - 3600.0

    def ts() -> str:
        nonlocal clock
        clock += 0.1
        return iso(clock)

    for first in range(0, PEOPLE, BLOCK):
        people = range(first, first + BLOCK)
        for p in people:
            consent = "y" if p % 2 == 0 else "n"
            crm = {
                "crm_id": f"C{p}",
                "email": email(p),
                "person": {"name": {"first": f"F{p}", "last": f"L{p}"}},
                "consents": {"marketing": {"email": consent, "sms": "n", "any": consent}},
                "updated_at": ts(),
            }
            out.append(("crm", crm))
        for p in people:
            loyalty = {
                "loyalty_id": f"L{p}",
                "crm_id": f"C{p}",
                "loyalty": {"tier": "gold" if p % 3 == 0 else "silver", "points": p},
                "updated_at": ts(),
            }
            out.append(("loyalty", loyalty))
        for n in range(ORDERS):
            for p in people:
                order = {
                    "loyalty_id": f"L{p}",
                    "eventType": "commerce.purchase" if p % 4 == 1 else "commerce.return",
                    "timestamp": ts(),
                    "commerce": {"order": {"id": f"O{p}-{n}", "total": 10.0 + n}},
                }
                out.append(("store-orders", order))
        for n in range(WEB_EVENTS):
            for p in people:
                web = {
                    "ecid": f"E{p}",
                    "email": email(p),
                    "eventType": WEB_TYPES[n % len(WEB_TYPES)],
                    "timestamp": ts(),
                    "page": {"url": f"/p/{n}"},
                }
                out.append(("web", web))
    assert len(out) == TOTAL
    return out


def sent_per_dataset(records: list[Record]) -> dict[str, int]:
    return dict(Counter(ds for ds, _ in records))


async def publish(nc: Client, records: list[Record], first: int, sent: list[int]) -> None:
    """JetStream publishes with a Nats-Msg-Id, in windows; a window with a failure is sent
    again whole (the stream drops what it already has). `sent[0]` counts acked records."""
    js = nc.jetstream()
    window = 200
    for i in range(0, len(records), window):
        chunk = records[i : i + window]
        while True:
            results = await asyncio.gather(
                *(
                    js.publish(
                        subjects.ingest(ds),
                        json.dumps(rec).encode(),
                        headers={"Nats-Msg-Id": f"fault-{first + i + j}"},
                        timeout=5,
                    )
                    for j, (ds, rec) in enumerate(chunk)
                ),
                return_exceptions=True,
            )
            if not any(isinstance(r, BaseException) for r in results):
                break
            await asyncio.sleep(0.2)
        sent[0] += len(chunk)


# -- the platform -------------------------------------------------------------------------------
def platform_env() -> dict[str, str]:
    return {
        "CDP_SECRET_TEST_WEBHOOK": SECRET,
        # No daily batch job in the middle of the test (a scheduler that restarts runs a
        # missed one): memberships change only by streaming evaluation here.
        "CDP_SEGMENTATION_SCHEDULE": "0 0 1 1 *",
    }


async def configure(nc: Client, hook: WebhookServer) -> None:
    """The retail example's configuration, and a webhook for four streaming segments."""
    await apply_objects(nc, load_file(RETAIL_CONFIG), dry_run=False, file=str(RETAIL_CONFIG))
    spec = {
        "name": "fault-hook",
        "type": "webhook",
        "segments": list(HOOK_SEGMENTS),
        "connection": {"url": hook.url, "timeout": 5},
        "secrets": {"signing_secret": "CDP_SECRET_TEST_WEBHOOK"},
    }
    await admin.request(
        nc,
        subjects.admin("destination", "apply"),
        ApplyMany([ConfigObject("destination", spec)]),
        ApplyManyResult,
    )


MEMBER_ROWS = "SELECT profile_id, segment FROM memberships WHERE status IN ('realized', 'existing')"
"""Current members, in the memberships table of segmentation, profile and destination."""


def members(platform: Platform, service: str) -> set[tuple[int, str]]:
    """(person, segment) of the members a service holds, persons found by email."""
    pid_person = {
        str(pid): person_of(str(value))
        for value, pid in platform.query(
            "profile", "SELECT value, profile_id FROM identities WHERE namespace = 'email'"
        )
    }
    return {
        (pid_person.get(str(pid), -1), str(seg))
        for pid, seg in platform.query(service, MEMBER_ROWS)
    }


def hook_changes(hook: WebhookServer, *, accepted_only: bool) -> dict[str, list[dict[str, Any]]]:
    """Activations the webhook server received (or accepted, with a 2xx), by id."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for req in hook.accepted if accepted_only else hook.received:
        doc = req.json
        if isinstance(doc, dict) and isinstance(doc.get("activations"), list):
            for a in doc["activations"]:
                out[str(a.get("id"))].append(a)
    return out


def change_of(a: dict[str, Any]) -> Change:
    return person_of(a["identities"]["email"][0]), str(a["segment"]), str(a["status"])


async def settle(platform: Platform, hook: WebhookServer, want: set[Change]) -> None:
    """Wait until the profile service holds every event, segmentation every membership, and
    the webhook accepted as many distinct changes as expected."""
    want_members = {(p, s) for p, s, _ in want}

    async def done() -> bool:
        events = platform.scalar("profile", "SELECT count(*) FROM events")
        return (
            events >= EVENTS
            and len(members(platform, "segmentation")) >= len(want_members)
            and len(hook_changes(hook, accepted_only=True)) >= len(want)
        )

    await eventually(done, timeout=60, interval=0.25)
    await asyncio.sleep(1.0)  # anything applied or delivered twice would land by now


async def check_exactly_once(
    platform: Platform, nc: Client, hook: WebhookServer, records: list[Record]
) -> None:
    """What a user would look at after the faults: counts, profiles, segments, deliveries."""
    want = expected_changes()
    await settle(platform, hook, want)

    # Ingest: every record accepted once, none rejected.
    accepted = {
        str(ds): int(str(n))
        for ds, n in platform.query("ingest", "SELECT dataset, accepted FROM dataset_counts")
    }
    assert accepted == sent_per_dataset(records)
    assert platform.scalar("ingest", "SELECT count(*) FROM rejected_records") == 0

    # Profiles: one per person, holding each of the person's identities and events once.
    ids: dict[str, dict[str, str]] = defaultdict(dict)
    for ns, value, pid in platform.query(
        "profile", "SELECT namespace, value, profile_id FROM identities"
    ):
        ids[str(ns)][str(value)] = str(pid)
    pid_of = {p: ids["email"].get(email(p)) for p in range(PEOPLE)}
    assert None not in pid_of.values(), "a person has no profile"
    assert len(set(pid_of.values())) == PEOPLE, "two people share a profile"
    for p, pid in pid_of.items():
        graph = (
            ids["crm_id"].get(f"C{p}"),
            ids["loyalty_id"].get(f"L{p}"),
            ids["ecid"].get(f"E{p}"),
        )
        assert graph == (pid, pid, pid), f"person {p}: identities split over profiles"
    assert platform.scalar("profile", "SELECT count(*) FROM events") == EVENTS
    per_profile = {
        str(pid): int(str(n))
        for pid, n in platform.query(
            "profile", "SELECT profile_id, count(*) FROM events GROUP BY profile_id"
        )
    }
    assert per_profile == {pid: ORDERS + WEB_EVENTS for pid in pid_of.values()}
    assert platform.scalar("profile", "SELECT count(DISTINCT record_id) FROM events") == EVENTS

    # Segments: exactly the members the data implies, in segmentation, in the profiles
    # (memberships are written back) and in the destination service.
    want_members = {(p, s) for p, s, _ in want}  # none in frequent-buyers: batch, no job ran
    for service in ("segmentation", "profile", "destination"):
        assert members(platform, service) == want_members, f"{service}: other members"

    # The membership stream: each change published once.
    info = await nc.jetstream().stream_info("CDP_MEMBERSHIP", subjects_filter=">")
    per_segment = Counter(s for _, s, _ in want)
    assert {
        k.removeprefix("cdp.membership."): v for k, v in (info.state.subjects or {}).items()
    } == dict(per_segment)
    assert info.state.messages == len(want)

    # The webhook: at least once, one id per change, a resend bears the id it had.
    received = hook_changes(hook, accepted_only=False)
    accepted_ids = set(hook_changes(hook, accepted_only=True))
    assert accepted_ids == set(received), "a change was received but never accepted"
    assert len(received) == len(want), "a change was delivered under two ids (or missed)"
    for key, copies in received.items():
        assert all(c == copies[0] for c in copies), f"{key}: copies differ"
    assert {change_of(copies[0]) for copies in received.values()} == want


async def _true(value: bool) -> bool:
    return value


async def _busy(platform: Platform, nc: Client, name: str) -> bool:
    """Whether `name` has started on its input and has more waiting."""
    stream_name, consumer = MAIN_CONSUMER[name]
    offset = platform.scalar(
        name, "SELECT stream_seq FROM rt_offsets WHERE consumer = ?", (consumer,)
    )
    last = (await nc.jetstream().stream_info(stream_name)).state.last_seq
    return 0 < offset < last


@pytest.mark.timeout(90)
async def test_sigkill_each_service_midstream_every_record_reflected_once(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    """SIGKILL each of the six services once, one after another, at increasing points of a
    20,000-record stream, each while it has work in hand (the destination while a webhook
    request is in flight); the supervisor restarts each.

    Exactly once holds for state: ingest counts, profile events, identity graphs, segment
    memberships, the membership stream. HTTP delivery cannot be exactly once across a crash
    between sending a request and recording it: the webhook gets every membership change
    AT LEAST once, and every activation carries the id of its change, so the test asserts
    that the distinct ids are exactly the expected changes, and that a change received
    more than once came again under the same id with the same content (a receiver that
    drops seen ids gets each change once). The kill during a request makes such a resend.
    """
    records = stream(time.time())
    step = TOTAL // 7
    chunks = [records[k * step : (k + 1) * step if k < 6 else TOTAL] for k in range(7)]
    async with (
        WebhookServer(signing_secret=SECRET) as hook,
        Platform(tmp_path / "data", nats_url=nats_server.url, env=platform_env()) as platform,
    ):
        await configure(nc, hook)
        sup = platform.supervisor
        sent = [0]

        async def restarted(name: str) -> None:
            await eventually(lambda: _true(sup.starts(name) == 2), timeout=30)
            await eventually(lambda: platform.ready(name), timeout=30)

        async def has_work(name: str) -> bool:
            if name == "destination":
                return any(r.status == 0 for r in hook.received)  # a request in flight
            if name in MAIN_CONSUMER:
                return await _busy(platform, nc, name)
            return True  # the scheduler has no stream work to be in the middle of

        restart: asyncio.Task[None] | None = None
        for k, chunk in enumerate(chunks):
            if restart is not None:
                await restart  # the last one killed is back before the next chunk
            name = KILL_ORDER[k] if k < len(KILL_ORDER) else ""
            if name == "destination":
                hook.delay_next(0.5, times=2)  # a request in flight when it dies
            producing = asyncio.create_task(publish(nc, chunk, k * step, sent))
            if name == "destination":  # required: the resend asserted below follows from it
                await eventually(partial(has_work, name), timeout=20, interval=0.01)
            elif name:  # best effort: a service that caught up at once is killed all the same
                with contextlib.suppress(AssertionError):
                    await eventually(partial(has_work, name), timeout=10, interval=0.01)
            if name:
                pid = sup.pid(name)
                assert pid is not None, f"{name} is not running"
                os.kill(pid, signal.SIGKILL)
                restart = asyncio.create_task(restarted(name))
            await producing
        assert sent[0] == TOTAL

        await check_exactly_once(platform, nc, hook, records)
        received = hook_changes(hook, accepted_only=False)
        assert any(len(c) > 1 for c in received.values()), (
            "the request in flight when the destination was killed should have come again"
        )
        assert {n: sup.starts(n) for n in KILL_ORDER} == dict.fromkeys(KILL_ORDER, 2)
        assert await platform.all_ready() == {}
    assert platform.codes == dict.fromkeys(KILL_ORDER, 0), platform.codes


@pytest.mark.timeout(90)
async def test_nats_server_restart_midstream_loses_nothing(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    """Stop the nats-server halfway through a 20,000-record stream and start it again on
    the same port with the same JetStream folder: the services reconnect by themselves (no
    restart by the supervisor), the producer re-sends what was not acknowledged, and every
    record is reflected exactly once (same checks as the SIGKILL test)."""
    records = stream(time.time())
    async with (
        WebhookServer(signing_secret=SECRET) as hook,
        Platform(tmp_path / "data", nats_url=nats_server.url, env=platform_env()) as platform,
    ):
        await configure(nc, hook)
        sent = [0]
        producing = asyncio.create_task(publish(nc, records, 0, sent))
        await eventually(lambda: _true(sent[0] >= TOTAL // 2), timeout=60, interval=0.01)
        assert not producing.done()
        await nats_server.stop()
        await asyncio.sleep(1.0)
        await nats_server.start()
        await producing
        await eventually(lambda: _true(nc.is_connected), timeout=30)

        async def all_ready() -> bool:
            return await platform.all_ready() == {}

        await eventually(all_ready, timeout=60, interval=0.25)
        await check_exactly_once(platform, nc, hook, records)
        assert {n: platform.supervisor.starts(n) for n in KILL_ORDER} == dict.fromkeys(
            KILL_ORDER, 1
        ), "a service died instead of reconnecting"
    assert platform.codes == dict.fromkeys(KILL_ORDER, 0), platform.codes


# -- a fault never leaves a service alive but idle ---------------------------------------------
def ingest_objects() -> list[ConfigObject]:
    """The retail example's namespaces, schemas and datasets (what the ingest service owns)."""
    return [o for o in load_file(RETAIL_CONFIG) if OWNERS[o.kind] == "ingest"]


def web_record(i: int) -> dict[str, Any]:
    return {
        "ecid": f"W{i}",
        "eventType": "web.pageview",
        "timestamp": iso(time.time()),
        "page": {"url": f"/w/{i}"},
    }


async def publish_web(nc: Client, first: int, count: int) -> None:
    js = nc.jetstream()
    for i in range(first, first + count):
        await js.publish(
            subjects.ingest("web"),
            json.dumps(web_record(i)).encode(),
            headers={"Nats-Msg-Id": f"web-{i}"},
        )


def web_accepted(platform: Platform) -> int:
    return platform.scalar("ingest", "SELECT accepted FROM dataset_counts WHERE dataset = 'web'")


async def test_a_failing_commit_reports_the_real_error(tmp_path: Path) -> None:
    """SQLite rolls a transaction back by itself when COMMIT finds the disk full; the error
    the caller sees is the full disk, not a failed ROLLBACK ("no transaction is active")."""
    db = await open_db(tmp_path / "small.db")
    try:
        await db.execute("CREATE TABLE t (x TEXT)")
        pages = int(next(iter(await db.execute_fetchall("PRAGMA page_count")))[0])
        await db.execute(f"PRAGMA max_page_count = {pages + 1}")
        tx = Tx()
        tx.add_many("INSERT INTO t (x) VALUES (?)", [("x" * 1000,)] * 100)
        with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
            await apply(db, tx)
        assert not db.in_transaction
        assert [tuple(r) for r in await db.execute_fetchall("SELECT count(*) FROM t")] == [(0,)]
    finally:
        await db.close()


@pytest.mark.timeout(60)
async def test_a_consumer_that_dies_makes_its_service_exit_and_be_restarted(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    """Another process holds ingest.db's write lock longer than the busy timeout: the
    consumer's transaction fails, the process exits non-zero (it does not linger with its
    port open), the supervisor restarts it, and once the lock is gone every record is
    ingested, once."""
    async with Platform(
        tmp_path / "data", nats_url=nats_server.url, services=("ingest",)
    ) as platform:
        await apply_objects(nc, ingest_objects(), dry_run=False, file=str(RETAIL_CONFIG))
        sup = platform.supervisor
        lock = sqlite3.connect(platform.db("ingest"), timeout=10, isolation_level=None)
        try:
            lock.execute("BEGIN EXCLUSIVE")
            await publish_web(nc, 0, 100)
            await eventually(lambda: _true(sup.starts("ingest") == 2), timeout=30)
        finally:
            if lock.in_transaction:
                lock.execute("ROLLBACK")
            lock.close()
        assert sup.last_exit("ingest") not in (0, None)
        assert "database is locked" in platform.log_tail("ingest", 50_000)
        await eventually(lambda: _true(web_accepted(platform) == 100), timeout=30)
        await publish_web(nc, 100, 10)  # and it goes on
        await eventually(lambda: _true(web_accepted(platform) == 110), timeout=30)
        assert await platform.all_ready() == {}
        assert sup.starts("ingest") == 2


@pytest.mark.timeout(30)
async def test_a_consumer_deleted_under_a_service_is_recreated(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    """Someone deletes the ingest service's durable consumer while it runs: the service
    creates it again (same name, from its committed offset) and the records flow."""
    svc = IngestService(settings_for("ingest", nats_server.url, tmp_path))
    await svc.start()
    try:
        await apply_objects(nc, ingest_objects(), dry_run=False, file=str(RETAIL_CONFIG))
        await publish_web(nc, 0, 5)

        async def accepted(n: int) -> bool:
            rows = await svc.db.execute_fetchall(
                "SELECT accepted FROM dataset_counts WHERE dataset = 'web'"
            )
            return bool(rows) and int(next(iter(rows))[0]) == n

        await eventually(lambda: accepted(5), timeout=10)
        await nc.jetstream().delete_consumer("CDP_INGEST", "ingest")
        await publish_web(nc, 5, 5)
        await eventually(lambda: accepted(10), timeout=15)

        async def ready() -> bool:
            return await svc.readiness() is None

        await eventually(ready, timeout=10)
        info = await nc.jetstream().consumer_info("CDP_INGEST", "ingest")
        assert info.delivered.stream_seq == 10
    finally:
        await svc.stop()


# -- a full disk: not ready with the reason, 503 at the door, healed when space is back ---------
@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted on `path` (a real full disk); unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill(disk: Path) -> Path:
    """Take every free byte of `disk` with one file; returns it (remove it to free space)."""
    filler = disk / "filler"
    st = os.statvfs(disk)
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        f.write(b"\0" * (st.f_bavail * st.f_frsize))
    return filler


async def readyz(port: int) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{port}/readyz") as r,
    ):
        return r.status, str((await r.json()).get("reason", ""))


async def ingest_counts(svc: IngestService) -> tuple[int, int]:
    """(accepted web records, rejected records) in the ingest service's SQLite file."""
    rows = await svc.db.execute_fetchall(
        "SELECT (SELECT coalesce(sum(accepted), 0) FROM dataset_counts WHERE dataset = 'web'),"
        " (SELECT count(*) FROM rejected_records)"
    )
    accepted, rejected = next(iter(rows))
    return int(accepted), int(rejected)


@pytest.mark.timeout(60)
async def test_a_full_disk_under_a_service_makes_it_not_ready_and_it_resumes(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    """The ingest service's data folder fills up: /readyz answers 503 with SQLite's reason,
    the process stays up; once space is freed it applies everything by itself, once."""
    with small_disk(tmp_path / "disk", "4m") as disk:
        svc = IngestService(settings_for("ingest", nats_server.url, disk))
        await svc.start()
        try:
            await apply_objects(nc, ingest_objects(), dry_run=False, file=str(RETAIL_CONFIG))
            await publish_web(nc, 0, 10)

            async def counts(want: tuple[int, int]) -> bool:
                return await ingest_counts(svc) == want

            await eventually(lambda: counts((10, 0)), timeout=10)
            filler = fill(disk)
            await publish_web(nc, 10, 300)

            async def full() -> bool:
                status, reason = await readyz(svc.health.port)
                return status == 503 and reason == "sqlite: database or disk is full"

            await eventually(full, timeout=15)
            assert await ingest_counts(svc) == (10, 0)
            filler.unlink()
            await eventually(lambda: counts((310, 0)), timeout=15)
            assert await readyz(svc.health.port) == (200, "")
        finally:
            await svc.stop()


@pytest.mark.timeout(90)
async def test_a_full_disk_under_nats_makes_the_door_answer_503_and_heals(tmp_path: Path) -> None:
    """nats-server's JetStream folder fills up: the HTTP door answers 503 (retry), never
    400, and keeps nothing in the error store; /readyz says why; once space is freed the
    watchdog restarts nats-server (a stream that failed a write fails every write until
    then), and clients that retry with their Idempotency-Key get every record ingested
    once."""
    with small_disk(tmp_path / "disk", "8m") as disk:
        server = NatsServer(
            disk / "jetstream",
            port=free_port(),
            monitor_port=free_port(),
            log_file=tmp_path / "nats.log",
        )
        await server.start()
        events: list[str] = []
        watchdog = NatsWatchdog(server, events.append, interval=0.2, backoff_initial=0.2)
        watchdog.start()
        client = await nats.connect(server.url)
        await ensure_streams(client.jetstream())  # as `cdp up` does: services only check
        svc = IngestService(settings_for("ingest", server.url, tmp_path / "data"))
        try:
            await svc.start()
            await apply_objects(client, ingest_objects(), dry_run=False, file=str(RETAIL_CONFIG))
            url = f"http://127.0.0.1:{svc.health.port}/v1/datasets/web/records"
            statuses: Counter[int] = Counter()

            async def post(s: aiohttp.ClientSession, i: int) -> int:
                headers = {"Idempotency-Key": f"rec-{i}"}
                async with s.post(url, json=web_record(i), headers=headers) as r:
                    statuses[r.status] += 1
                    return r.status

            async with aiohttp.ClientSession() as s:
                assert [await post(s, i) for i in range(10)] == [202] * 10
                filler = fill(disk)
                # nats-server acknowledges what it holds in memory: the write that fails
                # may come some records later.
                sent = 10
                while statuses[503] == 0:
                    assert sent < 200, statuses
                    await post(s, sent)
                    sent += 1
                status, reason = await readyz(svc.health.port)
                assert status == 503 and "JetStream storage full" in reason, reason
                filler.unlink()
                for i in range(10, sent):
                    deadline = time.monotonic() + 30
                    while await post(s, i) != 202:
                        assert time.monotonic() < deadline, f"record {i} never stored"
                        await asyncio.sleep(0.2)
            assert statuses[400] == 0, statuses

            async def counts(want: tuple[int, int]) -> bool:
                return await ingest_counts(svc) == want

            await eventually(lambda: counts((sent, 0)), timeout=20)
            assert watchdog.restarts >= 1, events
            assert any("JetStream" in e for e in events), events
            assert (await readyz(svc.health.port))[0] == 200
        finally:
            await svc.stop()
            await client.close()
            await watchdog.stop()
            await server.stop()
