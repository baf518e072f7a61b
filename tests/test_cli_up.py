"""`cdp up`: starts nats-server and the six services; all ready; Ctrl-C stops everything."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from pathlib import Path

import aiohttp
import pytest

from ops.natsd import free_port
from shared.config import SERVICES
from tests.helpers import all_ready, eventually
from tests.processes import CdpUp

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]


def processes_with_env(needle: str) -> list[int]:
    """PIDs whose environment contains `needle` (e.g. this test's data dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle.encode() in env.split(b"\0"):
            found.append(int(entry.name))
    return found


@pytest.mark.timeout(90)
async def test_up_brings_every_service_ready_and_ctrl_c_stops_all(tmp_path: Path) -> None:
    ports = {name: free_port() for name in SERVICES}
    up = CdpUp(tmp_path / "var", ports, free_port())
    await up.start()
    try:
        await up.wait_ready(timeout=20)
        await eventually(lambda: up.printed("Ctrl-C to stop"), timeout=10)
        assert len(processes_with_env(up.marker)) >= 7  # nats-server and six services
        console = f"http://127.0.0.1:{up.env['CDP_CONSOLE_PORT']}"
        assert f"web console on {console}" in up.text, up.text
        async with aiohttp.ClientSession() as session, session.get(console) as resp:
            assert resp.status == 200
            page = await resp.text()
        assert all(f'data-service="{name}"' in page for name in SERVICES)
        code = await up.interrupt()
    finally:
        await up.close()
    assert code == 0, up.text
    for name in SERVICES:
        assert f"{ports[name]}/readyz" in up.text, up.text
    assert processes_with_env(up.marker) == [], "processes left running after Ctrl-C"
    for name in SERVICES:
        assert (tmp_path / "var" / f"{name}.db").exists()


def nats_server_pids(marker: str) -> list[int]:
    out = []
    for pid in processes_with_env(marker):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "nats-server":
                out.append(pid)
    return out


@pytest.mark.timeout(90)
async def test_up_restarts_a_nats_server_that_died_and_says_so(tmp_path: Path) -> None:
    """SIGKILL the nats-server under `cdp up`: it is started again (on the same port, with
    the same data), `cdp up` prints it, and every service is ready again."""
    ports = {name: free_port() for name in SERVICES}
    up = CdpUp(tmp_path / "var", ports, free_port())
    await up.start()
    try:
        async with aiohttp.ClientSession() as session:
            await eventually(lambda: all_ready(session, ports), timeout=30, interval=0.1)
            pids = nats_server_pids(up.marker)
            assert len(pids) == 1, pids
            first = pids[0]
            os.kill(first, signal.SIGKILL)

            async def back() -> bool:
                pids = nats_server_pids(up.marker)
                return (
                    bool(pids)
                    and first not in pids
                    and any("nats-server" in x and "restarted" in x for x in up.lines)
                )

            await eventually(back, timeout=20, interval=0.1)
            await eventually(lambda: all_ready(session, ports), timeout=30, interval=0.1)
        assert "exited with status" in up.text, up.text
        code = await up.interrupt()
    finally:
        await up.close()
    assert code == 0, up.text
    assert processes_with_env(up.marker) == [], "processes left running after Ctrl-C"


@pytest.mark.timeout(60)
async def test_up_refuses_to_start_when_its_nats_port_is_taken(tmp_path: Path) -> None:
    """Another process listens on the NATS port: `cdp up` says so and exits 1, instead of
    taking that process for its nats-server; nothing is left running."""
    ports = {name: free_port() for name in SERVICES}
    up = CdpUp(tmp_path / "var", ports, 0)
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        up.nats_port = port
        await up.start()
        try:
            code = await up.wait_exit()
        finally:
            await up.close()
    assert code == 1, up.text
    assert f"port {port} on 127.0.0.1 (NATS) is in use by another process" in up.text, up.text
    assert processes_with_env(up.marker) == []
