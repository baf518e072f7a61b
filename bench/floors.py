"""The physical floors: what this machine does with NATS, JetStream and SQLite alone, and
with one bare actor hop built on the platform's runtime.

Each floor does a fixed amount of work, against a nats-server of its own (JetStream in a
temporary folder, a free port) when it needs one, and returns one `Result`. Every wait
is bounded by `FLOOR_TIMEOUT_S`; a floor that does not finish in time raises.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import aiosqlite
import msgspec
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from bench import Progress, Result, rate
from ops.cli.apply import apply_objects, load_file
from ops.natsd import NatsServer, free_port
from ops.platform import Platform
from shared import subjects
from shared.config import Settings
from shared.db import Migration, open_db
from shared.messages import RecordEnvelope
from shared.resources import OWNERS
from shared.runtime import ConsumerSpec, Service, Step
from shared.streams import ensure_streams
from shared.subjects import StreamSpec

RAW_MESSAGES = 200_000
RAW_PAYLOAD_BYTES = 64
JS_MESSAGES = 100_000
JS_PAYLOAD_BYTES = 64
PUBLISH_WINDOW = 1_000
"""JetStream publishes in flight at once: a window is gathered before the next starts."""
SQLITE_ROWS = 500_000
SQLITE_TX_ROWS = 1_000
HOP_MESSAGES = 2_000
HOP_RECORDS_PER_MESSAGE = 200
HOP_SINGLE_MESSAGES = 20_000
FLOOR_TIMEOUT_S = 90.0


class FloorError(Exception):
    """A floor did not complete its work (timeout, or a count that does not add up)."""


# -- helpers ---------------------------------------------------------------------------
@asynccontextmanager
async def nats_server() -> AsyncIterator[tuple[NatsServer, Path]]:
    """A nats-server with JetStream in a fresh temporary folder; yields it and the folder."""
    with tempfile.TemporaryDirectory(prefix="cdp-bench-") as tmp:
        folder = Path(tmp)
        server = NatsServer(folder / "jetstream", port=free_port(), log_file=folder / "nats.log")
        await server.start()
        try:
            yield server, folder
        finally:
            await server.stop()


@asynccontextmanager
async def connect(server: NatsServer) -> AsyncIterator[Client]:
    nc = await nats.connect(server.url, name="cdp-bench", allow_reconnect=False)
    try:
        yield nc
    finally:
        await nc.close()


@asynccontextmanager
async def bounded(what: str, seconds: float = FLOOR_TIMEOUT_S) -> AsyncIterator[None]:
    """Run the block within `seconds`, else raise FloorError naming `what`."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise FloorError(f"{what}: not done within {seconds:.0f}s") from None


class Arrivals:
    """Counts messages of a core subscription; records when the `expected`-th arrives."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.last_at = 0.0
        self.done = asyncio.Event()

    async def on_msg(self, _msg: Msg) -> None:
        self.count += 1
        if self.count == self.expected:
            self.last_at = time.perf_counter()
            self.done.set()

    async def wait(self, what: str, deadline: float) -> float:
        """Wait until every expected message arrived; returns when the last one did."""
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                await self.done.wait()
        except TimeoutError:
            raise FloorError(
                f"{what}: {self.count} of {self.expected} messages arrived "
                f"within {FLOOR_TIMEOUT_S:.0f}s"
            ) from None
        return self.last_at


async def publish_windows(
    js: JetStreamContext, subject: str, payloads: Sequence[bytes], window: int = PUBLISH_WINDOW
) -> None:
    """JetStream-publish every payload, `window` at a time, each window gathered."""
    for start in range(0, len(payloads), window):
        await asyncio.gather(*(js.publish(subject, p) for p in payloads[start : start + window]))


# -- the records every SQLite floor writes ------------------------------------------------
RECORDS_TABLE = """
CREATE TABLE records (
    id INTEGER NOT NULL,
    profile TEXT NOT NULL,
    kind TEXT NOT NULL,
    ts REAL NOT NULL,
    value INTEGER NOT NULL
)
"""
RECORDS_INSERT = "INSERT INTO records (id, profile, kind, ts, value) VALUES (?, ?, ?, ?, ?)"
KINDS = ("web.pageview", "cart.add", "commerce.purchase", "login")
BASE_TS = 1_764_000_000.0

Row = tuple[int, str, str, float, int]


class HopRecord(msgspec.Struct, frozen=True):
    """One small record of an actor hop's input (a msgpack map, as on internal subjects)."""

    id: int
    profile: str
    kind: str
    ts: float
    value: int


def row(i: int) -> Row:
    return (i, f"p{i % 10_000:05d}", KINDS[i % len(KINDS)], BASE_TS + i / 1000, i % 1000)


