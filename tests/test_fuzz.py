"""Fuzzing the two ingestion doors: malformed traffic, interleaved with valid records, sent
over NATS (`cdp.ingest.<dataset>`) and to the HTTP door of the six services running as OS
processes under the supervisor, with the retail example's configuration.

The traffic (about 2,500 NATS messages and 300 HTTP requests, two in five records valid)
is drawn once with Hypothesis and sent in one go: each Hypothesis example draws one NATS
message or one HTTP request and the examples are collected into one list (a single
example would not do: Hypothesis's first example is its simplest, an almost empty
traffic). Every bad message must be rejected with a reason (the error store, the HTTP
answer, the admin API behind `cdp errors`), every valid one must reach the profile
service, and every service must stay up and ready.

What counts as bad is decided by construction, never by asking the platform: a valid
record is built from the schema (hostile strings included: in text fields and inside
identity values they are data like any other, and a record carrying them is valid); a bad
one is a valid record with exactly one rule broken, or bytes that are not a JSON object.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import msgspec
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client

from ops.cli.apply import apply_objects, load_file
from ops.natsd import NatsServer
from services.ingest.records import truncated
from shared import admin, subjects
from shared.admin import ErrorsQuery, ErrorsResult
from tests.helpers import RETAIL_CONFIG, eventually, ingest_drained
from tests.processes import Platform

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

NATS_MESSAGES = 2500
HTTP_REQUESTS = 300
PROFILE_DATASETS = ("crm", "loyalty", "web", "store-orders")
DATASETS = (*PROFILE_DATASETS, "web-raw-archive")
EVENT_DATASETS = ("web", "store-orders", "web-raw-archive")
NOW = time.time()

HOSTILE = (
    "'; DROP TABLE events; --",
    'Robert"); DELETE FROM identities; --',
    "<script>alert(1)</script>",
    "../../../../etc/passwd",
    "%s%s%s%n",
    "{{7*7}}${jndi:ldap://127.0.0.1/a}",
    "\x00",
    "a\x00b",
    "\u202eevil\u202c",
    "\ufeff",
    "\u200b\u200d",
    "😀" * 40,
    "null",
    "undefined",
    "\\",
    '"',
    "\r\n\t",
    "ﷺ" * 30,
    "Z̴̡̛͖a̷̧͍l̸g̶o̵",
    "SELECT * FROM rt_offsets",
    "cdp.ingest.>",
)
"""Strings that break careless code. In a text field, or after a valid prefix in an
identity value, each is ordinary data."""

PLACEHOLDERS = ("null", "NULL", " undefined ", "n/a", "None", "0", "0000", "--", "0-0", "-1", "")
REASONS: dict[str, set[str]] = {
    "malformed": {"malformed JSON"},
    "not_object": {"not a JSON object"},
    "wrong_type": {"wrong type"},
    "missing": {"missing required field"},
    "unknown_field": {"unknown field"},
    "bad_enum": {"invalid value"},
    "bad_identity": {"invalid identity"},
    "event_too_large": {"event too large"},
    "record_too_large": {"record too large"},
    "unknown_dataset": {"unknown dataset"},
    "deep": {"malformed JSON", "not a JSON object", "wrong type", "unknown field", "invalid value"},
}
"""The reasons a bad record of each kind may be rejected with."""

hostile_text = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=120))


# -- what is sent -------------------------------------------------------------------------------
@dataclass
class Item:
    """One record: its dataset (the subject or the URL's), its bytes, and what it is."""

    dataset: str
    data: bytes
    kind: str
    """"valid", or which rule it breaks (a key of REASONS)."""
    marker: tuple[str, str] | None = None
    """A valid record of a profile-enabled dataset: the identity (namespace, value) that
    makes it a profile of its own."""

    @property
    def bad(self) -> bool:
        return self.kind != "valid"


@dataclass
class Request:
    """One HTTP request: a single body, or a JSON array of items."""

    dataset: str
    items: list[Item]
    array: bool

    @property
    def body(self) -> bytes:
        if not self.array:
            return self.items[0].data
        return b"[" + b",".join(i.data for i in self.items) + b"]"


@dataclass
class Traffic:
    nats: list[Item] = field(default_factory=list)
    http: list[Request] = field(default_factory=list)


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def encode(record: Any) -> bytes:
    return json.dumps(record, ensure_ascii=False).encode()


@st.composite
def valid_record(draw: st.DrawFn, uid: int, dataset: str) -> tuple[dict[str, Any], tuple[str, str]]:
    """A record its dataset's schema accepts; its primary identity is unique (`uid`), with a
    hostile tail now and then."""
    h = [draw(hostile_text) for _ in range(3)]
    tail = draw(st.one_of(st.just(""), hostile_text.map(lambda s: "-" + s)))
    ts = iso(NOW - draw(st.integers(60, 30 * 86400)))

    def ident(prefix: str) -> str:
        return f"{prefix}{uid}{tail}"

    if dataset == "crm":
        value = ident("FZC")
        rec: dict[str, Any] = {
            "crm_id": value,
            "person": {"name": {"first": h[0], "last": h[1]}},
            "homeAddress": {"city": h[2]},
            "consents": {"marketing": {"email": draw(st.sampled_from(["y", "n"]))}},
            "updated_at": ts,
        }
        return rec, ("crm_id", value.strip())
    if dataset == "loyalty":
        value = ident("FZL")
        rec = {
            "loyalty_id": value,
            "loyalty": {
                "tier": draw(st.sampled_from(["bronze", "silver", "gold", "platinum"])),
                "points": draw(st.integers(0, 2**53)),
            },
            "updated_at": ts,
        }
        return rec, ("loyalty_id", value.strip())
    if dataset == "store-orders":
        value = ident("FZS")
        rec = {
            "loyalty_id": value,
            "eventType": draw(st.sampled_from(["commerce.purchase", "commerce.return"])),
            "timestamp": ts,
            "store": {"id": h[0], "city": h[1]},
            "items": [
                {
                    "sku": h[2],
                    "quantity": draw(st.integers(0, 1000)),
                    "price": draw(st.floats(0, 1e6, allow_nan=False)),
                }
            ],
        }
        return rec, ("loyalty_id", value.strip())
    value = ident("fz-")  # web and web-raw-archive
    rec = {
        "ecid": value,
        "eventType": draw(st.sampled_from(["web.pageview", "cart.add", "web.search", "app.open"])),
        "timestamp": ts,
        "page": {"url": h[0], "name": h[1]},
        "device": {"type": draw(st.sampled_from(["desktop", "mobile", "tablet"])), "os": h[2]},
    }
    return rec, ("ecid", value.strip())


REQUIRED = {
    "crm": ("crm_id",),
    "loyalty": ("loyalty_id",),
    "web": ("ecid", "timestamp", "eventType"),
    "web-raw-archive": ("ecid", "timestamp", "eventType"),
    "store-orders": ("loyalty_id", "timestamp", "eventType"),
}
PRIMARY = {
    "crm": "crm_id",
    "loyalty": "loyalty_id",
    "web": "ecid",
    "web-raw-archive": "ecid",
    "store-orders": "loyalty_id",
}
WRONG_TYPE_PATHS = {
    "crm": (("person", "name", "first"), ("homeAddress",), ("consents", "marketing"), ("crm_id",)),
    "loyalty": (("loyalty", "points"), ("loyalty",), ("loyalty_id",)),
    "web": (("page",), ("page", "url"), ("device", "os"), ("ecid",)),
    "web-raw-archive": (("page",), ("page", "url"), ("ecid",)),
    "store-orders": (("items",), ("store", "city"), ("loyalty_id",)),
}
"""Fields whose declared type is known: a string, an object, an array or an integer."""


def wrong_values(path: tuple[str, ...]) -> st.SearchStrategy[Any]:
    """Values of any JSON type but the one the field at `path` declares."""
    last = path[-1]
    numbers = st.one_of(
        st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False, allow_infinity=False)
    )
    objects = st.dictionaries(st.text(max_size=5), st.integers(), min_size=1, max_size=2)
    lists = st.lists(st.integers(), min_size=1, max_size=3)
    if last in ("homeAddress", "marketing", "loyalty", "page"):  # objects
        return st.one_of(numbers, st.booleans(), lists, hostile_text)
    if last == "items":  # an array
        return st.one_of(numbers, st.booleans(), objects, hostile_text)
    if last == "points":  # an integer
        return st.one_of(
            st.floats(0.5, 1e9).filter(lambda f: f != int(f)), st.booleans(), lists, hostile_text
        )
    return st.one_of(numbers, st.booleans(), lists, objects)  # strings


