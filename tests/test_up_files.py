"""`cdp up` as an operator runs it: the profile lookup's bearer token is generated into the
secrets folder and required; every file it and the services create (SQLite, logs, keys,
JetStream data) is the owner's alone: files 0600, folders 0700."""

from __future__ import annotations

import stat
from pathlib import Path

import aiohttp
import pytest

from ops.natsd import free_port
from shared.config import SERVICES
from tests.processes import CdpUp

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]


@pytest.mark.timeout(90)
async def test_up_keeps_personal_data_behind_a_token_and_owner_only_files(
    tmp_path: Path,
) -> None:
    ports = {name: free_port() for name in SERVICES}
    data = tmp_path / "var"
    up = CdpUp(data, ports, free_port(), without=("CDP_PROFILE_TOKEN", "CDP_BIND"))
    await up.start()
    try:
        await up.wait_ready(timeout=30)
        async with aiohttp.ClientSession() as session:
            token_file = data / "secrets" / "profile.token"
            printed = "".join(up.text.split())  # the console wraps long lines
            assert f"needthebearertokenin{token_file}" in printed, up.lines
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
        code = await up.interrupt()
    finally:
        await up.close()
    assert code == 0, up.text
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