# -- 1. raw NATS ---------------------------------------------------------------------------
async def raw_nats(messages: int = RAW_MESSAGES) -> Result:
    """Core NATS publish -> subscribe in one process: first publish to last message received."""
    subject = "bench.raw"
    payload = b"x" * RAW_PAYLOAD_BYTES
    async with nats_server() as (server, _), connect(server) as nc:
        arrivals = Arrivals(messages)
        await nc.subscribe(
            subject, cb=arrivals.on_msg, pending_msgs_limit=messages + 1, pending_bytes_limit=-1
        )
        await nc.flush()
        deadline = time.monotonic() + FLOOR_TIMEOUT_S
        started = time.perf_counter()
        for _ in range(messages):
            await nc.publish(subject, payload)
        await nc.flush()
        last = await arrivals.wait("raw NATS", deadline)
    return rate(
        "raw NATS pub -> sub",
        "msg/s",
        messages,
        last - started,
        f"core messages of {RAW_PAYLOAD_BYTES} B, one process, first publish to last received",
    )


# -- 2. JetStream publish ----------------------------------------------------------------
JS_STREAM = StreamSpec("BENCH_JS", ("bench.js",), "bench: JetStream publish floor")


async def jetstream_publish(messages: int = JS_MESSAGES) -> Result:
    """JetStream publish with acks to a file-storage stream, `PUBLISH_WINDOW` in flight."""
    payloads = [b"x" * JS_PAYLOAD_BYTES] * messages
    async with nats_server() as (server, _), connect(server) as nc:
        js = nc.jetstream()
        await ensure_streams(js, (JS_STREAM,), buckets=())
        started = time.perf_counter()
        async with bounded("JetStream publish"):
            await publish_windows(js, "bench.js", payloads)
        seconds = time.perf_counter() - started
        stored = (await js.stream_info(JS_STREAM.name)).state.messages
    if stored != messages:
        raise FloorError(f"JetStream publish: {stored} of {messages} messages stored")
    return rate(
        "JetStream publish",
        "msg/s",
        messages,
        seconds,
        f"{JS_PAYLOAD_BYTES} B to a file stream, acked js.publish, "
        f"windows of {PUBLISH_WINDOW:,} gathered",
    )


# -- 3. SQLite -------------------------------------------------------------------------------
async def sqlite_inserts(rows: int = SQLITE_ROWS, per_tx: int = SQLITE_TX_ROWS) -> Result:
    """Batched inserts through aiosqlite: WAL, synchronous=NORMAL, one executemany per tx."""
    batches = [
        [row(i) for i in range(start, min(start + per_tx, rows))]
        for start in range(0, rows, per_tx)
    ]
    with tempfile.TemporaryDirectory(prefix="cdp-bench-") as tmp:
        db = await open_db(Path(tmp) / "floor.db", (Migration("bench", 1, RECORDS_TABLE),))
        try:
            started = time.perf_counter()
            async with bounded("SQLite inserts"):
                for batch in batches:
                    await db.execute("BEGIN IMMEDIATE")
                    await db.executemany(RECORDS_INSERT, batch)
                    await db.execute("COMMIT")
            seconds = time.perf_counter() - started
            stored = await count_rows(db)
        finally:
            await db.close()
    if stored != rows:
        raise FloorError(f"SQLite inserts: {stored} of {rows} rows stored")
    return rate(
        "SQLite batched inserts",
        "rows/s",
        rows,
        seconds,
        f"5 columns, executemany of {per_tx:,} rows per transaction, WAL, synchronous=NORMAL",
    )


async def count_rows(db: aiosqlite.Connection) -> int:
    found = await db.execute_fetchall("SELECT count(*) FROM records")
    return int(next(iter(found))[0])


# -- 4. one bare actor hop -------------------------------------------------------------------
HOP_IN = StreamSpec("BENCH_HOP_IN", ("bench.hop.in",), "bench: record batches into the hop")
HOP_OUT = StreamSpec("BENCH_HOP_OUT", ("bench.hop.out",), "bench: one output per input message")

_encode = msgspec.msgpack.Encoder()
_decode_records = msgspec.msgpack.Decoder(list[HopRecord])


