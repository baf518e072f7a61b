"""Locked-down defaults: `cdp up` runs NATS with a key per service, a client account and an
admin account. The whole path works with only the permissions each account has; a client
cannot change configuration; and no raw email or phone reaches any log line."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from shared import admin, subjects
from shared.admin import ApplyBatch, ApplyBatchResult, ConfigObject, GetRequest
from shared.cli.apply import apply_objects, load_file
from shared.config import SERVICES, port_variable
from shared.natsd import free_port
from shared.security import (
    ACCOUNTS,
    ADMIN,
    CLIENT,
    ensure_credentials,
    inbox_prefix,
    permissions,
    public_key,
    server_authorization,
)
from tests.destination_servers import WebhookServer
from tests.helpers import RETAIL_CONFIG, all_ready, eventually

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "test-ingest-token-5f1c"
PEOPLE = 12


# -- the permission table, without a server ------------------------------------------------
def test_every_account_has_a_key_and_the_configuration_names_only_public_keys(
    tmp_path: Path,
) -> None:
    keys = ensure_credentials(tmp_path / "secrets")
    assert set(keys) == set(ACCOUNTS)
    assert all(k.startswith("U") for k in keys.values())
    for account in ACCOUNTS:
        seed = tmp_path / "secrets" / f"{account}.nk"
        assert seed.stat().st_mode & 0o077 == 0, "a seed readable by others"
        assert seed.read_text().startswith("SU")
    assert (tmp_path / "secrets").stat().st_mode & 0o077 == 0
    assert ensure_credentials(tmp_path / "secrets") == keys, "keys must survive a restart"
    conf = server_authorization(keys)
    for account in ACCOUNTS:
        text = (tmp_path / "secrets" / f"{account}.nk").read_text().strip()
        assert text not in conf, "a seed in the server's configuration"
    assert conf.count("nkey:") == len(ACCOUNTS)


def test_the_client_may_ingest_listen_and_look_up_and_nothing_else() -> None:
    p = permissions(CLIENT)
    assert set(p.publish) == {"cdp.ingest.>", "cdp.profile.lookup"}
    assert p.publish_deny == ("cdp.ingest._delete", "cdp.ingest._probe")
    assert set(p.subscribe) == {"cdp.membership.>", "_INBOX.>"}
    assert not p.allow_responses


def test_each_service_serves_only_its_own_admin_area() -> None:
    for name in SERVICES:
        p = permissions(name)
        admin_subs = [x for x in p.subscribe if x.startswith("cdp.admin.")]
        assert admin_subs == [f"cdp.admin.{name}.>"]
        assert f"{inbox_prefix(name)}.>" in p.subscribe
        assert ">" not in p.publish and "cdp.>" not in p.publish
        assert not any(".DELETE." in x and "STREAM" in x for x in p.publish)


# -- the platform, locked down ------------------------------------------------------------
@asynccontextmanager
async def cdp_up(tmp_path: Path, ports: dict[str, int], nats_port: int) -> AsyncIterator[Path]:
    data = tmp_path / "var"
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("CDP_NATS_URL", "CDP_NATS_NKEY")},
        **{port_variable(n): str(p) for n, p in ports.items()},
        "CDP_INGEST_TOKEN": TOKEN,
        "CDP_LOG_LEVEL": "debug",
        "CDP_SECRET_WEBHOOK_TEST": "s3cret",
    }
    cdp = Path(sys.executable).parent / "cdp"
    proc = await asyncio.create_subprocess_exec(
        str(cdp),
        "up",
        "--data-dir",
        str(data),
        "--nats-port",
        str(nats_port),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output: list[bytes] = []

    async def read() -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            output.append(line)

    reader = asyncio.create_task(read())
    try:
        started = time.monotonic()
        async with aiohttp.ClientSession() as session:
            while not await all_ready(session, ports):
                assert proc.returncode is None, b"".join(output).decode()
                assert time.monotonic() - started < 40, "not ready in 40 s"
                await asyncio.sleep(0.1)
        yield data
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), timeout=30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await reader
    assert proc.returncode == 0, b"".join(output).decode()[-3000:]


def person(n: int) -> dict[str, Any]:
    return {
        "crm_id": f"SEC{n:04d}",
        "email": f"secret.person{n}@example.com",
        "phone": f"+1201555{100 + n:04d}",
        "person": {"name": {"first": "Ada", "last": f"Lovelace{n}"}},
        "consents": {"marketing": {"email": "y", "sms": "y", "any": "y"}},
    }


async def connect(url: str, seed: Path, account: str, errors: list[str] | None = None) -> Client:
    async def on_error(exc: Exception) -> None:
        if errors is not None:
            errors.append(str(exc))

    return await nats.connect(
        url,
        name=f"test-{account}",
        nkeys_seed=str(seed),
        inbox_prefix=inbox_prefix(account),
        error_cb=on_error,
        allow_reconnect=False,
    )


def cli(data: Path, nats_url: str, *args: str, nkey: Path | None = None) -> Any:
    env = {**os.environ, "CDP_DATA_DIR": str(data), "CDP_NATS_URL": nats_url}
    env.pop("CDP_NATS_NKEY", None)
    if nkey is not None:
        env["CDP_NATS_NKEY"] = str(nkey)
    return subprocess.run(
        [str(Path(sys.executable).parent / "cdp"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.asyncio
@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_locked_down_platform_works_end_to_end_refuses_clients_and_logs_no_pii(
    tmp_path: Path,
) -> None:
    ports = {name: free_port() for name in SERVICES}
    nats_port = free_port()
    url = f"nats://127.0.0.1:{nats_port}"
    people = [person(n) for n in range(PEOPLE)]
    hook_server = WebhookServer(signing_secret="s3cret")
    async with cdp_up(tmp_path, ports, nats_port) as data, hook_server as hook:
        secrets = data / "secrets"
        # Without a key, nothing: not even a connection.
        with pytest.raises(nats.errors.Error):
            await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0)

        adm = await connect(url, secrets / "admin.nk", ADMIN)
        client_errors: list[str] = []
        client = await connect(url, secrets / "client.nk", CLIENT, client_errors)
        try:
            await apply_objects(
                adm, load_file(RETAIL_CONFIG), dry_run=False, file=str(RETAIL_CONFIG)
            )
            await admin.request(
                adm,
                subjects.admin("destination", "apply"),
                ApplyBatch(
                    [
                        ConfigObject(
                            "destination",
                            {
                                "name": "sec-hook",
                                "type": "webhook",
                                "segments": ["email-optin"],
                                "connection": {"url": hook.url},
                                "secrets": {"signing_secret": "CDP_SECRET_WEBHOOK_TEST"},
                            },
                        )
                    ]
                ),
                ApplyBatchResult,
            )

            # The client account: publish records, receive membership, look up a profile.
            changes: list[dict[str, Any]] = []

            async def on_change(msg: Msg) -> None:
                changes.append(json.loads(msg.data))

            await client.subscribe("cdp.membership.>", cb=on_change)
            js = client.jetstream()
            for p in people[: PEOPLE // 2]:
                await js.publish("cdp.ingest.crm", json.dumps(p).encode())
            bad = {**person(99), "consents": "yes please"}  # a wrong type, with an email in it
            await js.publish("cdp.ingest.crm", json.dumps(bad).encode())

            # The HTTP door wants its token.
            door = f"http://127.0.0.1:{ports['ingest']}/v1/datasets/crm/records"
            body = json.dumps(people[PEOPLE // 2 :]).encode()
            async with aiohttp.ClientSession() as session:
                async with session.post(door, data=body) as r:
                    assert r.status == 401
                    assert "Bearer" in r.headers["WWW-Authenticate"]
                wrong = {"Authorization": "Bearer nope"}
                async with session.post(door, data=body, headers=wrong) as r:
                    assert r.status == 401
                good = {"Authorization": f"Bearer {TOKEN}"}
                async with session.post(door, data=body, headers=good) as r:
                    assert r.status == 202, await r.text()

            async def all_joined() -> bool:
                joined = {
                    c["profile_id"]
                    for c in changes
                    if c["segment"] == "email-optin" and c["status"] == "realized"
                }
                return len(joined) >= PEOPLE

            await eventually(all_joined, timeout=40)
            await hook.wait_for(1, timeout=20)

            reply = await client.request(
                subjects.PROFILE_LOOKUP,
                json.dumps({"identity": "email:secret.person3@example.com"}).encode(),
                timeout=5,
            )
            looked = json.loads(reply.data)
            assert looked["ok"], looked
            assert looked["result"]["attributes"]["crm_id"] == "SEC0003"

            # What the client may not do: configure, delete people, read internals.
            before = await _schemas(adm)
            with pytest.raises(nats.errors.Error):
                await admin.request(
                    client,
                    subjects.admin("ingest", "apply"),
                    ApplyBatch(
                        [ConfigObject("schema", {"name": "evil", "class": "profile", "fields": {}})]
                    ),
                    ApplyBatchResult,
                    timeout=2,
                )
            await client.publish("cdp.config.schema.evil", b"{}")
            await client.publish(subjects.PRIVACY_DELETE, b"{}")
            await client.publish(subjects.RECORDS, b"\x90")
            await client.subscribe("cdp.x.>")
            await client.subscribe("_INBOX_admin.>")
            await client.flush()
            await eventually(lambda: _at_least(client_errors, 6), timeout=10)
            assert all("permissions violation" in e.lower() for e in client_errors)
            assert await _schemas(adm) == before, "a client changed the configuration"

            # The CLI: a client key is refused with a clear reason, the local admin key works.
            refused = cli(data, url, "apply", "-f", str(RETAIL_CONFIG), nkey=secrets / "client.nk")
            assert refused.returncode == 1
            assert "NATS refused these credentials" in refused.stderr, refused.stderr
            ok = cli(data, url, "delete", "email:secret.person0@example.com")
            assert ok.returncode == 0, ok.stderr + ok.stdout
            rows = tmp_path / "more.csv"
            rows.write_text(
                "crm_id,email,phone\n"
                + "".join(f"SEC9{n},file.person{n}@example.com,+1201555019{n}\n" for n in range(3))
            )
            ok = cli(data, url, "ingest", "crm", str(rows), "--wait")
            assert ok.returncode == 0, ok.stderr + ok.stdout
            ok = cli(data, url, "status")
            assert ok.returncode == 0, ok.stderr + ok.stdout
            ok = cli(data, url, "check")
            assert ok.returncode == 0, ok.stderr + ok.stdout
            assert "no violation" in ok.stdout
            reply = await client.request(
                subjects.PROFILE_LOOKUP,
                json.dumps({"identity": "crm_id:SEC92"}).encode(),
                timeout=5,
            )
            assert json.loads(reply.data)["ok"], reply.data
            ok = cli(data, url, "jobs", "run")
            assert ok.returncode == 0, ok.stderr + ok.stdout
        finally:
            await client.close()
            await adm.close()

    # Every service did all of that with only its own permissions: the server refused
    # the client key alone.
    client_key = public_key((data / "secrets" / "client.nk").read_bytes())
    nats_log = (data / "logs" / "nats.log").read_text()
    violations = [line for line in nats_log.splitlines() if "Violation" in line]
    assert len(violations) >= 7, nats_log[-3000:]
    others = [line for line in violations if client_key not in line]
    assert others == [], "\n".join(others)
    # ... and no log line, of any service or of nats-server, holds a raw email or phone.
    logs = {p.name: p.read_text() for p in (data / "logs").glob("*.log")}
    assert set(logs) >= {f"{n}.log" for n in SERVICES}
    assert sum(len(text.splitlines()) for text in logs.values()) > 50
    raw = [p["email"] for p in people] + [p["phone"] for p in people]
    raw += ["secret.person99@example.com", person(99)["phone"]]
    pattern = re.compile("|".join(re.escape(x) for x in raw))
    leaks = [
        f"{name}: {line[:200]}"
        for name, text in logs.items()
        for line in text.splitlines()
        if pattern.search(line) or re.search(r"[\w.+-]+@example\.com", line)
    ]
    assert leaks == [], "\n".join(leaks[:10])


async def _schemas(nc: Client) -> Any:
    reply = await admin.request(
        nc, subjects.admin("ingest", "get"), GetRequest(kind="schema"), dict[str, Any]
    )
    return reply


async def _at_least(items: list[str], n: int) -> bool:
    return len(items) >= n
