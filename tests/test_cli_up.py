"""`cdp up`: starts nats-server and the six services; all ready; Ctrl-C stops everything."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from shared.config import SERVICES, port_variable
from shared.natsd import free_port
from tests.helpers import all_ready, eventually

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
    marker = f"CDP_TEST_RUN={tmp_path}"
    env = {
        **{k: v for k, v in os.environ.items() if k != "CDP_NATS_URL"},
        **{port_variable(n): str(p) for n, p in ports.items()},
        "CDP_TEST_RUN": str(tmp_path),
    }
    cdp = Path(sys.executable).parent / "cdp"
    proc = await asyncio.create_subprocess_exec(
        str(cdp),
        "up",
        "--data-dir",
        str(tmp_path / "var"),
        "--nats-port",
        str(free_port()),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    started = time.monotonic()
    lines: list[str] = []
    printed_table = asyncio.Event()

    async def read_output() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            lines.append(raw.decode())
            if "Ctrl-C to stop" in lines[-1]:
                printed_table.set()

    reader = asyncio.create_task(read_output())
    try:
        async with aiohttp.ClientSession() as session:
            while not await all_ready(session, ports):
                assert proc.returncode is None, "cdp up exited early"
                assert time.monotonic() - started < 20, "services not ready within 20 s"
                await asyncio.sleep(0.1)
        await asyncio.wait_for(printed_table.wait(), timeout=10)
        assert len(processes_with_env(marker)) >= 7  # nats-server and six services
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), timeout=30)
        await reader
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = "".join(lines)
    assert proc.returncode == 0, text
    for name in SERVICES:
        assert f"{ports[name]}/readyz" in text, text
    assert processes_with_env(marker) == [], "processes left running after Ctrl-C"
    for name in SERVICES:
        assert (tmp_path / "var" / f"{name}.db").exists()


async def start_up(
    tmp_path: Path, ports: dict[str, int], nats_port: int
) -> tuple[asyncio.subprocess.Process, list[str], asyncio.Task[None]]:
    """`cdp up` on these ports in a subprocess; its output lines are collected as they come."""
    env = {
        **{k: v for k, v in os.environ.items() if k != "CDP_NATS_URL"},
        **{port_variable(n): str(p) for n, p in ports.items()},
        "CDP_TEST_RUN": str(tmp_path),
    }
    cdp = Path(sys.executable).parent / "cdp"
    proc = await asyncio.create_subprocess_exec(
        str(cdp),
        "up",
        "--data-dir",
        str(tmp_path / "var"),
        "--nats-port",
        str(nats_port),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    lines: list[str] = []

    async def read_output() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            lines.append(raw.decode())

    return proc, lines, asyncio.create_task(read_output())


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
    marker = f"CDP_TEST_RUN={tmp_path}"
    proc, lines, reader = await start_up(tmp_path, ports, free_port())
    try:
        async with aiohttp.ClientSession() as session:
            await eventually(lambda: all_ready(session, ports), timeout=30, interval=0.1)
            pids = nats_server_pids(marker)
            assert len(pids) == 1, pids
            first = pids[0]
            os.kill(first, signal.SIGKILL)

            async def back() -> bool:
                pids = nats_server_pids(marker)
                return (
                    bool(pids)
                    and first not in pids
                    and any("nats-server" in x and "restarted" in x for x in lines)
                )

            await eventually(back, timeout=20, interval=0.1)
            await eventually(lambda: all_ready(session, ports), timeout=30, interval=0.1)
        text = "".join(lines)
        assert "exited with status" in text, text
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), timeout=30)
        await reader
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, "".join(lines)
    assert processes_with_env(marker) == [], "processes left running after Ctrl-C"


@pytest.mark.timeout(60)
async def test_up_refuses_to_start_when_its_nats_port_is_taken(tmp_path: Path) -> None:
    """Another process listens on the NATS port: `cdp up` says so and exits 1, instead of
    taking that process for its nats-server; nothing is left running."""
    ports = {name: free_port() for name in SERVICES}
    marker = f"CDP_TEST_RUN={tmp_path}"
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        proc, lines, reader = await start_up(tmp_path, ports, port)
        try:
            await asyncio.wait_for(proc.wait(), timeout=30)
            await reader
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    text = "".join(lines)
    assert proc.returncode == 1, text
    assert f"port {port} on 127.0.0.1 (NATS) is in use by another process" in text, text
    assert processes_with_env(marker) == []