class HopActor(Service):
    """The least an actor on the runtime does: decode a message of msgpack records, write
    them with one executemany per batch, emit one output per input message. The runtime
    adds the rest: fetch, offset and outbox in the same transaction, publish, ack."""

    name = "bench_hop"
    streams = (HOP_IN, HOP_OUT)
    migrations = (Migration("bench_hop", 1, RECORDS_TABLE),)

    def consumers(self) -> Sequence[ConsumerSpec]:
        return (ConsumerSpec("bench_hop", HOP_IN, self.handle),)

    async def handle(self, batch: Step) -> None:
        for d in batch.deliveries:
            records = _decode_records.decode(d.data)
            batch.tx.add_many(
                RECORDS_INSERT, [(r.id, r.profile, r.kind, r.ts, r.value) for r in records]
            )
            batch.emit("bench.hop.out", _encode.encode(len(records)))


async def actor_hop(
    messages: int = HOP_MESSAGES, per_message: int = HOP_RECORDS_PER_MESSAGE
) -> Result:
    """Records through one HopActor: first input published to the last output received
    (an output is published only once its batch is committed)."""
    payloads = [
        _encode.encode(
            [HopRecord(*row(m * per_message + j)) for j in range(per_message)],
        )
        for m in range(messages)
    ]
    records = messages * per_message
    async with nats_server() as (server, folder):
        settings = Settings(service=HopActor.name, nats_url=server.url, data_dir=folder, port=0)
        actor = HopActor(settings)
        async with connect(server) as setup:  # services only check that streams exist
            await ensure_streams(setup.jetstream(), HopActor.streams, buckets=())
        await actor.start()
        try:
            async with connect(server) as nc:
                arrivals = Arrivals(messages)
                await nc.subscribe(
                    "bench.hop.out",
                    cb=arrivals.on_msg,
                    pending_msgs_limit=messages + 1,
                    pending_bytes_limit=-1,
                )
                await nc.flush()
                deadline = time.monotonic() + FLOOR_TIMEOUT_S
                started = time.perf_counter()
                async with bounded("actor hop: publishing"):
                    await publish_windows(nc.jetstream(), "bench.hop.in", payloads)
                last = await arrivals.wait("actor hop", deadline)
            stored = await count_rows(actor.db)
            fetch_batch = settings.fetch_batch
        finally:
            await actor.stop()
    if stored != records:
        raise FloorError(f"actor hop: {stored} of {records} records stored")
    kind = "batched" if per_message > 1 else "single"
    return rate(
        f"actor hop, {kind}",
        "records/s",
        records,
        last - started,
        f"{messages:,} messages x {per_message} msgpack record{'s' if per_message > 1 else ''}, "
        f"fetch batch {fetch_batch}, first publish to last committed output",
    )


# -- 5. the ingest door ----------------------------------------------------------------------
INGEST_RECORDS = 20_000
INGEST_HTTP_RECORDS = 5_000
HTTP_IN_FLIGHT = 64
"""Single-record POSTs in flight at once against the HTTP door."""
INGEST_DATASET = "web"
RETAIL_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "retail" / "config.yaml"
_EVENT_TYPES = ("web.pageview", "web.productview", "cart.add", "app.login", "web.search")
_json = msgspec.json.Encoder()


def web_event(i: int) -> bytes:
    """One event of the retail example's `web` dataset (schema web-event), as a client
    sends it: a cookie, a page, sometimes a product, an email on logins."""
    kind = _EVENT_TYPES[i % len(_EVENT_TYPES)]
    event: dict[str, object] = {
        "timestamp": f"2026-11-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:{(i * 7) % 60:02d}Z",
        "eventType": kind,
        "ecid": f"ecid-{i % 50_000:08d}",
        "page": {"url": f"https://shop.example.com/p/{i % 977}", "name": f"page {i % 977}"},
        "device": {"type": ("desktop", "mobile", "tablet")[i % 3], "os": "linux"},
    }
    if kind == "app.login":
        event["email"] = f"person{i % 50_000}@example.com"
    if kind in ("web.productview", "cart.add"):
        event["product"] = {"sku": f"SKU-{i % 4_001}", "category": "shoes", "price": 19.5}
    return _json.encode(event)


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RecordsOut:
    """Counts the records the ingest service puts out on the records subject (msgpack
    envelopes of many records each); notes when the `expected`-th arrives."""

    def __init__(self, expected: int) -> None:
        self.arrivals = Arrivals(expected)

    async def on_msg(self, msg: Msg) -> None:
        envelope = _decode_envelope.decode(msg.data)
        arrivals = self.arrivals
        arrivals.count += len(envelope.records)
        if arrivals.count >= arrivals.expected and not arrivals.done.is_set():
            arrivals.last_at = time.perf_counter()
            arrivals.done.set()


_decode_envelope = msgspec.msgpack.Decoder(RecordEnvelope)


