"""The platform section: the six services as separate OS processes, as `cdp up` runs them,
measured end to end.

One nats-server with JetStream in a temporary folder on a free port, the six services
started by the supervisor behind `cdp up`, the retail example's configuration, the 50
segments of `bench/segments.py` and a webhook destination that posts to an aiohttp server
in this process. Then, in this order, on the same platform:

1. batch ingestion: `profiles` CRM rows (a CSV made by `scripts/gen`) through the object
   store and the ingest service's batch path, as `cdp ingest` sends them; then until every
   profile has reached segmentation (the pipeline drained);
2. batch segmentation: the job `cdp jobs run segmentation` starts, over every profile and
   every segment; first run (it realises the batch segments' members), then a second run
   (the daily job with nothing new);
3. profile lookups: `cdp.profile.lookup` requests, one at a time;
4. latency at a fixed offered load: events published at `rate` events/s (then at the
   lighter `low_rate`), each for a profile that has had none, so that each realises
   `bench-probe`; publish -> membership event, and membership event -> webhook delivery;
5. throughput: the web events `scripts/gen` makes for the first `stream_profiles`
   profiles (a mix of seven event types, cookies stitched to people by their logins),
   published as fast as JetStream takes them; first publish -> last membership event.

Every step has a time limit and checks that its work adds up (rows accepted, profiles
reached, jobs that scanned every profile, every probe membership and webhook delivery
arrived, no membership event lost between the stream and the subscriber).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from bench import Progress, Result, procs, rate
from bench import segments as bench_segments
from ops.cli.apply import apply_objects, load_file
from ops.cli.ingest import run_batch
from ops.natsd import free_port
from ops.platform import NotReady, Platform
from shared import admin, subjects
from shared.admin import (
    BatchInfo,
    ConfigObject,
    EstimateRequest,
    EstimateResult,
    JobInfo,
    JobList,
    JobRun,
    ListRequest,
    SegmentList,
)

ROOT = Path(__file__).resolve().parent.parent
RETAIL_CONFIG = ROOT / "examples" / "retail" / "config.yaml"
GEN = ROOT / "scripts" / "gen"
WEBHOOK = "bench-webhook"
WEBHOOK_SECRET_VAR = "CDP_SECRET_BENCH_WEBHOOK"
KEEP_VAR = "CDP_BENCH_KEEP"
"""A folder to run the platform in and keep afterwards (default: a temporary one)."""
EVENT_TYPES = (
    "web.pageview",
    "web.productview",
    "web.search",
    "cart.add",
    "cart.remove",
    "app.login",
    "app.open",
)


class PlatformError(Exception):
    """A platform measure did not finish in time, or its work does not add up."""


@dataclass(frozen=True)
class Scale:
    """How much work each measure does. The defaults are the issue's sizes."""

    profiles: int = 1_000_000
    """CRM rows ingested in one batch; the population of the batch segmentation job."""
    stream_profiles: int = 100_000
    """People whose web events the throughput measure streams."""
    events_per_profile: int = 2
    rate: int = 5_000
    """Offered load of the latency measure, events/s."""
    latency_seconds: float = 10.0
    low_rate: int = 1_000
    """A second, lighter offered load, events/s (what the latency is below saturation)."""
    low_seconds: float = 5.0
    lookups: int = 2_000

    @classmethod
    def of(cls, profiles: int) -> Scale:
        """The issue's proportions for `profiles` CRM rows (a tenth of them stream)."""
        return cls(profiles=profiles, stream_profiles=max(100, profiles // 10))

    @property
    def latency_events(self) -> tuple[int, int]:
        """Events at `rate` and at `low_rate`: one per profile that has had none, so at
        most the profiles not streamed (shared in proportion when there are too few)."""
        wanted = (int(self.rate * self.latency_seconds), int(self.low_rate * self.low_seconds))
        room = max(0, self.profiles - self.stream_profiles)
        if sum(wanted) <= room:
            return wanted
        first = room * wanted[0] // sum(wanted)
        return first, room - first


# -- time limits -------------------------------------------------------------------------
def limit_for(work: int, per_second: float, floor_s: float = 60.0) -> float:
    """A generous time limit: `work` at `per_second`, never under `floor_s`."""
    return max(floor_s, work / per_second)


@asynccontextmanager
async def bounded(what: str, seconds: float) -> AsyncIterator[None]:
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise PlatformError(f"{what}: not done within {seconds:.0f}s") from None


async def until(check: Callable[[], bool], interval: float = 0.05) -> None:
    """Poll `check` until it holds (callers bound the wait)."""
    while True:
        if check():
            return
        await asyncio.sleep(interval)


# -- the platform ------------------------------------------------------------------------
@dataclass
class Live:
    """The platform under measure, and the benchmark's connection to it."""

    platform: Platform
    nc: Client
    js: JetStreamContext


@asynccontextmanager
async def platform_up(folder: Path, extra_env: dict[str, str]) -> AsyncIterator[Live]:
    """nats-server, the streams and the six services as processes, as `cdp up` does."""
    platform = Platform(folder / "var", env=extra_env, ready_timeout=90)
    try:
        await platform.start()
    except NotReady as exc:
        raise PlatformError(f"services not ready within 90s: {exc.states}") from None
    nc: Client | None = None
    try:
        nc = await platform.connect("cdp-bench")
        yield Live(platform, nc, nc.jetstream())
    finally:
        try:
            if nc is not None:
                await nc.close()
        finally:
            codes = await platform.stop()
    bad = {n: c for n, c in codes.items() if c not in (0, None)}
    if bad:
        raise PlatformError(f"services exited with errors: {bad} (logs in {platform.logs})")


async def drained(js: JetStreamContext, quiet_s: float = 0.5) -> None:
    """Wait until every consumer of every stream has nothing pending or unacknowledged and
    no stream grows for `quiet_s`: the platform has finished what it was given."""
    last: dict[str, int] | None = None
    while True:
        busy = False
        seqs: dict[str, int] = {}
        for info in await js.streams_info():
            name = info.config.name or ""
            seqs[name] = info.state.last_seq
            for c in await js.consumers_info(name):
                if c.num_pending or c.num_ack_pending:
                    busy = True
        if not busy and seqs == last:
            return
        last = None if busy else seqs
        await asyncio.sleep(quiet_s if not busy else 0.2)


async def stream_last_seq(js: JetStreamContext, stream: str) -> int:
    return int((await js.stream_info(stream)).state.last_seq)


# -- data ----------------------------------------------------------------------------------
def generate(out: Path, profiles: int, events: int) -> None:
    """`scripts/gen` into `out` (the same seed: profile i is the same person at any size)."""
    subprocess.run(
        [
            sys.executable,
            str(GEN),
            "--profiles",
            str(profiles),
            "--events-per-profile",
            str(events),
            "--out",
            str(out),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def crm_emails(path: Path, start: int, count: int) -> list[str]:
    """The emails of CRM rows from row `start` on, `count` of them (rows without one are
    passed over)."""
    out: list[str] = []
    with path.open(encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            if i < start or not row["email"]:
                continue
            if len(out) >= count:
                break
            out.append(row["email"])
    return out


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_json = msgspec.json.Encoder()


def restamped_events(path: Path, now: float) -> tuple[list[bytes], int]:
    """The web events of `path`, in file order, with timestamps moved to the last minutes
    before `now` (1 ms apart, order kept), so that windowed segments see them live.

    Also returns how many profiles will hold a login: the identity graph of the events
    (a cookie and the email a login carries are one person; a login without an email
    stays on its cookie), counted by union-find as the identity service stitches them."""
    raw = path.read_bytes().splitlines()
    out: list[bytes] = []
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        parent.setdefault(key, key)
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    logged_in: list[str] = []
    n = len(raw)
    for i, line in enumerate(raw):
        event = json.loads(line)
        event["timestamp"] = iso(now - (n - i) * 0.001)
        cookie = f"ecid:{event['ecid']}"
        email = event.get("email")
        if email:
            parent[root(cookie)] = root(f"email:{email.strip().lower()}")
        if event.get("eventType") == "app.login":
            logged_in.append(cookie)
        out.append(_json.encode(event))
    return out, len({root(c) for c in logged_in})


def latency_event(i: int, email: str | None, ts: float, cookie: str = "bench-latency") -> bytes:
    """A web event for the person with `email` (none: an anonymous visitor), on a new
    cookie `<cookie>-<i>`: a profile that has had no event, so it realises `bench-probe`.
    Event types cycle through the seven."""
    kind = EVENT_TYPES[i % len(EVENT_TYPES)]
    event: dict[str, Any] = {
        "timestamp": iso(ts),
        "eventType": kind,
        "ecid": f"{cookie}-{i}",
        "page": {"url": "https://shop.example.com/cart", "name": "cart"},
        "device": {"type": "mobile", "os": "iOS"},
    }
    if email is not None:
        event["email"] = email
    if kind in ("web.productview", "cart.add", "cart.remove"):
        event["product"] = {
            "sku": "SKU-10000",
            "name": "Classic Runner",
            "category": "shoes",
            "price": 120.0,
        }
    return _json.encode(event)


# -- observers -------------------------------------------------------------------------------
class _Membership(msgspec.Struct):
    profile_id: str
    segment: str
    status: str
    identities: list[dict[str, str]] = []


_membership = msgspec.json.Decoder(_Membership)


@dataclass
class Memberships:
    """Every membership event on `cdp.membership.>`, with when it arrived here."""

    count: int = 0
    """Messages received, re-publications included (see `ids`)."""
    ids: set[str] = field(default_factory=set)
    """Their distinct Nats-Msg-Id: a message published again after a lost acknowledgement is
    stored once by the stream (de-duplicated) but reaches core subscribers twice."""
    last_at: float = 0.0
    probe_by_email: dict[str, float] = field(default_factory=dict)
    """bench-probe realisations, by the email among the profile's identities."""
    arrived: dict[tuple[str, str, str], float] = field(default_factory=dict)
    """(profile id, segment, status) -> first arrival, for the webhook's segments."""
    track_probe: bool = False

    async def on_msg(self, msg: Msg) -> None:
        now = time.perf_counter()
        self.count += 1
        msg_id = msg.headers.get("Nats-Msg-Id") if msg.headers else None
        if msg_id is not None:
            if msg_id in self.ids:
                return  # a re-publication: the first one counted
            self.ids.add(msg_id)
        self.last_at = now
        if not self.track_probe or not msg.subject.endswith(bench_segments.PROBE):
            return
        try:
            ev = _membership.decode(msg.data)
        except msgspec.DecodeError:
            return
        self.arrived.setdefault((ev.profile_id, ev.segment, ev.status), now)
        if ev.status == "realized":
            for ident in ev.identities:
                if ident.get("namespace") == "email":
                    self.probe_by_email.setdefault(ident.get("value", ""), now)


class _Activation(msgspec.Struct):
    profile_id: str
    segment: str
    status: str


class _WebhookBody(msgspec.Struct):
    activations: list[_Activation]


_webhook_body = msgspec.json.Decoder(_WebhookBody)


@dataclass
class Webhook:
    """The webhook destination's receiver: when each activation arrived."""

    received: dict[tuple[str, str, str], float] = field(default_factory=dict)
    requests: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        now = time.perf_counter()
        self.requests += 1
        for a in _webhook_body.decode(body).activations:
            self.received.setdefault((a.profile_id, a.segment, a.status), now)
        return web.Response(status=200)


@asynccontextmanager
async def webhook_server() -> AsyncIterator[tuple[Webhook, str]]:
    hook = Webhook()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/hook", hook.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield hook, f"http://127.0.0.1:{port}/hook"
    finally:
        await runner.cleanup()


# -- statistics --------------------------------------------------------------------------------
def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile of `values` (p in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def latency_results(name: str, seconds: list[float], detail: str) -> list[Result]:
    ms = [s * 1000 for s in seconds]
    return [
        Result(
            name=f"{name} p{p}",
            unit="ms",
            value=round(percentile(ms, p), 3),
            detail=detail,
            count=len(ms),
        )
        for p in (50, 95, 99)
    ]


# -- the measures ----------------------------------------------------------------------------
async def configure(p: Live, webhook_url: str) -> None:
    objects = load_file(RETAIL_CONFIG)
    objects += [ConfigObject("segment", s) for s in bench_segments.objects()]
    objects.append(
        ConfigObject(
            "destination",
            {
                "name": WEBHOOK,
                "type": "webhook",
                "description": "benchmark receiver",
                "segments": [bench_segments.PROBE],
                "connection": {"url": webhook_url},
                "secrets": {"signing_secret": WEBHOOK_SECRET_VAR},
                "aggregation": {"mode": "best_effort", "max_users_per_request": 1000},
            },
        )
    )
    await apply_objects(p.nc, objects, dry_run=False, file="benchmark configuration")


async def profiles_in_segmentation(nc: Client) -> int:
    found = await admin.request(
        nc,
        subjects.admin("segmentation", "estimate"),
        EstimateRequest("email exists", 1),
        EstimateResult,
        timeout=30,
    )
    return found.profiles


async def batch_ingestion(p: Live, scale: Scale, crm: Path) -> list[Result]:
    rows = scale.profiles
    pids = p.platform.pids()
    cpu_before = procs.CpuSample.take(pids)
    started = time.perf_counter()
    async with bounded("batch ingestion", limit_for(rows, 2_000, 120)):
        info: BatchInfo = await run_batch(p.nc, "crm", crm, "csv", lambda _i: None)
    accepted_s = time.perf_counter() - started
    if info.status != "success" or info.accepted != rows:
        raise PlatformError(
            f"batch ingestion: status {info.status}, {info.accepted} of {rows} rows accepted "
            f"({info.error})"
        )
    async with bounded("batch ingestion: reaching segmentation", limit_for(rows, 500, 120)):
        await drained(p.js)
    reflected_s = time.perf_counter() - started
    spent = procs.cpu_spent(cpu_before, procs.CpuSample.take(pids))
    reached = await profiles_in_segmentation(p.nc)
    if reached != rows:
        raise PlatformError(f"batch ingestion: {reached} of {rows} profiles reached segmentation")
    return [
        rate(
            "batch ingestion, accepted",
            "rows/s",
            rows,
            accepted_s,
            f"{rows:,}-row CRM CSV: upload to the object store, then validated, spooled and "
            "published to identity by ingest (the batch's status turns success)",
        ),
        rate(
            "batch ingestion, reflected",
            "rows/s",
            rows,
            reflected_s,
            "the same rows, until every profile has reached segmentation and every consumer "
            "of every stream is idle (identity, profile, segmentation and the memberships "
            "the attribute segments make)",
        ),
        *procs.cpu_results(BATCH_MEASURE, spent, rows),
    ]


BATCH_MEASURE = "batch ingestion"
"""The batch ingestion measure's name in the CPU table: CPU per row, upload to reflected."""


async def run_job(p: Live, total: int, label: str) -> tuple[Result, JobInfo]:
    t0 = time.perf_counter()
    job = await admin.request(
        p.nc,
        subjects.admin("segmentation", "job.run"),
        JobRun(trigger="bench"),
        JobInfo,
        timeout=600,
    )
    if job.total != total:
        raise PlatformError(f"segmentation job: {job.total} profiles, expected {total}")
    final = job
    async with bounded(f"batch segmentation ({label})", limit_for(total, 250, 120)):
        while final.status not in ("succeeded", "failed"):
            await asyncio.sleep(0.5)
            listed = await admin.request(
                p.nc, subjects.admin("segmentation", "jobs"), ListRequest(limit=50), JobList
            )
            final = next((j for j in listed.jobs if j.job_id == job.job_id), final)
    seen_s = time.perf_counter() - t0
    if final.status != "succeeded" or final.scanned != total:
        raise PlatformError(
            f"segmentation job {final.job_id}: {final.status}, {final.scanned} of {total} "
            f"profiles ({final.error})"
        )
    missing = {n for n, _ in bench_segments.ALL} - set(final.counts)
    if missing:
        raise PlatformError(f"segmentation job: no counts for {sorted(missing)}")
    seconds = (final.finished_at or 0.0) - final.started_at
    members = sum(c.get("members", 0) for c in final.counts.values())
    realized = sum(c.get("realized", 0) for c in final.counts.values())
    exited = sum(c.get("exited", 0) for c in final.counts.values())
    return (
        Result(
            name=f"batch segmentation, {label}",
            unit="s",
            value=round(seconds, 2),
            detail=(
                f"{total:,} profiles x {len(final.counts)} segments, job start to end "
                f"(its record; {seen_s:.1f}s as seen by the client); {members:,} members, "
                f"{realized:,} realized, {exited:,} exited"
            ),
            count=total,
            seconds=round(seconds, 4),
        ),
        final,
    )


async def batch_segmentation(p: Live, scale: Scale) -> list[Result]:
    first, _ = await run_job(p, scale.profiles, "first run")
    limit = limit_for(scale.profiles, 1_000)
    async with bounded("batch segmentation: memberships delivered", limit):
        await drained(p.js)
    second, _ = await run_job(p, scale.profiles, "second run")
    async with bounded("batch segmentation: settled", limit):
        await drained(p.js)
    return [first, second]


async def lookup_times(p: Live, emails: list[str], until_s: float | None = None) -> list[float]:
    """`cdp.profile.lookup` of each email, one at a time: the seconds each took. With
    `until_s`, no lookup starts after that many seconds (the rest are left out)."""
    took: list[float] = []
    stop_at = time.perf_counter() + until_s if until_s is not None else None
    async with bounded("profile lookups", limit_for(len(emails), 50)):
        for email in emails:
            if stop_at is not None and time.perf_counter() >= stop_at:
                break
            body = _json.encode({"identity": f"email:{email}", "events": 20})
            t0 = time.perf_counter()
            msg = await p.nc.request(subjects.PROFILE_LOOKUP, body, timeout=10)
            took.append(time.perf_counter() - t0)
            reply = json.loads(msg.data)
            if not reply.get("ok"):
                raise PlatformError(f"profile lookup of {email}: {reply.get('error')}")
    return took


LOOKUP_DETAIL = (
    "cdp.profile.lookup requests one at a time (NATS request/reply, JSON, 20 latest events), "
    "random CRM people"
)


async def lookups(p: Live, emails: list[str]) -> list[Result]:
    took = await lookup_times(p, emails)
    return [
        r
        for r in latency_results("profile lookup", took, f"{len(took):,} {LOOKUP_DETAIL}")
        if not r.name.endswith("p95")
    ]


LOAD_WARM_UP_S = 1.0
"""How long the paced load runs before the lookups under load start."""
LOAD_LOOKUPS_S = 5.0
"""How long lookups are issued under load (the load stops with them): at 1,000 events/s,
6,000 events, about what the latency measure at that rate publishes."""


async def paced_load(js: JetStreamContext, rate: int, stop: asyncio.Event) -> int:
    """Publish anonymous web events (each on a new cookie, so a new profile that realises
    `bench-probe`) to `cdp.ingest.web` at `rate` events/s, paced every 10 ms, until `stop`
    is set; returns how many were published (every one acknowledged)."""
    tick = 0.01
    per_tick = max(1, round(rate * tick))
    acks: list[asyncio.Future[Any]] = []
    sent = 0
    start = time.perf_counter()
    while not stop.is_set():
        delay = start + (sent // per_tick) * tick - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        now = time.time()
        for _ in range(per_tick):
            event = latency_event(sent, None, now, cookie="bench-load")
            acks.append(asyncio.ensure_future(js.publish("cdp.ingest.web", event)))
            sent += 1
        if len(acks) >= 2000:
            await asyncio.gather(*acks)
            acks = []
    await asyncio.gather(*acks)
    return sent


async def lookups_under_load(p: Live, emails: list[str], rate: int) -> list[Result]:
    """The same lookups while `rate` events/s stream in (a personalisation call arrives
    while the platform works): lookups start once the load has run `LOAD_WARM_UP_S`, and
    are issued for `LOAD_LOOKUPS_S` at most; then the load stops."""
    stop = asyncio.Event()
    started = time.perf_counter()
    publisher = asyncio.create_task(paced_load(p.js, rate, stop), name="paced-load")
    try:
        await asyncio.wait({publisher}, timeout=LOAD_WARM_UP_S)
        if publisher.done():  # it failed: say why
            await publisher
        took = await lookup_times(p, emails, until_s=LOAD_LOOKUPS_S)
    finally:
        stop.set()
        async with bounded("lookups under load: publishing", 60):
            sent = await publisher
    offered = sent / (time.perf_counter() - started)
    async with bounded("lookups under load: settled", limit_for(sent, 200)):
        await drained(p.js)
    return [
        r
        for r in latency_results(
            f"profile lookup under {rate:,} events/s",
            took,
            f"{len(took):,} {LOOKUP_DETAIL}, while anonymous web events were published at "
            f"{offered:,.0f}/s offered (target {rate:,}/s, {sent:,} events, each a new profile)",
        )
        if not r.name.endswith("p95")
    ]


async def paced_latency(
    p: Live, rate: int, emails: list[str], seen: Memberships, hook: Webhook
) -> list[Result]:
    n = len(emails)
    if n == 0:
        return []
    tick = 0.01
    per_tick = max(1, round(rate * tick))
    published: dict[str, float] = {}
    acks: list[asyncio.Future[Any]] = []
    seen.arrived.clear()
    seen.probe_by_email.clear()
    seen.track_probe = True
    now = time.time()
    payloads = [latency_event(i, e, now) for i, e in enumerate(emails)]
    start = time.perf_counter()
    async with bounded("latency: publishing", n / rate + 60):
        for first in range(0, n, per_tick):
            due = start + (first // per_tick) * tick
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            for i in range(first, min(first + per_tick, n)):
                published[emails[i]] = time.perf_counter()
                acks.append(asyncio.ensure_future(p.js.publish("cdp.ingest.web", payloads[i])))
            if len(acks) >= 2000:
                await asyncio.gather(*acks)
                acks = []
        await asyncio.gather(*acks)
    offered_s = time.perf_counter() - start
    async with bounded("latency: every membership event", limit_for(n, 200)):
        await until(lambda: len(seen.probe_by_email) >= n)
    pending = {(k[0], k[1], k[2]) for k in seen.arrived if k[2] == "realized"}
    async with bounded("latency: every webhook delivery", limit_for(n, 200)):
        await until(lambda: pending <= hook.received.keys())
    seen.track_probe = False
    ingest_to_member = [seen.probe_by_email[e] - published[e] for e in emails]
    member_to_hook = [hook.received[k] - seen.arrived[k] for k in pending]
    offered = n / offered_s if offered_s else 0.0
    at = f" at {rate:,}/s"
    return [
        *latency_results(
            f"ingest publish -> membership event{at}",
            ingest_to_member,
            f"{n:,} events at {offered:,.0f}/s offered (target {rate:,}/s, paced every "
            f"{tick * 1000:.0f} ms), each for a person with no event yet: from the publish to "
            "cdp.ingest.web to its bench-probe membership event arriving at a subscriber",
        ),
        *latency_results(
            f"membership event -> webhook delivery{at}",
            member_to_hook,
            f"the same {len(member_to_hook):,} realizations: from the membership event "
            f"arriving at a subscriber to the webhook POST carrying it arriving at a local "
            f"aiohttp receiver ({hook.requests:,} requests, best_effort)",
        ),
    ]


async def throughput(p: Live, events: list[bytes], logins: int, seen: Memberships) -> list[Result]:
    before = await segment_members(p.nc, bench_segments.LOGGED_IN)
    membership_seq = await stream_last_seq(p.js, subjects.STREAM_MEMBERSHIP.name)
    count_before, ids_before = seen.count, len(seen.ids)
    n = len(events)
    window = PUBLISH_WINDOW
    pids = p.platform.pids()
    cpu_before = procs.CpuSample.take(pids)
    started = time.perf_counter()
    async with bounded("throughput: publishing", limit_for(n, 500)):
        await publish_all(p.js, events)
    published_s = time.perf_counter() - started
    async with bounded("throughput: drained", limit_for(n, 300)):
        await drained(p.js)
    last = seen.last_at
    spent = procs.cpu_spent(cpu_before, procs.CpuSample.take(pids))
    after = await segment_members(p.nc, bench_segments.LOGGED_IN)
    made = await stream_last_seq(p.js, subjects.STREAM_MEMBERSHIP.name) - membership_seq
    received = len(seen.ids) - ids_before
    again = seen.count - count_before - received
    if after - before != logins:
        raise PlatformError(
            f"throughput: {after - before} new {bench_segments.LOGGED_IN} members, "
            f"expected {logins} (profiles with a login)"
        )
    if received != made:
        raise PlatformError(
            f"throughput: {received} distinct membership events received of {made} stored"
        )
    return [
        rate(
            "end-to-end streaming throughput",
            "events/s",
            n,
            last - started,
            f"{n:,} web events of 7 types ({logins:,} profiles with a login), acked JetStream "
            f"publishes in windows of {window:,}: first publish to the last of the {made:,} "
            f"membership events they caused (publishing alone took {published_s:.1f}s; "
            f"{again:,} membership events arrived twice, published again after an "
            "acknowledgement timed out)",
        ),
        *procs.cpu_results(THROUGHPUT_MEASURE, spent, n),
    ]


PUBLISH_WINDOW = 1_000
"""Acked JetStream publishes in flight at once when publishing as fast as possible."""
THROUGHPUT_MEASURE = "end to end"
"""The throughput measure's name in the CPU table."""


async def publish_all(js: JetStreamContext, events: list[bytes]) -> None:
    """Publish `events` to `cdp.ingest.web` as fast as JetStream acknowledges them:
    `PUBLISH_WINDOW` in flight, each window gathered before the next."""
    for first in range(0, len(events), PUBLISH_WINDOW):
        await asyncio.gather(
            *(js.publish("cdp.ingest.web", e) for e in events[first : first + PUBLISH_WINDOW])
        )


async def segment_members(nc: Client, name: str) -> int:
    listed = await admin.request(
        nc, subjects.admin("segmentation", "list"), ListRequest(), SegmentList, timeout=30
    )
    return next((s.members for s in listed.segments if s.name == name), 0)


# -- the section -------------------------------------------------------------------------------
async def run(progress: Progress, scale: Scale | None = None) -> list[Result]:
    scale = scale or Scale()
    results: list[Result] = []

    def add(more: Iterable[Result]) -> None:
        """Keep these results, and tell each at once: a later step that fails does not
        take the earlier figures with it."""
        for r in more:
            if not procs.is_process_row(r):  # those are printed as tables at the end
                progress(f"{r.name}: {r.value:,.3f} {r.unit}")
            results.append(r)

    with contextlib.ExitStack() as stack:
        kept = os.environ.get(KEEP_VAR)
        if kept:  # keep the platform's folder (logs, SQLite files) to look into afterwards
            folder = Path(kept)
            folder.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - set-up only
        else:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cdp-bench-")))
        progress(f"generating {scale.profiles:,} CRM rows and web events (scripts/gen)")
        await asyncio.to_thread(generate, folder / "batch", scale.profiles, 0)
        await asyncio.to_thread(
            generate, folder / "stream", scale.stream_profiles, scale.events_per_profile
        )
        crm = folder / "batch" / "crm.csv"
        high, low = scale.latency_events
        latency_emails = crm_emails(crm, scale.stream_profiles, high + low)
        every = max(1, scale.profiles // scale.lookups)
        lookup_emails = crm_emails(crm, 0, scale.profiles)[::every]
        progress("starting nats-server and the six services")
        async with (
            webhook_server() as (hook, url),
            platform_up(folder, {WEBHOOK_SECRET_VAR: "bench-secret"}) as p,
        ):

            def memory(after: str) -> None:
                """The peak resident memory of every process so far, after `after` (told at
                once too: a later step that fails does not take it with it)."""
                found = procs.memory_results(after, p.platform.pids())
                results.extend(found)
                told = ", ".join(f"{r.name.rpartition(': ')[2]} {r.value:,.0f}" for r in found)
                progress(f"peak memory (MiB) after {after}: {told}")

            seen = Memberships()
            watcher = await p.platform.connect("cdp-bench-memberships")
            try:
                await watcher.subscribe(
                    subjects.MEMBERSHIP_ALL,
                    cb=seen.on_msg,
                    pending_msgs_limit=-1,
                    pending_bytes_limit=-1,
                )
                await watcher.flush()
                await configure(p, url)
                progress(f"batch ingestion of {scale.profiles:,} CRM rows")
                add(await batch_ingestion(p, scale, crm))
                memory("batch ingestion")
                progress(f"batch segmentation of {scale.profiles:,} profiles")
                add(await batch_segmentation(p, scale))
                memory("batch segmentation")
                progress(f"{len(lookup_emails):,} profile lookups")
                add(await lookups(p, lookup_emails))
                progress(f"{len(lookup_emails):,} profile lookups under {scale.low_rate:,}/s")
                add(await lookups_under_load(p, lookup_emails, scale.low_rate))
                memory("lookups")
                for rate, emails in (
                    (scale.rate, latency_emails[:high]),
                    (scale.low_rate, latency_emails[high:]),
                ):
                    progress(f"latency at {rate:,} events/s")
                    add(await paced_latency(p, rate, emails, seen, hook))
                    async with bounded("latency: settled", limit_for(len(emails), 200)):
                        await drained(p.js)
                    memory(f"latency at {rate:,}/s")
                events, logins = restamped_events(folder / "stream" / "web.jsonl", time.time())
                progress(f"throughput: {len(events):,} events")
                add(await throughput(p, events, logins, seen))
                memory("throughput")
            finally:
                await watcher.close()
    return results


# -- ratios to the floors ----------------------------------------------------------------------
RATIOS: tuple[tuple[str, str, str], ...] = (
    ("end-to-end streaming throughput", "bare pipeline, end to end", "events/s over events/s"),
    ("end-to-end streaming throughput", "actor hop, batched", "events/s over records/s"),
    ("end-to-end streaming throughput", "actor hop, single", "events/s over records/s"),
    ("end-to-end streaming throughput", "JetStream publish", "events/s over msg/s"),
    ("batch ingestion, accepted", "SQLite batched inserts", "rows/s over rows/s"),
    ("batch ingestion, accepted", "JetStream publish", "rows/s over msg/s"),
    ("batch ingestion, reflected", "actor hop, batched", "rows/s over records/s"),
    ("batch segmentation, first run", "actor hop, batched", "profiles/s over records/s"),
    ("batch segmentation, second run", "actor hop, batched", "profiles/s over records/s"),
)


def ratios(floor_results: list[Result], platform_results: list[Result]) -> list[Result]:
    """Each platform figure over the floor it is bounded by, from the same run."""
    floors = {r.name: r for r in floor_results}
    mine = {r.name: r for r in platform_results}
    out: list[Result] = []
    for name, floor_name, how in RATIOS:
        a, b = mine.get(name), floors.get(floor_name)
        if a is None or b is None or not b.value:
            continue
        value = a.value
        if a.unit == "s":  # a time for an amount of work: compare its rate
            value = a.count / a.seconds if a.seconds else 0.0
        out.append(
            Result(
                name=f"{name} / {floor_name}",
                unit="x",
                value=round(value / b.value, 4),
                detail=f"{how}: {value:,.0f} / {b.value:,.0f}",
            )
        )
    return out
