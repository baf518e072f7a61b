"""Ingest as several instances sharing the ingest stream (competing consumers).

Two ingest processes (CDP_INSTANCE=ingest-1, ingest-2, each with its own data folder)
against a real nats-server, no other service: what they send on goes to CDP_RECORDS,
which the tests read directly."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nats.errors
import pytest
from nats.aio.client import Client

from ops.cli.apply import apply_objects
from ops.cli.ingest import run_batch
from ops.natsd import NatsServer, free_port
from services.ingest.settings import Scaling, load_scaling
from shared import admin, subjects
from shared.config import ConfigError
from shared.messages import Identity, PrivacyDelete, PrivacyReport, Probe, RecordEnvelope
from tests.helpers import ROOT, eventually
from tests.test_faults import ingest_objects, iso

pytestmark = [pytest.mark.asyncio, pytest.mark.slow, pytest.mark.timeout(240)]

ACK_WAIT = "2"
VICTIM = "victim@example.com"
_envelope = msgspec.msgpack.Decoder(RecordEnvelope)


class Instance:
    """One ingest process: `CDP_INSTANCE=<name>`, its own data folder and port."""

    def __init__(self, name: str, base: Path, nats_url: str) -> None:
        self.name = name
        self.data_dir = base / name
        self.port = free_port()
        self.nats_url = nats_url
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "CDP_INSTANCE": self.name,
            "CDP_NATS_URL": self.nats_url,
            "CDP_DATA_DIR": str(self.data_dir),
            "CDP_INGEST_PORT": str(self.port),
            "CDP_ACK_WAIT": ACK_WAIT,
            "CDP_LOG_LEVEL": "warning",
        }
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = await asyncio.to_thread(open, self.data_dir / "ingest.log", "ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.ingest", env=env, stdout=log, stderr=log
        )
        log.close()

        async def ready() -> bool:
            try:
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(f"http://127.0.0.1:{self.port}/readyz") as r,
                ):
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(ready, timeout=60, interval=0.1)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    def scalar(self, sql: str) -> int:
        db = self.data_dir / "ingest.db"
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
            row = conn.execute(sql).fetchone()
        return int(row[0] or 0) if row else 0

    async def metric(self, name: str) -> float:
        """The sum of a counter on the instance's /metrics."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{self.port}/metrics") as r,
        ):
            text = await r.text()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + "{") or line.startswith(name + " ")
        )

    def log(self) -> str:
        path = self.data_dir / "ingest.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def record(i: int, *, bad: bool = False, email: str | None = None) -> bytes:
    body: dict[str, Any] = {
        "ecid": f"W{i}",
        "eventType": "bogus" if bad else "web.pageview",
        "timestamp": iso(time.time()),
        "page": {"url": f"/w/{i}"},
    }
    if email is not None:
        body["email"] = email
    return json.dumps(body).encode()


class Sent(msgspec.Struct):
    """What the test published: the ingest stream sequence of each kind of message."""

    valid: dict[int, int] = {}
    """ingest seq -> record number"""
    invalid: dict[int, str | None] = {}
    """ingest seq -> the email it carries"""
    probes: dict[str, int] = {}
    deletes: dict[str, int] = {}


async def publish(nc: Client, sent: Sent, first: int, count: int, *, bad_every: int = 7) -> None:
    js = nc.jetstream()
    for i in range(first, first + count):
        bad = i % bad_every == 0
        email = VICTIM if bad and i % 2 == 0 else None
        ack = await js.publish(
            subjects.ingest("web"),
            record(i, bad=bad, email=email),
            headers={"Nats-Msg-Id": f"w{i}"},
        )
        if bad:
            sent.invalid[ack.seq] = email
        else:
            sent.valid[ack.seq] = i


async def probe(nc: Client, sent: Sent, probe_id: str) -> None:
    ack = await nc.jetstream().publish(subjects.PROBE, msgspec.json.encode(Probe(probe_id)))
    sent.probes[probe_id] = ack.seq


async def delete(nc: Client, sent: Sent, request_id: str) -> None:
    request = PrivacyDelete(
        request_id=request_id, identity=Identity("email", VICTIM), requested_at=time.time()
    )
    ack = await nc.jetstream().publish(subjects.PRIVACY_DELETE, msgspec.json.encode(request))
    sent.deletes[request_id] = ack.seq


class Landed(msgspec.Struct):
    """CDP_RECORDS as read: where each record, probe and delete is."""

    records: dict[str, list[int]]
    """record id -> the CDP_RECORDS sequences of the messages that carry it"""
    payloads: dict[str, dict[str, Any]]
    probes: dict[str, int]
    deletes: dict[str, int]


