"""`cdp up`: starts nats-server and the six services; all ready; Ctrl-C stops everything."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from shared.config import SERVICES, port_variable
from shared.natsd import free_port
from tests.helpers import all_ready

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