async def _post_all(url: str, payloads: Sequence[bytes]) -> None:
    """POST each record alone to the HTTP door, `HTTP_IN_FLIGHT` at a time; each must be
    accepted (202)."""
    queue = iter(payloads)
    headers = {"Content-Type": "application/json"}

    async def worker(session: aiohttp.ClientSession) -> None:
        for body in queue:
            async with session.post(url, data=body, headers=headers) as response:
                if response.status != 202:
                    raise FloorError(
                        f"ingest door, HTTP: {response.status} {await response.text()}"
                    )

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(HTTP_IN_FLIGHT)))


async def ingest_door(records: int = INGEST_RECORDS, http: bool = False) -> Result:
    """The ingest service alone, as a process, with the retail example's namespaces,
    schemas and datasets: `records` single JSON web events published on
    `cdp.ingest.web` (acked `js.publish`, windows of `PUBLISH_WINDOW`), or POSTed one
    per request to its HTTP door; from the first publish to the last record out on
    `cdp.x.records` (in the msgpack batches identity reads). Also the ingest process's
    CPU time per record, from /proc."""
    payloads = [web_event(i) for i in range(records)]
    objects = [o for o in load_file(RETAIL_CONFIG) if OWNERS[o.kind] == "ingest"]
    door = "HTTP" if http else "NATS"
    with tempfile.TemporaryDirectory(prefix="cdp-bench-") as tmp:
        async with Platform(Path(tmp), services=("ingest",)) as platform:
            pid = platform.supervisor.pid("ingest")
            assert pid is not None
            nc = await platform.connect("cdp-bench")
            try:
                await apply_objects(nc, objects, dry_run=False, file="retail example")
                out = RecordsOut(records)
                await nc.subscribe(
                    subjects.RECORDS,
                    cb=out.on_msg,
                    pending_msgs_limit=records + 1,
                    pending_bytes_limit=-1,
                )
                await nc.flush()
                deadline = time.monotonic() + FLOOR_TIMEOUT_S
                cpu_before = _cpu_seconds(pid)
                started = time.perf_counter()
                async with bounded(f"ingest door, {door}: publishing"):
                    if http:
                        url = platform.urls["ingest"] + f"/v1/datasets/{INGEST_DATASET}/records"
                        await _post_all(url, payloads)
                    else:
                        js = nc.jetstream()
                        await publish_windows(js, subjects.ingest(INGEST_DATASET), payloads)
                published = time.perf_counter()
                last = await out.arrivals.wait(f"ingest door, {door}", deadline)
                cpu = _cpu_seconds(pid) - cpu_before
            finally:
                await nc.close()
    if out.arrivals.count != records:
        raise FloorError(f"ingest door: {out.arrivals.count} of {records} records out")
    how = (
        f"POSTed one per request, {HTTP_IN_FLIGHT} in flight"
        if http
        else f"acked js.publish, windows of {PUBLISH_WINDOW:,}"
    )
    return rate(
        f"ingest door, {door}",
        "records/s",
        records,
        last - started,
        f"{records:,} retail web events, {how}, to the last record out on cdp.x.records; "
        f"in at {records / (published - started):,.0f}/s; "
        f"ingest process {cpu / records * 1e6:,.0f} us CPU per record",
    )


# -- all of them -----------------------------------------------------------------------------
Floor = Callable[[], Awaitable[Result]]

FLOORS: tuple[tuple[str, Floor], ...] = (
    ("raw NATS pub -> sub", raw_nats),
    ("JetStream publish", jetstream_publish),
    ("SQLite batched inserts", sqlite_inserts),
    ("actor hop, batched", actor_hop),
    ("actor hop, single", lambda: actor_hop(HOP_SINGLE_MESSAGES, 1)),
    ("ingest door, NATS", ingest_door),
    ("ingest door, HTTP", lambda: ingest_door(INGEST_HTTP_RECORDS, http=True)),
)


async def run(progress: Progress) -> list[Result]:
    """Every floor, one after the other, then the batched / single ratio of the hop."""
    results: list[Result] = []
    for name, floor in FLOORS:
        progress(name)
        results.append(await floor())
    by_name = {r.name: r for r in results}
    batched, single = by_name["actor hop, batched"], by_name["actor hop, single"]
    results.append(
        Result(
            name="actor hop, batched / single",
            unit="x",
            value=batched.value / single.value if single.value else 0.0,
            detail=f"records/s, {HOP_RECORDS_PER_MESSAGE} records per message over one",
        )
    )
    door, publish = by_name["ingest door, NATS"], by_name["JetStream publish"]
    results.append(
        Result(
            name="ingest door, NATS / JetStream publish",
            unit="x",
            value=door.value / publish.value if publish.value else 0.0,
            detail="records/s through the ingest service over acked publishes alone",
        )
    )
    return results
