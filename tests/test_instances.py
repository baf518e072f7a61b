"""Several instances of a service: `cdp up --instances`, and `cdp status` gathering every
instance's reply (roles; a partitioned service's partition table)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import nats
import pytest
from nats.aio.client import Client
from rich.console import Console

from ops.cli.status import ServiceInstances, gather_status, partitions_table
from ops.natsd import NatsServer, free_port, port_taken
from ops.platform import InstancesError, Platform, parse_instances
from ops.security import ADMIN, instance_durable, seed_path
from shared import subjects
from shared.config import SERVICES
from shared.runtime.coordination import ensure_buckets
from shared.runtime.snapshots import ensure_snapshot_buckets
from shared.streams import ensure_streams
from tests.actors.pcounter import IN_STREAM, OUT_STREAM, PCounterActor, input_subject
from tests.helpers import eventually, settings_for
from tests.processes import CdpUp
from tests.test_cli_up import processes_with_env

PARTITIONS = 8


# -- the flag ------------------------------------------------------------------------------
def test_instances_flag_parses_and_names_instances() -> None:
    assert parse_instances("") == {}
    assert parse_instances("profile=2, segmentation=3,identity=1") == {
        "profile": 2,
        "segmentation": 3,
        "identity": 1,
    }
    p = Platform(Path("unused"), instances={"profile": 2, "identity": 1}, ports=_ports(8000))
    assert p.instances["profile"] == ["profile-1", "profile-2"]
    assert p.instances["identity"] == ["identity"]  # one: as ever
    assert p.instance_ports["profile-1"] == 8003
    assert p.instance_ports["profile-2"] == 8103
    env = p.service_env("profile-2")
    assert env["CDP_INSTANCE"] == "profile-2"
    assert env["CDP_PROFILE_PORT"] == "8103"
    assert env["CDP_DATA_DIR"] == str(p.data_dir / "profile-2")
    assert "CDP_INSTANCE" not in p.service_env("identity")
    assert p.service_env("identity")["CDP_DATA_DIR"] == str(p.data_dir)


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("nosuch=2", "unknown service 'nosuch'"),
        ("profile=0", "profile=0: the count of instances must be from 1 to 16"),
        ("profile=17", "profile=17: the count of instances must be from 1 to 16"),
        ("profile=two", "the count must be a whole number"),
        ("profile", "expected <service>=<count>"),
        ("profile=2,profile=3", "profile is given twice"),
    ],
)
def test_instances_flag_refuses_what_it_cannot_start(flag: str, message: str) -> None:
    with pytest.raises(InstancesError, match=message):
        parse_instances(flag)


def test_an_instance_durable_is_named_after_the_instance() -> None:
    assert instance_durable("identity", "identity", "identity-2") == "identity-2"
    assert instance_durable("identity", "identity-namespaces", "identity-2") == (
        "identity-2-namespaces"
    )
    assert instance_durable("scheduler", "scheduler", "scheduler") == "scheduler"


def _ports(base: int) -> dict[str, int]:
    return {name: base + 1 + i for i, name in enumerate(SERVICES)}


def test_cdp_up_says_what_is_wrong_with_the_flag(tmp_path: Path) -> None:
    cdp = Path(sys.executable).parent / "cdp"
    for flag, message in (
        ("segmentaton=2", "unknown service 'segmentaton'"),
        ("profile=20", "from 1 to 16"),
    ):
        done = subprocess.run(
            [str(cdp), "up", "--data-dir", str(tmp_path / "var"), "--instances", flag],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "COLUMNS": "200"},
        )
        assert done.returncode == 1, done.stdout + done.stderr
        assert message in done.stdout, done.stdout
        assert "cannot start" in done.stdout
    assert not (tmp_path / "var").exists() or not any((tmp_path / "var").iterdir())


# -- cdp status: a partitioned service's table ------------------------------------------------
@pytest.mark.asyncio
@pytest.mark.timeout(90)
async def test_status_gathers_every_instance_and_shows_the_partition_table(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    js = nc.jetstream()
    await ensure_streams(js, (IN_STREAM, OUT_STREAM), buckets=())
    await ensure_snapshot_buckets(js)
    await ensure_buckets(js, instance_ttl=3, lease_ttl=3)
    actors = [
        PCounterActor(
            settings_for(
                "pcounter",
                nats_server.url,
                tmp_path / name,
                instance=name,
                partitions=PARTITIONS,
                snapshot_interval=1.0,
            )
        )
        for name in ("pc-a", "pc-b")
    ]
    try:
        for actor in actors:
            await actor.start()
        for i in range(40):
            p = i % PARTITIONS
            await js.publish(input_subject(p), json.dumps({"id": i, "key": f"k{p}"}).encode())

        async def settled() -> list[ServiceInstances]:
            return await gather_status(nc, ("pcounter",), timeout=3.0)

        async def both_hold_and_drained() -> bool:
            [found] = await settled()
            owners = {p.owner for r in found.replies for p in r.partitions}
            parts = sorted(p.partition for r in found.replies for p in r.partitions)
            return (
                found.live == ["pc-a", "pc-b"]
                and owners == {"pc-a", "pc-b"}
                and parts == list(range(PARTITIONS))
                and all(
                    p.pending == 0 and p.applied_seq > 0
                    for r in found.replies
                    for p in r.partitions
                )
                and all(p.snapshot_seq is not None for r in found.replies for p in r.partitions)
            )

        await eventually(both_hold_and_drained, timeout=60, interval=0.2)
        [found] = await settled()
        assert [r.instance for r in found.replies] == ["pc-a", "pc-b"]
        for r in found.replies:
            assert {p.owner for p in r.partitions} == {r.instance}
        table = partitions_table(found)
        assert table is not None
        out = Console(record=True, width=200)
        out.print(table)
        text = out.export_text()
        assert "pcounter partitions" in text
        for column in ("owner", "applied seq", "lag", "snapshot seq"):
            assert column in text
        rows = [line for line in text.splitlines() if "pc-a" in line or "pc-b" in line]
        assert len(rows) == PARTITIONS, text
        assert all(" ago" in row for row in rows), text
    finally:
        for actor in actors:
            await actor.stop()


# -- cdp up --instances identity=2,scheduler=2 ---------------------------------------------------
def _spaced_ports() -> dict[str, int]:
    """A free port per service whose + 100 (its second instance's) is free too."""
    out: dict[str, int] = {}
    while len(out) < len(SERVICES):
        port = free_port()
        if port + 100 < 65536 and not port_taken("127.0.0.1", port + 100):
            taken = {*out.values(), *(p + 100 for p in out.values())}
            if port not in taken and port + 100 not in taken:
                out[SERVICES[len(out)]] = port
    return out


def _instance_pid(marker: str, instance: str) -> int | None:
    wanted = f"CDP_INSTANCE={instance}".encode()
    for pid in processes_with_env(marker):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted in env:
            return pid
    return None


def _cdp_status_json(data: Path, nats_url: str) -> list[dict[str, object]]:
    env = {**os.environ, "CDP_DATA_DIR": str(data), "CDP_NATS_URL": nats_url}
    env.pop("CDP_NATS_NKEY", None)
    done = subprocess.run(
        [str(Path(sys.executable).parent / "cdp"), "status", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    found = json.loads(done.stdout)
    assert isinstance(found, list)
    return found


def _roles(found: list[ServiceInstances], service: str) -> dict[str, str | None]:
    [s] = [x for x in found if x.service == service]
    return {r.instance or "": r.role for r in s.replies}


@pytest.mark.asyncio
@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_up_runs_two_identities_and_schedulers_and_the_standby_takes_over(
    tmp_path: Path,
) -> None:
    """`cdp up --instances identity=2,scheduler=2`: a writer and a standby identity, an
    active and a standby scheduler, each with its own port and data folder; `cdp status`
    shows the roles; SIGKILL the writer: the supervisor restarts it, and within seconds
    one live instance is the writer again, the other the standby."""
    data = tmp_path / "var"
    ports = _spaced_ports()
    nats_port = free_port()
    url = f"nats://127.0.0.1:{nats_port}"
    up = CdpUp(
        data,
        ports,
        nats_port,
        env={"CDP_LEASE_TTL": "2", "CDP_INSTANCE_TTL": "2", "CDP_LEASE_MARGIN": "0.5"},
        args=("--instances", "identity=2,scheduler=2"),
    )
    await up.start()
    nc: Client | None = None
    try:
        await up.wait_ready(timeout=60)
        async with aiohttp.ClientSession() as session:
            for name in ("identity", "scheduler"):
                async with session.get(f"http://127.0.0.1:{ports[name] + 100}/readyz") as resp:
                    body = await resp.json()
                    assert resp.status == 200, body
                    assert body["instance"] == f"{name}-2"
        await eventually(lambda: up.printed("Ctrl-C to stop"), timeout=20)
        for name in ("identity", "scheduler"):
            for k, port in ((1, ports[name]), (2, ports[name] + 100)):
                assert f"{name}-{k}" in up.text, up.text
                assert f"{port}/readyz" in up.text, up.text
            assert (data / f"{name}-1" / f"{name}.db").exists()
            assert (data / f"{name}-2" / f"{name}.db").exists()

        found = _cdp_status_json(data, url)
        roles = {(str(f["service"]), str(f.get("instance"))): f.get("role") for f in found}
        assert {roles[("identity", "identity-1")], roles[("identity", "identity-2")]} == {
            "writer",
            "standby",
        }, found
        assert {roles[("scheduler", "scheduler-1")], roles[("scheduler", "scheduler-2")]} == {
            "active",
            "standby",
        }, found
        assert {f["service"] for f in found} == set(SERVICES)

        nc = client = await nats.connect(
            url,
            nkeys_seed=str(seed_path(data / "secrets", ADMIN)),
            inbox_prefix=subjects.inbox_prefix(ADMIN),
        )
        [writer] = [i for (s, i), r in roles.items() if s == "identity" and r == "writer"]
        [standby] = [i for (s, i), r in roles.items() if s == "identity" and r == "standby"]
        pid = _instance_pid(up.marker, writer)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        killed_at = asyncio.get_running_loop().time()

        # The standby takes the writer's lease once it expires, unless the killed instance,
        # restarted by the supervisor meanwhile (as a standby: the lease is still held),
        # wins that race: either way a live process is the writer within seconds, and the
        # other instance is the standby.
        async def writer_again() -> bool:
            roles = _roles(await gather_status(client, ("identity",)), "identity")
            restarted = _instance_pid(up.marker, writer) not in (None, pid)
            return (
                restarted
                and sorted(roles) == sorted((writer, standby))
                and sorted(str(r) for r in roles.values()) == ["standby", "writer"]
            )

        try:
            await eventually(writer_again, timeout=20, interval=0.2)
        except AssertionError:
            now = await gather_status(client, ("identity",))
            logs = "".join(
                f"\n== {i}\n" + (data / "logs" / f"{i}.log").read_text()[-4000:]
                for i in (writer, standby)
            )
            raise AssertionError(f"no writer again: {now}\n{up.text}{logs}") from None
        took = asyncio.get_running_loop().time() - killed_at
        assert took < 12, took
        assert f"{writer} exited with status" in up.text, up.text
        assert f"{writer} restarted" in up.text, up.text
        await nc.close()
        nc = None
        code = await up.interrupt()
    finally:
        if nc is not None:
            await nc.close()
        await up.close()
    assert code == 0, up.text
    assert processes_with_env(up.marker) == [], "processes left running after Ctrl-C"
