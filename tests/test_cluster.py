"""A three-node JetStream cluster on loopback, locked down as `cdp up --cluster 3` runs it:
every stream kept by three nodes, the services connected to every node. The node that
leads the ingest stream is SIGKILLed while records flow, then restarted on its own
JetStream folder: every record the producer had acknowledged is in the profiles once,
and the restarted node catches up with the others."""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.js.api import KeyValueConfig

from ops.cli.apply import apply_objects, load_file
from ops.natsd import NatsCluster, NatsServer, free_port, port_taken, stream_placement
from ops.platform import Platform
from shared import subjects
from shared.config import SERVICES as ALL_SERVICES
from shared.config import ConfigError, load_settings, nats_servers
from shared.resources import OWNERS
from shared.streams import ensure_streams
from shared.subjects import ALL_STREAMS
from tests.helpers import RETAIL_CONFIG, eventually
from tests.processes import CdpUp
from tests.test_cli_up import nats_server_pids

pytestmark = [pytest.mark.slow]

SERVICES = ("ingest", "identity", "profile")
"""What turns records into profiles: enough to see every record land once."""
PEOPLE = 120
WEB_EVENTS = 10
EVENTS = PEOPLE * WEB_EVENTS
Record = tuple[str, dict[str, Any]]


def records(now: float) -> list[Record]:
    """Each person's CRM record (crm_id, email), then web events (cookie and email), by
    blocks of 20 people, timestamps within the last hour."""
    out: list[Record] = []
    clock = now - 3600.0
    for first in range(0, PEOPLE, 20):
        people = range(first, first + 20)
        for p in people:
            clock += 0.1
            out.append(
                ("crm", {"crm_id": f"C{p}", "email": f"p{p}@example.com", "updated_at": iso(clock)})
            )
        for n in range(WEB_EVENTS):
            for p in people:
                clock += 0.1
                web = {
                    "ecid": f"E{p}",
                    "email": f"p{p}@example.com",
                    "eventType": "web.pageview",
                    "timestamp": iso(clock),
                    "page": {"url": f"/p/{n}"},
                }
                out.append(("web", web))
    return out


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


class Producer:
    """JetStream publishes with a Nats-Msg-Id, in windows; a window with a failure (a
    timeout while the stream elects a leader, a connection lost with its node) is sent
    again whole: the stream drops what it already holds. It remembers when each window
    was acknowledged."""

    def __init__(self, nc: Client, batch: list[Record]) -> None:
        self.nc = nc
        self.batch = batch
        self.acked = 0
        self.failures = 0
        self.acks: list[float] = []

    async def run(self, window: int = 50) -> None:
        js = self.nc.jetstream()
        for i in range(0, len(self.batch), window):
            chunk = self.batch[i : i + window]
            while True:
                results = await asyncio.gather(
                    *(
                        js.publish(
                            subjects.ingest(ds),
                            json.dumps(rec).encode(),
                            headers={"Nats-Msg-Id": f"cluster-{i + j}"},
                            timeout=2,
                        )
                        for j, (ds, rec) in enumerate(chunk)
                    ),
                    return_exceptions=True,
                )
                if not any(isinstance(r, BaseException) for r in results):
                    break
                self.failures += 1
                await asyncio.sleep(0.1)
            self.acked += len(chunk)
            self.acks.append(time.monotonic())


def query(db: Path, sql: str) -> list[tuple[Any, ...]]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
            return [tuple(r) for r in conn.execute(sql).fetchall()]
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise


async def connect(platform: Platform) -> Client:
    """The admin's connection to every node, reconnecting quickly to another."""
    seed, prefix = platform.admin_credentials()
    return await nats.connect(
        nats_servers(platform.nats_url),
        name="cluster-test",
        inbox_prefix=prefix,
        nkeys_seed=str(seed) if seed else None,
        reconnect_time_wait=0.2,
        max_reconnect_attempts=-1,
        connect_timeout=2,
    )


async def leader(nc: Client, stream: str) -> str | None:
    """The node leading `stream` (none: no answer within a second, as while electing)."""
    try:
        info = await nc.jetstream(timeout=1.0).stream_info(stream)
    except (nats.errors.Error, TimeoutError):
        return None
    return info.cluster.leader if info.cluster is not None else None


async def caught_up(nc: Client, stream: str, node: str, last_seq: int) -> bool:
    """Whether `node` keeps a current copy of `stream`, holding everything up to `last_seq`."""
    try:
        (placement,) = await stream_placement(nc.jetstream(), [stream])
    except (nats.errors.Error, TimeoutError, ValueError):
        return False
    if placement.last_seq < last_seq:
        return False
    if placement.leader == node:
        return True
    return any(r.name == node and r.current and r.lag == 0 for r in placement.replicas)