async def read_records(nc: Client) -> Landed:
    js = nc.jetstream()
    out = Landed({}, {}, {}, {})
    info = await js.stream_info(subjects.STREAM_RECORDS.name)
    last = info.state.last_seq
    sub = await js.pull_subscribe(subjects.RECORDS, stream=subjects.STREAM_RECORDS.name)
    try:
        seen = 0
        while seen < last:
            for msg in await sub.fetch(500, timeout=5):
                await msg.ack()
                seq = msg.metadata.sequence.stream
                seen = max(seen, seq)
                env = _envelope.decode(msg.data)
                for r in env.records:
                    out.records.setdefault(r.record_id, []).append(seq)
                    out.payloads[r.record_id] = r.payload
                for p in env.probes:
                    out.probes[p.probe_id] = seq
                for d in env.deletes:
                    out.deletes[d.request_id] = seq
    finally:
        await sub.unsubscribe()
    return out


def ingest_seq(record_id: str) -> int:
    return int(record_id.rsplit("-", 1)[1])


def behind_everything_before(landed: Landed, at_ingest: int, at_records: int) -> list[str]:
    """Records of ingest sequences before `at_ingest` that are not in CDP_RECORDS before
    `at_records` (must be none)."""
    return [
        rid
        for rid, seqs in landed.records.items()
        if rid.startswith("r") and ingest_seq(rid) < at_ingest and min(seqs) > at_records
    ]


async def drained(nc: Client, sent: Sent, probe_id: str) -> Landed:
    """Send a probe and wait until it is in CDP_RECORDS (everything before it is)."""
    await probe(nc, sent, probe_id)
    found: list[Landed] = []

    async def arrived() -> bool:
        landed = await read_records(nc)
        found[:] = [landed]
        return probe_id in landed.probes

    await eventually(arrived, timeout=90, interval=0.5)
    return found[0]


def check_each_valid_record_once(sent: Sent, landed: Landed) -> None:
    stream_ids = {
        ingest_seq(rid): seqs for rid, seqs in landed.records.items() if rid.startswith("r")
    }
    missing = [s for s in sent.valid if s not in stream_ids]
    doubled = {s: v for s, v in stream_ids.items() if len(v) > 1}
    rejected_sent = [s for s in sent.invalid if s in stream_ids]
    assert not missing, f"{len(missing)} valid records never reached CDP_RECORDS: {missing[:5]}"
    assert not doubled, f"records in CDP_RECORDS more than once: {list(doubled.items())[:5]}"
    assert not rejected_sent, f"rejected records went on: {rejected_sent[:5]}"


async def test_two_instances_share_a_burst_each_record_once_barriers_hold(
    tmp_path: Path, nats_server: NatsServer, nc: Client
) -> None:
    one = Instance("ingest-1", tmp_path, nats_server.url)
    two = Instance("ingest-2", tmp_path, nats_server.url)
    try:
        await one.start()
        objects = ingest_objects()
        await apply_objects(nc, objects, dry_run=False, file="retail")
        await two.start()  # takes the configuration ingest-1 applied from CDP_CONFIG
        sent = Sent()
        await publish(nc, sent, 0, 600)
        await probe(nc, sent, "mid")
        await publish(nc, sent, 600, 400)
        reports = await nc.jetstream().subscribe(
            subjects.privacy_report("forget-1", "ingest"), ordered_consumer=True
        )
        await delete(nc, sent, "forget-1")
        await publish(nc, sent, 1000, 600)
        landed = await drained(nc, sent, "end")

        check_each_valid_record_once(sent, landed)
        # Both instances did part of the work.
        for inst in (one, two):
            accepted = inst.scalar("SELECT accepted FROM dataset_counts WHERE dataset = 'web'")
            assert accepted > 50, (inst.name, accepted, inst.log())
        # The probe and the delete came out behind every record published before them.
        for pid in ("mid", "end"):
            late = behind_everything_before(landed, sent.probes[pid], landed.probes[pid])
            assert not late, f"probe {pid} passed before {late[:5]}"
        late = behind_everything_before(
            landed, sent.deletes["forget-1"], landed.deletes["forget-1"]
        )
        assert not late, f"the delete passed before {late[:5]}"

        # `cdp errors`: every rejected record once, gathered from both instances; the
        # victim's records rejected before the delete are gone, those after it are kept.
        result = await admin.ingest_errors(nc, "web", 10_000)
        listed = Counter(ingest_seq(r.record_id) for r in result.records)
        assert all(n == 1 for n in listed.values())
        delete_at = sent.deletes["forget-1"]
        expected = {
            s for s, email in sent.invalid.items() if not (email == VICTIM and s < delete_at)
        }
        assert set(listed) == expected
        assert result.total == len(expected)
        per_instance = [
            inst.scalar("SELECT count(*) FROM rejected_records WHERE dataset = 'web'")
            for inst in (one, two)
        ]
        assert all(n > 0 for n in per_instance), per_instance
        msg = await reports.next_msg(timeout=10)
        report = msgspec.json.decode(msg.data, type=PrivacyReport)
        removed = sum(1 for s, e in sent.invalid.items() if e == VICTIM and s < delete_at)
        assert report.removed == {"rejected_records": removed}

        # A batch file is ingested by one instance, once; `cdp batches` lists it once.
        path = tmp_path / "web.jsonl"
        path.write_bytes(b"\n".join(record(10_000 + i) for i in range(300)) + b"\n")
        info = await run_batch(nc, "web", path, "jsonl", lambda _i: None, timeout=60)
        assert info.status == "success" and info.accepted == 300
        landed = await drained(nc, sent, "after-batch")
        urls = Counter(p["page"]["url"] for p in landed.payloads.values() if "page" in p)
        assert all(urls[f"/w/{10_000 + i}"] == 1 for i in range(300))
        from_batch = [seqs for rid, seqs in landed.records.items() if rid.startswith("b")]
        assert len(from_batch) == 300 and all(len(seqs) == 1 for seqs in from_batch)
        listed_batches = await admin.ingest_batches(nc, 50)
        assert [b.batch_id for b in listed_batches.batches] == [info.batch_id]
        ran = [inst.scalar("SELECT count(*) FROM batches") for inst in (one, two)]
        assert sorted(ran) == [0, 1]
    finally:
        await one.stop()
        await two.stop()


