"""The one bring-up (ops.platform): nats-server, the streams and the six services, as OS
processes under the supervisor or in this process, all ready; stopped, nothing is left."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from ops.platform import Platform, PortsTaken, service_class
from shared.config import SERVICES
from shared.runtime import Service


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_each_service_class_is_found_by_its_name() -> None:
    for name in SERVICES:
        cls = service_class(name)
        assert issubclass(cls, Service)
        assert cls.name == name
        assert cls.__module__ == f"services.{name}.service"


@pytest.mark.asyncio
@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_processes_come_up_ready_and_stop_leaving_no_process(tmp_path: Path) -> None:
    """As `cdp up` runs it: an embedded nats-server with a key per service, and the six
    services as processes; every one answers ready; once stopped, none of them runs."""
    async with Platform(tmp_path / "var", secure=True) as platform:
        assert await platform.all_ready() == {}
        pids = platform.pids()
        assert set(pids) == {*SERVICES, "nats-server"}
        assert all(pid is not None and alive(pid) for pid in pids.values()), pids
        assert platform.token_file == platform.secrets / "profile.token"
    assert platform.codes == dict.fromkeys(SERVICES, 0)
    assert [pid for pid in pids.values() if pid is not None and alive(pid)] == []
    for name in SERVICES:
        assert platform.db(name).exists()
        assert (platform.logs / f"{name}.log").exists()


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_in_process_services_come_up_ready_and_stop(tmp_path: Path) -> None:
    """In process (as the tests run them), each service object answers ready on its HTTP
    port; stopped, each is not ready any more and nats-server is gone."""
    platform = Platform(tmp_path / "var", in_process=True, secure=True)
    await platform.start()
    try:
        assert list(platform.services) == list(SERVICES)
        for name, svc in platform.services.items():
            assert type(svc) is service_class(name)
            assert svc.ready
            assert svc.settings.nats_nkey == platform.seed(name)
        assert await platform.all_ready() == {}
        server = platform.pids()["nats-server"]
        assert server is not None and alive(server)
    finally:
        codes = await platform.stop()
    assert codes == dict.fromkeys(reversed(SERVICES), 0)
    assert not any(svc.ready for svc in platform.services.values())
    assert not alive(server)
    assert await platform.stop() == codes  # idempotent


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_taken_port_is_refused_and_nothing_is_started(tmp_path: Path) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        platform = Platform(tmp_path / "var", ports={"ingest": port}, services=("ingest",))
        with pytest.raises(PortsTaken) as caught:
            await platform.start()
    assert caught.value.taken == [f"port {port} on 127.0.0.1 (the ingest service)"]
    assert platform.pids() == {}
    assert not (tmp_path / "var" / "nats").exists()