async def hand_over(nc: Client, stream: str, to: str) -> bool:
    """Whether `to` leads `stream`; if not, ask the leader to step down in favour of `to`
    and wait for the election (a later call sees who won)."""
    current = await leader(nc, stream)
    if current == to or current is None:
        return current == to
    reply = await nc.request(
        f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}",
        json.dumps({"placement": {"preferred": to}}).encode(),
        timeout=5,
    )
    answer = json.loads(reply.data)
    assert answer.get("success"), answer

    async def elected() -> bool:
        return await leader(nc, stream) not in (None, current)

    await eventually(elected, timeout=15, interval=0.1)
    return await leader(nc, stream) == to


@pytest.mark.asyncio
@pytest.mark.timeout(150)
async def test_the_leader_of_the_ingest_stream_dies_and_nothing_is_lost(tmp_path: Path) -> None:
    batch = records(time.time())
    async with Platform(
        tmp_path / "var", cluster=3, secure=True, in_process=True, services=SERVICES
    ) as platform:
        cluster = platform.cluster
        assert isinstance(cluster, NatsCluster)
        assert platform.replicas == 3
        for name in SERVICES:  # each service was given every node
            assert len(nats_servers(platform.services[name].settings.nats_url)) == 3
        nc = await connect(platform)
        try:
            placements = await stream_placement(nc.jetstream(), [s.name for s in ALL_STREAMS])
            assert len(placements) == len(ALL_STREAMS)
            assert all(len(p.replicas) == 2 for p in placements), placements
            mine = [o for o in load_file(RETAIL_CONFIG) if OWNERS[o.kind] in SERVICES]
            await apply_objects(nc, mine, dry_run=False, file=str(RETAIL_CONFIG))

            producer = Producer(nc, batch)
            producing = asyncio.create_task(producer.run())
            await eventually(lambda: _true(producer.acked >= len(batch) // 3), timeout=60)
            assert not producing.done()

            victim_name = await leader(nc, "CDP_INGEST")
            assert victim_name is not None
            victim: NatsServer = cluster.node(victim_name)
            killed = time.monotonic()
            victim.kill()

            async def new_leader() -> bool:
                found = await leader(nc, "CDP_INGEST")
                return found is not None and found != victim_name

            await eventually(new_leader, timeout=30, interval=0.1)
            elected = time.monotonic() - killed
            # Records keep flowing on two nodes before the third comes back.
            target = min(len(batch), producer.acked + len(batch) // 4)
            await eventually(lambda: _true(producer.acked >= target), timeout=60)

            restarted = time.monotonic()
            await victim.start()
            await cluster.wait_healthy(timeout=30)
            back = time.monotonic() - restarted
            await asyncio.wait_for(producing, timeout=60)
            assert producer.acked == len(batch)
            acks = producer.acks
            stall = max(b - a for a, b in itertools.pairwise(acks) if b > killed)

            # Every acknowledged record in the profiles, once.
            db = platform.db("profile")

            async def all_events() -> bool:
                return int(query(db, "SELECT count(*) FROM events")[0][0]) >= EVENTS

            await eventually(all_events, timeout=60, interval=0.25)
            ingest_last = (await nc.jetstream().stream_info("CDP_INGEST")).state.last_seq
            assert ingest_last == len(batch) + 0  # duplicates dropped by their message ids
            assert query(db, "SELECT count(*), count(DISTINCT record_id) FROM events") == [
                (EVENTS, EVENTS)
            ]
            per_profile = query(db, "SELECT profile_id, count(*) FROM events GROUP BY profile_id")
            assert len(per_profile) == PEOPLE
            assert {n for _, n in per_profile} == {WEB_EVENTS}

            # The restarted node caught up: current with no lag, then leading the stream
            # with the same last sequence the others had.
            await eventually(
                lambda: caught_up(nc, "CDP_INGEST", victim_name, ingest_last),
                timeout=30,
                interval=0.2,
            )
            await eventually(lambda: hand_over(nc, "CDP_INGEST", victim_name), timeout=30)
            info = await nc.jetstream().stream_info("CDP_INGEST")
            assert info.cluster is not None and info.cluster.leader == victim_name
            assert (info.state.last_seq, info.state.messages) == (ingest_last, len(batch))
            print(
                f"\nleader {victim_name} killed: new leader seen after {elected:.2f}s, "
                f"publishing stalled {stall:.2f}s at most, {producer.failures} windows sent "
                f"again; node healthy {back:.2f}s after restart"
            )
        finally:
            await nc.close()
    assert platform.codes == dict.fromkeys(reversed(SERVICES), 0)


async def _true(value: bool) -> bool:
    return value


def free_ports(count: int) -> int:
    """The first of `count` consecutive free ports."""
    while True:
        first = free_port()
        if first + count < 65536 and not any(
            port_taken("127.0.0.1", first + i) for i in range(count)
        ):
            return first


@pytest.mark.asyncio
@pytest.mark.timeout(90)
async def test_up_with_a_cluster_starts_three_nodes_and_says_where_streams_live(
    tmp_path: Path,
) -> None:
    """`cdp up --cluster 3`: three nats-server nodes, the services ready on them, every
    node's URL printed and which node leads each stream, each stream kept by all three."""
    ports = {name: free_port() for name in ALL_SERVICES}
    nats_port = free_ports(3)
    up = CdpUp(
        tmp_path / "var",
        ports,
        nats_port,
        args=("--cluster", "3", "--cluster-port", str(free_ports(3))),
    )
    await up.start()
    try:
        await up.wait_ready(timeout=40)
        await eventually(lambda: up.printed("Ctrl-C to stop"), timeout=20)
        urls = [f"nats://127.0.0.1:{nats_port + i}" for i in range(3)]
        for i, url in enumerate(urls):
            assert f"cdp-{i + 1} on {url}" in up.text, up.text
        assert f"CDP_NATS_URL={','.join(urls)}" in up.text, up.text
        assert "streams on the cluster" in up.text, up.text
        assert len(nats_server_pids(up.marker)) == 3
        seed = tmp_path / "var" / "secrets" / "admin.nk"
        nc = await nats.connect(urls, nkeys_seed=str(seed), inbox_prefix="_INBOX_admin")
        try:
            names = [s.name for s in ALL_STREAMS]
            placements = await stream_placement(nc.jetstream(), names)
        finally:
            await nc.close()
        assert [p.stream for p in placements] == names
        for p in placements:
            assert f"{p.stream}" in up.text
            assert len(p.replicas) == 2 and all(r.current for r in p.replicas), p
        code = await up.interrupt()
    finally:
        await up.close()
    assert code == 0, up.text
    assert nats_server_pids(up.marker) == [], "nats-server nodes left running after Ctrl-C"


def test_the_nats_address_names_one_server_or_every_node_of_a_cluster() -> None:
    assert nats_servers("nats://a:4222") == ["nats://a:4222"]
    assert nats_servers(" nats://a:4222, nats://b:4222,,nats://c:4222 ") == [
        "nats://a:4222",
        "nats://b:4222",
        "nats://c:4222",
    ]
    assert load_settings("ingest", {}).replicas == 1
    assert load_settings("ingest", {"CDP_REPLICAS": "3"}).replicas == 3
    for wrong in ("0", "6", "three"):
        with pytest.raises(ConfigError):
            load_settings("ingest", {"CDP_REPLICAS": wrong})


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_streams_and_buckets_take_another_number_of_copies_in_place(tmp_path: Path) -> None:
    """Set up on one copy, then on three (`cdp setup` with CDP_REPLICAS=3 on a cluster):
    the stream, the object store and a key-value bucket are kept by three nodes, with the
    messages they held."""
    cluster = NatsCluster(tmp_path / "nats", 3)
    await cluster.start()
    try:
        nc = await nats.connect(cluster.urls)
        try:
            js = nc.jetstream()
            kv = KeyValueConfig(bucket="cdp-test-kv", history=1)
            streams = [subjects.STREAM_INGEST]
            await ensure_streams(js, streams, replicas=1, key_values=[kv])
            await js.publish(subjects.ingest("crm"), b"{}")
            await (await js.key_value(kv.bucket)).put("k", b"v")
            for copies in (3, 1):  # up, then back down
                await ensure_streams(js, streams, replicas=copies, key_values=[kv])
                for name in ("CDP_INGEST", f"OBJ_{subjects.BATCH_BUCKET}", "KV_cdp-test-kv"):
                    info = await js.stream_info(name)
                    assert info.config.num_replicas == copies, name
                assert (await js.stream_info("CDP_INGEST")).state.messages == 1
                assert (await (await js.key_value(kv.bucket)).get("k")).value == b"v"
        finally:
            await nc.close()
    finally:
        await cluster.stop()