async def test_a_killed_instance_hands_its_messages_to_the_other(
    tmp_path: Path, nats_server: NatsServer, nc: Client
) -> None:
    one = Instance("ingest-1", tmp_path, nats_server.url)
    two = Instance("ingest-2", tmp_path, nats_server.url)
    try:
        await one.start()
        await apply_objects(nc, ingest_objects(), dry_run=False, file="retail")
        await two.start()
        sent = Sent()
        await publish(nc, sent, 0, 800)

        async def two_has_applied() -> bool:
            return two.scalar("SELECT accepted FROM dataset_counts WHERE dataset = 'web'") > 0

        await eventually(two_has_applied, timeout=30, interval=0.05)
        two.kill()
        await publish(nc, sent, 800, 800)
        await probe(nc, sent, "mid")
        await publish(nc, sent, 1600, 200)
        landed = await drained(nc, sent, "end")
        check_each_valid_record_once(sent, landed)
        assert await one.metric("cdp_messages_taken_over_total") > 0, "nothing taken over"
        late = behind_everything_before(landed, sent.probes["mid"], landed.probes["mid"])
        assert not late, f"probe passed before {late[:5]}"
        # The survivor answers `cdp errors` alone; what it holds is listed once.
        result = await admin.ingest_errors(nc, "web", 10_000)
        assert len({r.record_id for r in result.records}) == len(result.records)
    finally:
        await one.stop()
        await two.stop()


async def test_gather_collects_every_answer_and_merges_them_once(nc: Client) -> None:
    """Two answerers of one subject (as two instances), a third subject nobody serves."""
    subject = "cdp.admin.ingest.errors"

    def rejected(record_id: str, at: float) -> admin.RejectedRecord:
        return admin.RejectedRecord(
            record_id=record_id,
            dataset="web",
            batch_id=None,
            row_number=None,
            source="stream",
            reason="invalid",
            path="",
            expected="",
            got="",
            problems=[],
            payload="{}",
            rejected_at=at,
        )

    async def first(_q: admin.ErrorsQuery) -> admin.ErrorsResult:
        return admin.ErrorsResult("web", 2, [rejected("r-1", 1.0), rejected("r-3", 3.0)])

    async def second(_q: admin.ErrorsQuery) -> admin.ErrorsResult:
        return admin.ErrorsResult("web", 2, [rejected("r-2", 2.0), rejected("r-3", 3.0)], 5)

    subs = [
        await admin.serve(nc, subject, admin.ErrorsQuery, first, every=True),
        await admin.serve(nc, subject, admin.ErrorsQuery, second, every=True),
    ]
    try:
        result = await admin.ingest_errors(nc, "web", 100)
        assert [r.record_id for r in result.records] == ["r-1", "r-2", "r-3"]
        assert (result.total, result.dropped) == (3, 5)
        gathered = await admin.gather(nc, subject, admin.ErrorsQuery("web"), expected=2)
        assert len(gathered.results) == 2
    finally:
        await admin.unsubscribe_all(subs)
    with pytest.raises(nats.errors.NoRespondersError):
        await admin.gather(nc, "cdp.admin.nobody.here", admin.ErrorsQuery("web"), timeout=2)


async def test_the_shared_mode_setting() -> None:
    assert load_scaling({}) == Scaling("ingest", False)
    assert load_scaling({"CDP_INSTANCE": "ingest-2"}) == Scaling("ingest-2", True)
    auto = load_scaling({"CDP_INGEST_SHARED": "1"})
    assert auto.shared and auto.instance.startswith("ingest-")
    with pytest.raises(ConfigError):
        load_scaling({"CDP_INGEST_SHARED": "maybe"})
