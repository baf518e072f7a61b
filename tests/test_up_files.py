"""`cdp up` as an operator runs it: the profile lookup's bearer token is generated into the
secrets folder and required; every file it and the services create (SQLite, logs, keys,
JetStream data) is the owner's alone: files 0600, folders 0700."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from shared.config import SERVICES, port_variable
from shared.natsd import free_port
from tests.helpers import all_ready

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]


@pytest.mark.timeout(90)
async def test_up_keeps_personal_data_behind_a_token_and_owner_only_files(
    tmp_path: Path,
) -> None:
    ports = {name: free_port() for name in SERVICES}
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if k not in ("CDP_NATS_URL", "CDP_PROFILE_TOKEN", "CDP_BIND")
        },
        **{port_variable(n): str(p) for n, p in ports.items()},
    }
    data = tmp_path / "var"
    cdp = Path(sys.executable).parent / "cdp"
    proc = await asyncio.create_subprocess_exec(
        str(cdp),
        "up",
        "--data-dir",
        str(data),
        "--nats-port",
        str(free_port()),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    lines: list[str] = []

    async def read_output() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            lines.append(raw.decode())

    reader = asyncio.create_task(read_output())
    try:
        started = time.monotonic()
        async with aiohttp.ClientSession() as session:
            while not await all_ready(session, ports):
                assert proc.returncode is None, "cdp up exited early: " + "".join(lines)
                assert time.monotonic() - started < 30, "services not ready within 30 s"
                await asyncio.sleep(0.1)
            token_file = data / "secrets" / "profile.token"
            printed = "".join("".join(lines).split())  # the console wraps long lines
            assert f"needthebearertokenin{token_file}" in printed, lines
            token = token_file.read_text().strip()
            assert len(token) >= 32
            url = f"http://127.0.0.1:{ports['profile']}/v1/profiles"
            query = {"identity": "crm_id:nobody"}
            async with session.get(url, params=query) as r:
                assert r.status == 401
            async with session.get(
                url, params=query, headers={"Authorization": f"Bearer {token}"}
            ) as r:
                assert r.status == 404  # served: nobody has that identity
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), timeout=30)
        await reader
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, "".join(lines)
    assert (data / "profile.db").exists() and (data / "logs" / "profile.log").exists()
    assert (data / "nats").is_dir()
    loose = []
    for path in [data, *data.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_symlink():
            continue
        want = 0o700 if path.is_dir() else 0o600
        if mode & ~want or (path.is_dir() and mode != 0o700):
            loose.append(f"{path.relative_to(tmp_path)} {mode:o}")
    assert loose == []