def put(rec: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = rec
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[path[-1]] = value


def deep(depth: int, shape: str) -> bytes:
    if shape == "array":
        return b"[" * depth + b"1" + b"]" * depth
    if shape == "object":
        return b'{"a":' * depth + b"1" + b"}" * depth
    return b'{"page": {"url": ' + b"[" * depth + b"]" * depth + b"}}"  # inside a record


@st.composite
def bad_item(draw: st.DrawFn, uid: int, dataset: str, *, http_array: bool) -> Item:
    """A record with exactly one rule broken (or bytes that are not a JSON object)."""
    kinds = [
        "malformed",
        "not_object",
        "wrong_type",
        "missing",
        "unknown_field",
        "bad_enum",
        "bad_identity",
        "event_too_large",
        "deep",
    ]
    if http_array:  # inside an array: valid JSON, nothing that makes the array unreadable
        kinds = [k for k in kinds if k not in ("malformed", "deep")]
    if dataset not in EVENT_DATASETS:  # a profile record may be up to 1 MB
        kinds.remove("event_too_large")
    kind = draw(st.sampled_from(kinds))
    rec, _ = draw(valid_record(uid, dataset))
    if kind == "malformed":
        good = encode(rec)
        data = draw(
            st.one_of(
                st.integers(1, len(good) - 1).map(lambda n: good[:n]),
                st.just(good.replace(b"{", b"{,", 1)),
                st.just(good[:-1] + b",}"),
                st.just(good.replace(b'"', b"'")),
                st.just(good.replace(b': "', b': "\xff', 1)),  # not UTF-8
                st.sampled_from([b"", b"{", b"NaN", b"{'a': 1}", b"\xff\xfe{}"]),
                st.binary(min_size=1, max_size=200),
            ).filter(_not_json)
        )
        return Item(dataset, data, kind)
    if kind == "not_object":
        scalar = st.one_of(st.none(), st.booleans(), st.integers(), hostile_text)
        value = draw(scalar if not http_array else st.one_of(scalar, st.lists(scalar, max_size=3)))
        return Item(dataset, encode(value), kind)
    if kind == "deep":
        # msgspec gives up at a depth of 1000; an event stays under its 10 KB limit
        depths = [100, 999, 1000, 1500] + ([100_000] if dataset not in EVENT_DATASETS else [])
        depth = draw(st.sampled_from(depths))
        return Item(dataset, deep(depth, draw(st.sampled_from(["array", "object", "field"]))), kind)
    if kind == "wrong_type":
        path = draw(st.sampled_from(WRONG_TYPE_PATHS[dataset]))
        put(rec, path, draw(wrong_values(path)))
    elif kind == "missing":
        del rec[draw(st.sampled_from(REQUIRED[dataset]))]
    elif kind == "unknown_field":
        key = "x_" + draw(hostile_text)
        where = draw(st.sampled_from([(), *(p[:-1] for p in WRONG_TYPE_PATHS[dataset] if p[:-1])]))
        put(rec, (*where, key), draw(st.one_of(hostile_text, st.integers())))
    elif kind == "bad_enum":
        if dataset == "crm":
            put(rec, ("consents", "marketing", "email"), "maybe-" + draw(hostile_text))
        elif dataset == "loyalty":
            put(rec, ("loyalty", "tier"), "diamond-" + draw(hostile_text))
        else:
            rec["eventType"] = "zz." + draw(hostile_text)
    elif kind == "bad_identity":
        too_long = "fz-" + "x" * draw(st.integers(1025, 3000))
        rec[PRIMARY[dataset]] = draw(st.sampled_from([*PLACEHOLDERS, too_long, " \t\n "]))
    elif kind == "event_too_large":
        if dataset == "store-orders":
            rec["store"] = {"city": "e" * 10_500}
        else:
            rec["page"] = {"name": "e" * 10_500}
    return Item(dataset, encode(rec), kind)


def _not_json(data: bytes) -> bool:
    try:
        msgspec.json.decode(data)
    except (msgspec.DecodeError, UnicodeError):
        return True
    except RecursionError:
        return False
    return False


unknown_names = st.one_of(
    st.from_regex(r"\A[A-Za-z0-9_-]{1,24}(\.[A-Za-z0-9_-]{1,8})?\Z"),
    st.sampled_from(["Ωmega", "données", "日本", "web2", "crm-", "WEB", "a.b.c"]),
).filter(lambda n: n not in DATASETS and not n.startswith("_"))


@st.composite
def item(
    draw: st.DrawFn, uid: int, dataset: str | None = None, *, http_array: bool = False
) -> Item:
    dataset = dataset or draw(st.sampled_from(DATASETS))
    if draw(st.integers(0, 99)) < 40:  # two in five are valid
        rec, marker = draw(valid_record(uid, dataset))
        return Item(dataset, encode(rec), "valid", marker if dataset in PROFILE_DATASETS else None)
    return draw(bad_item(uid, dataset, http_array=http_array))


def draw_traffic() -> Traffic:
    """The whole traffic, drawn by Hypothesis: one example per NATS message and per HTTP
    request, collected into one list (no platform call per example), plus a few records
    over 1 MB and an empty array made by hand (too big to draw)."""
    traffic = Traffic()
    uid = iter(range(10**9))

    @settings(
        max_examples=NATS_MESSAGES,
        phases=[Phase.generate],
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def nats_message(data: st.DataObject) -> None:
        if data.draw(st.integers(0, 99)) < 5:
            name = data.draw(unknown_names)
            rec, _ = data.draw(valid_record(next(uid), "web"))
            traffic.nats.append(Item(name, encode(rec), "unknown_dataset"))
        else:
            traffic.nats.append(data.draw(item(next(uid))))

    @settings(
        max_examples=HTTP_REQUESTS,
        phases=[Phase.generate],
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def http_request(data: st.DataObject) -> None:
        roll = data.draw(st.integers(0, 99))
        if roll < 5:
            name = data.draw(unknown_names)
            rec, _ = data.draw(valid_record(next(uid), "web"))
            traffic.http.append(Request(name, [Item(name, encode(rec), "unknown_dataset")], False))
        elif roll < 55:  # one record as the body (a deep array is one record, too)
            one = data.draw(item(next(uid)))
            traffic.http.append(Request(one.dataset, [one], False))
        else:  # an array of records, valid and bad mixed
            dataset = data.draw(st.sampled_from(DATASETS))
            n = data.draw(st.integers(1, 12))
            items = [data.draw(item(next(uid), dataset, http_array=True)) for _ in range(n)]
            traffic.http.append(Request(dataset, items, True))

    nats_message()
    http_request()
    for n in range(2):
        big = {"crm_id": f"FZBIG{n}", "person": {"name": {"first": "r" * 1_100_000}}}
        traffic.nats.append(Item("crm", encode(big), "record_too_large"))
    big = {"crm_id": "FZBIG2", "person": {"name": {"first": "r" * 1_100_000}}}
    traffic.http.append(Request("crm", [Item("crm", encode(big), "record_too_large")], False))
    traffic.http.append(Request("web", [], True))  # an empty array: no record at all
    for it in EDGES:  # what once made the HTTP door answer 500
        traffic.http.append(Request(it.dataset, [it], False))
        traffic.nats.append(it)
    return traffic


EDGES = (
    Item("crm", deep(100_000, "array"), "deep"),
    Item("loyalty", deep(100_000, "object"), "deep"),
    Item("crm", deep(100_000, "field"), "deep"),
    Item("web", b'{"ecid": "fz-\xff", "eventType": "app.open", "timestamp": 1}', "malformed"),
)
"""Bodies too deeply nested for the JSON decoder, and invalid UTF-8 in a string."""


# -- sending ------------------------------------------------------------------------------------
@dataclass
class Answer:
    status: int
    body: Any


async def send_nats(nc: Client, items: list[Item]) -> list[int]:
    """Publish every item (JetStream, acknowledged); the stream sequence of each."""
    js = nc.jetstream()
    seqs: list[int] = []
    for i in range(0, len(items), 200):
        acks = await asyncio.gather(
            *(
                js.publish(subjects.ingest(it.dataset), it.data, timeout=10)
                for it in items[i : i + 200]
            )
        )
        seqs.extend(int(a.seq) for a in acks)
    return seqs


async def send_http(base: str, requests: list[Request]) -> list[Answer]:
    """POST every request to the ingest HTTP door, a few at a time."""
    gate = asyncio.Semaphore(8)
    timeout = aiohttp.ClientTimeout(total=30)

    async def post(session: aiohttp.ClientSession, req: Request) -> Answer:
        url = f"{base}/v1/datasets/{quote(req.dataset, safe='')}/records"
        async with (
            gate,
            session.post(url, data=req.body, headers={"Content-Type": "application/json"}) as resp,
        ):
            text = await resp.read()
            try:
                body = json.loads(text)
            except ValueError:
                body = text.decode("utf-8", "replace")
            return Answer(resp.status, body)

    async with aiohttp.ClientSession(timeout=timeout) as session:
        return await asyncio.gather(*(post(session, r) for r in requests))


async def watch_readiness(
    platform: Platform, seen: list[dict[str, str]], stop: asyncio.Event
) -> None:
    """Poll every /readyz until `stop`; keep each answer that was not 200. A probe that
    timed out is not kept: on two busy cores a slow answer is not a "not ready"."""
    while not stop.is_set():
        not_ready = {
            name: why
            for name, why in (await platform.all_ready()).items()
            if "TimeoutError" not in why
        }
        if not_ready:
            seen.append(not_ready)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)


def check_http_answers(traffic: Traffic, answers: list[Answer]) -> list[tuple[Item, str]]:
    """The HTTP answers: 404 for an unknown dataset, 400 for an empty array, else 202 when
    every record is valid, or 400 naming each bad record and why. Returns (item, record id)
    of every record the door passed on."""
    passed: list[tuple[Item, str]] = []
    for req, ans in zip(traffic.http, answers, strict=True):
        where = f"POST {req.dataset!r} {req.body[:200]!r} -> {ans.status} {str(ans.body)[:300]}"
        if not req.items:
            assert (ans.status, ans.body["error"]["code"]) == (400, "no_records"), where
            continue
        if req.items[0].kind == "unknown_dataset":
            assert (ans.status, ans.body["error"]["code"]) == (404, "unknown_dataset"), where
            continue
        bad = {i for i, it in enumerate(req.items) if it.bad}
        assert ans.status == (400 if bad else 202), where
        assert isinstance(ans.body, dict), where
        assert {a["index"] for a in ans.body["accepted"]} == set(range(len(req.items))) - bad
        assert {r["index"] for r in ans.body["rejected"]} == bad, where
        for r in ans.body["rejected"]:
            kind = req.items[r["index"]].kind
            assert r["errors"] and r["errors"][0]["reason"] in REASONS[kind], (kind, where)
        for entry in ans.body["accepted"] + ans.body["rejected"]:
            assert isinstance(entry["record_id"], str), where
            passed.append((req.items[entry["index"]], entry["record_id"]))
    return passed


# -- the test -----------------------------------------------------------------------------------
@pytest.mark.timeout(60)
async def test_malformed_traffic_is_rejected_with_a_reason_and_valid_traffic_arrives(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    traffic = draw_traffic()
    async with Platform(tmp_path / "data", nats_url=nats_server.url) as platform:
        await apply_objects(nc, load_file(RETAIL_CONFIG), dry_run=False, file=str(RETAIL_CONFIG))
        stop = asyncio.Event()
        not_ready: list[dict[str, str]] = []
        watcher = asyncio.create_task(watch_readiness(platform, not_ready, stop))
        seqs, answers = await asyncio.gather(
            send_nats(nc, traffic.nats), send_http(platform.urls["ingest"], traffic.http)
        )

        record_of = check_http_answers(traffic, answers)
        assert record_of, "no HTTP request was answered with record ids"
        prefix = record_of[0][1].rsplit("-", 1)[0] + "-"  # record id: <prefix><stream seq>
        nats_ids = [f"{prefix}{seq}" for seq in seqs]
        record_of += list(zip(traffic.nats, nats_ids, strict=True))
        bad_ids = {rid: it for it, rid in record_of if it.bad}
        reflected = {rid: it for it, rid in record_of if not it.bad and it.marker is not None}

        # Every bad record lands in the error store; every valid one in the profile service.
        def in_profile() -> set[str]:
            rows = platform.query("profile", "SELECT record_id FROM events")
            rows += platform.query("profile", "SELECT DISTINCT record_id FROM attributes")
            return {str(r[0]) for r in rows}

        def rejected() -> dict[str, tuple[str, bytes]]:
            rows = platform.query(
                "ingest", "SELECT record_id, reason, payload FROM rejected_records"
            )
            return {str(r[0]): (str(r[1]), bytes(r[2])) for r in rows}  # type: ignore[call-overload]

        async def arrived() -> bool:
            return set(bad_ids) <= set(rejected()) and set(reflected) <= in_profile()

        await eventually(arrived, timeout=30, interval=0.25)
        await ingest_drained(nc)  # nothing else is still on its way to the error store
        stop.set()
        await watcher

        store = rejected()
        assert set(store) == set(bad_ids), "the error store holds exactly the bad records"
        for rid, it in bad_ids.items():
            assert store[rid][0] in REASONS[it.kind], (rid, it.kind, store[rid][0], it.data[:200])
        for it, rid in zip(traffic.nats, nats_ids, strict=True):
            if it.bad:
                # kept whole up to the record limit; an oversize one is cut, with its length
                assert store[rid][1] == truncated(it.data), "the error store keeps the payload"

        # Valid records: in the profile service under their own identity (hostile or not),
        # and counted; web-raw-archive is not profile-enabled and only counted.
        identities = set(platform.query("profile", "SELECT namespace, value FROM identities"))
        missing = [it.marker for it in reflected.values() if it.marker not in identities]
        assert not missing, f"valid records without a profile: {missing[:5]}"
        archived = "SELECT count(*) FROM events WHERE dataset = 'web-raw-archive'"
        assert platform.scalar("profile", archived) == 0
        want: dict[str, tuple[int, int]] = {}
        for it, _ in record_of:
            ok, bad = want.get(it.dataset, (0, 0))
            want[it.dataset] = (ok, bad + 1) if it.bad else (ok + 1, bad)
        counts = platform.query("ingest", "SELECT dataset, accepted, rejected FROM dataset_counts")
        assert {str(ds): (a, r) for ds, a, r in counts} == want

        # What `cdp errors <dataset>` shows: each bad record with its reason.
        for ds, n in Counter(it.dataset for it in bad_ids.values()).items():
            result = await admin.request(
                nc,
                subjects.admin("ingest", "errors"),
                ErrorsQuery(ds, 10_000),
                ErrorsResult,
                timeout=30,
            )
            assert result.total == n, ds
            assert {r.record_id: r.reason for r in result.records} == {
                rid: store[rid][0] for rid, it in bad_ids.items() if it.dataset == ds
            }

        # Nothing failed inside a service; every one stayed up and ready.
        for name in platform.ports:
            failed = platform.scalar(name, "SELECT count(*) FROM rt_failed")
            assert failed == 0, platform.log_tail(name)
        assert not_ready == [], "a service answered /readyz with other than 200"
        starts = {n: platform.supervisor.starts(n) for n in platform.ports}
        assert starts == dict.fromkeys(platform.ports, 1), "a service died"
        assert await platform.all_ready() == {}
    assert platform.codes == dict.fromkeys(platform.ports, 0), platform.codes
