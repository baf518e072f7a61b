"""Locked-down defaults: `cdp up` runs NATS with a key per service, a client account and an
admin account. The whole path works with only the permissions each account has; a client
cannot change configuration; and no raw email or phone reaches any log line."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import StreamConfig

from ops.cli.apply import apply_objects, load_file
from ops.cli.check import wait_landed
from ops.natsd import NatsServer, free_port
from ops.security import (
    ACCOUNTS,
    ADMIN,
    CLIENT,
    CONSOLE,
    SecurityError,
    app_names,
    cli_credentials,
    ensure_credentials,
    is_app,
    new_seed,
    permissions,
    public_key,
    server_authorization,
)
from services.scheduler.service import SchedulerService
from shared import admin, subjects
from shared.admin import ApplyMany, ApplyManyResult, ConfigObject, GetRequest
from shared.config import SERVICES
from shared.streams import ensure_streams
from shared.subjects import inbox_prefix
from tests.destination_servers import WebhookServer
from tests.helpers import RETAIL_CONFIG, eventually, settings_for
from tests.processes import CdpUp

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
    assert ensure_credentials(tmp_path / "secrets", ("shop",))["shop"].startswith("U")


def test_the_client_may_ingest_listen_and_look_up_and_nothing_else() -> None:
    p = permissions(CLIENT)
    assert set(p.publish) == {"cdp.ingest.>", "cdp.profile.lookup"}
    assert p.publish_deny == ("cdp.ingest._delete", "cdp.ingest._probe")
    assert set(p.subscribe) == {"cdp.membership.>", "_INBOX_client.>"}
    assert not p.allow_responses


def test_the_console_may_only_read_and_listen() -> None:
    """The web console's own key: the read admin requests it shows and the profile lookup;
    nothing that changes anything (that needs the admin key, `cdp console --admin`)."""
    p = permissions(CONSOLE)
    assert set(p.subscribe) == {"cdp.membership.>", "_INBOX_console.>"}
    assert not p.allow_responses
    assert "cdp.profile.lookup" in p.publish
    assert {"cdp.admin.segmentation.list", "cdp.admin.destination.dlq"} <= set(p.publish)
    writes = ("apply", "replay", "run", "delete", "export", "rebuild")
    for subject in p.publish:
        assert subject.startswith("cdp.admin.") or subject == "cdp.profile.lookup", subject
        assert ">" not in subject, subject
        assert not any(part in writes for part in subject.split(".")[3:]), subject
    assert not is_app(CONSOLE), "the console lives in the platform account"
    conf = server_authorization({CONSOLE: "UCONSOLE", CLIENT: "UCLIENT"})
    platform, _, apps = conf.partition("APP: {")
    assert "UCONSOLE" in platform and "UCONSOLE" not in apps
    with pytest.raises(SecurityError):
        app_names({"CDP_APPS": "console"})


def test_each_service_serves_only_its_own_admin_area() -> None:
    for name in SERVICES:
        p = permissions(name)
        admin_subs = [x for x in p.subscribe if x.startswith("cdp.admin.")]
        assert admin_subs == [f"cdp.admin.{name}.>"]
        assert f"{inbox_prefix(name)}.>" in p.subscribe
        assert ">" not in p.publish and "cdp.>" not in p.publish
        assert not any(".DELETE." in x and "STREAM" in x for x in p.publish)


def test_a_request_is_answered_only_to_an_inbox() -> None:
    """Before, a service answered to any reply subject, an internal stream's included."""

    def msg(reply: str) -> Msg:
        return Msg(_client=None, subject=subjects.PROFILE_LOOKUP, reply=reply)  # type: ignore[arg-type]

    before = admin.refused_replies
    for ok in ("_INBOX.abc.1", "_INBOX_admin.abc.1", "_INBOX_client.x", "_R_.abc.def"):
        assert admin.answerable(msg(ok)), ok
    refused = (
        "cdp.config.dataset.web",
        "cdp.membership.email-optin",
        "cdp.jobs.segmentation.done",
        "cdp.x.changes.1",
        "cdp.ingest.web",
        "$JS.API.STREAM.DELETE.CDP_PROFILES",
        "_INBOXcdp.x",
        "x._INBOX.y",
    )
    for bad in refused:
        assert not admin.answerable(msg(bad)), bad
    assert not admin.answerable(msg(""))
    assert admin.refused_replies == before + len(refused)


def test_the_cli_inbox_follows_the_key_not_the_file_name_and_is_never_the_shared_one(
    tmp_path: Path,
) -> None:
    """Before, an admin seed in a file not named admin.nk replied on the shared `_INBOX`."""
    secrets = tmp_path / "var" / "secrets"
    ensure_credentials(secrets, ("other",))
    env = {"CDP_DATA_DIR": str(tmp_path / "var")}
    renamed = tmp_path / "ops-key.nk"
    renamed.write_bytes((secrets / "admin.nk").read_bytes())
    unknown = tmp_path / "stranger.nk"
    unknown.write_bytes(new_seed())
    app = tmp_path / "app.nk"
    app.write_bytes((secrets / "other.nk").read_bytes())
    cases = {
        None: "_INBOX_admin",  # the local admin seed
        renamed: "_INBOX_admin",
        unknown: "_INBOX_admin",  # a wrong guess is refused by the server, never a leak
        app: "_INBOX_other",
        secrets / "client.nk": "_INBOX_client",
    }
    for seed, prefix in cases.items():
        given = {**env, "CDP_NATS_NKEY": str(seed)} if seed else env
        assert cli_credentials(given)[1] == prefix, seed
    forced = {**env, "CDP_NATS_NKEY": str(unknown), "CDP_NATS_INBOX_PREFIX": "_INBOX_x"}
    assert cli_credentials(forced)[1] == "_INBOX_x"


def test_applications_live_in_their_own_account_with_only_the_exports() -> None:
    keys = {"admin": "UADMIN", "ingest": "UINGEST", "client": "UCLIENT", "other": "UOTHER"}
    conf = server_authorization(keys)
    platform, _, apps = conf.partition("APP: {")
    assert "jetstream: enabled" in platform and "jetstream" not in apps
    assert "UADMIN" in platform and "UINGEST" in platform
    assert "UCLIENT" in apps and "UOTHER" in apps and "UADMIN" not in apps
    for kind, subject in (
        ("service", "cdp.ingest.>"),
        ("stream", "cdp.membership.>"),
        ("service", "cdp.profile.lookup"),
    ):
        assert f'{{{kind}: "{subject}"}}' in platform
        assert f'{{{kind}: {{account: CDP, subject: "{subject}"}}}}' in apps
    assert apps.count("{service:") + apps.count("{stream:") == 3
    with pytest.raises(SecurityError):
        app_names({"CDP_APPS": "ingest"})
    with pytest.raises(SecurityError):
        app_names({"CDP_APPS": "Bad Name"})
    assert app_names({"CDP_APPS": "shop, crm_sync"}) == ("client", "shop", "crm_sync")


def test_service_keys_may_use_only_their_own_consumers_and_create_no_stream() -> None:
    """Before, every service key could create, update and delete consumers of any name on
    its input streams, and create and update every stream."""
    for name in SERVICES:
        for subject in permissions(name).publish:
            assert not subject.startswith(
                ("$JS.API.STREAM.CREATE.", "$JS.API.STREAM.UPDATE.", "$JS.API.STREAM.DELETE.")
            ), (name, subject)
            if subject.startswith("$JS.API.CONSUMER.") and "OBJ_" not in subject:
                # Named durables only; a wildcard only after a durable's name (a filter).
                parts = subject.split(".")
                assert parts[5] not in ("*", ">"), (name, subject)
    scheduler = permissions("scheduler").publish
    assert "$JS.API.CONSUMER.DELETE.CDP_CHANGES.segmentation" not in scheduler
    assert "$JS.API.CONSUMER.MSG.NEXT.CDP_JOBS.scheduler" in scheduler


@pytest.mark.asyncio
async def test_a_service_waits_not_ready_until_the_admin_creates_the_streams(
    tmp_path: Path,
) -> None:
    """Before, every service created (and could change) the streams itself."""
    server = NatsServer(tmp_path / "js", port=free_port(), log_file=tmp_path / "nats.log")
    await server.start()
    svc = SchedulerService(settings_for("scheduler", server.url, tmp_path))
    starting = asyncio.create_task(svc.start())
    try:

        async def reason() -> str:
            if svc.health.port == 0:
                return ""
            try:
                async with (
                    aiohttp.ClientSession() as s,
                    s.get(f"http://127.0.0.1:{svc.health.port}/readyz") as r,
                ):
                    return "" if r.status == 200 else str((await r.json())["reason"])
            except aiohttp.ClientError:
                return ""

        async def missing() -> bool:
            return "missing: run `cdp up` or `cdp setup`" in await reason()

        await eventually(missing, timeout=10)
        assert not starting.done()
        setup = await nats.connect(server.url)
        try:
            await ensure_streams(setup.jetstream())
        finally:
            await setup.close()
        await asyncio.wait_for(starting, timeout=10)
        assert svc.ready
    finally:
        if not starting.done():
            starting.cancel()
        await svc.stop()
        await server.stop()


# -- the platform, locked down ------------------------------------------------------------
@asynccontextmanager
async def cdp_up(
    tmp_path: Path, ports: dict[str, int], nats_port: int, **extra: str
) -> AsyncIterator[Path]:
    data = tmp_path / "var"
    env = {
        **extra,
        "CDP_INGEST_TOKEN": TOKEN,
        "CDP_LOG_LEVEL": "debug",
        "CDP_SECRET_WEBHOOK_TEST": "s3cret",
    }
    up = CdpUp(data, ports, nats_port, env=env)
    await up.start()
    try:
        await up.wait_ready(timeout=40)
        yield data
        code = await up.interrupt()
    finally:
        await up.close()
    assert code == 0, up.text[-3000:]


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
                ApplyMany(
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
                ApplyManyResult,
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
                    ApplyMany(
                        [ConfigObject("schema", {"name": "evil", "class": "profile", "fields": {}})]
                    ),
                    ApplyManyResult,
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


async def _all_refused(calls: tuple[Coroutine[Any, Any, Any], ...]) -> None:
    """Each JetStream API call fails: refused (a permissions violation gets no answer,
    hence the timeout) or answered with an error; none succeeds."""
    results = await asyncio.gather(
        *(asyncio.wait_for(c, timeout=3) for c in calls), return_exceptions=True
    )
    succeeded = [r for r in results if not isinstance(r, (nats.errors.Error, TimeoutError))]
    assert succeeded == [], succeeded


async def _at_least(items: list[str], n: int) -> bool:
    return len(items) >= n


# -- a hostile application key, a service key, two applications ---------------------------
INTERNAL_SUBJECTS = (
    "cdp.x.records",
    "cdp.x.profiles.1",
    "cdp.x.changes.1",
    "cdp.config.dataset.web",
    "cdp.membership.email-optin",
    "cdp.jobs.segmentation.done",
    "cdp.admin.ingest.apply",
    "cdp.admin.profile.get",
    "cdp.privacy.x",
    "cdp.batches.x",
    "cdp.probe.x",
    "cdp.ingest._delete",
    "cdp.ingest._probe",
    "_INBOX_admin.x",
    "_INBOX_profile.x",
    "$JS.API.STREAM.CREATE.EVIL",
    "$JS.API.STREAM.UPDATE.CDP_PROFILES",
    "$JS.API.STREAM.DELETE.CDP_PROFILES",
    "$JS.API.STREAM.PURGE.CDP_PROFILES",
    "$JS.API.STREAM.INFO.CDP_PROFILES",
    "$JS.API.STREAM.MSG.GET.CDP_CONFIG",
    "$JS.API.CONSUMER.CREATE.CDP_CHANGES.evil",
    "$JS.API.CONSUMER.DELETE.CDP_CHANGES.segmentation",
    "$JS.API.CONSUMER.INFO.CDP_CHANGES.segmentation",
    "$JS.API.CONSUMER.MSG.NEXT.CDP_CHANGES.segmentation",
    "$JS.ACK.CDP_CHANGES.segmentation.1.1.1.1.1",
    "$O.cdp-batches.x",
)
TRICK_REPLIES = (
    "cdp.config.dataset.web",
    "cdp.membership.email-optin",
    "cdp.jobs.segmentation.done",
    "cdp.x.changes.1",
    "cdp.x.records",
    "cdp.ingest.crm",
    "_INBOX_admin.x",
)
FORBIDDEN_SUBSCRIPTIONS = (
    ">",
    "_INBOX.>",
    "_INBOX_other.>",
    "_INBOX_admin.>",
    "_R_.>",
    "$JS.>",
    "cdp.>",
    "cdp.x.>",
    "cdp.config.>",
    "cdp.jobs.>",
    "cdp.admin.>",
    "cdp.ingest.>",
)


async def _state(adm: Client) -> dict[str, Any]:
    """Every stream's message count, every consumer's configuration, the datasets."""
    js = adm.jetstream()
    out: dict[str, Any] = {}
    for name in await js.streams_info():
        stream = name.config.name
        assert stream is not None
        out[stream] = name.state.messages
        for c in await js.consumers_info(stream):
            cfg = c.config
            out[f"{stream}/{c.name}"] = (cfg.filter_subject, cfg.filter_subjects, cfg.ack_policy)
    out["datasets"] = await admin.request(
        adm, subjects.admin("ingest", "get"), GetRequest(kind="dataset"), dict[str, Any]
    )
    return out


async def _drained(adm: Client) -> dict[str, Any]:
    landed = await wait_landed(adm, timeout=20)
    assert landed.landed, landed
    return await _state(adm)


@pytest.mark.asyncio
@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_a_hostile_application_key_is_refused_everything_internal_and_stores_nothing(
    tmp_path: Path,
) -> None:
    """Before accounts, a lookup with an internal reply subject made the profile service
    publish there, a JetStream publish with an internal reply stored its PubAck in an
    internal stream, and any client could read every other client's `_INBOX` answers."""
    ports = {name: free_port() for name in SERVICES}
    nats_port = free_port()
    url = f"nats://127.0.0.1:{nats_port}"
    async with cdp_up(tmp_path, ports, nats_port, CDP_APPS="other") as data:
        secrets = data / "secrets"
        adm = await connect(url, secrets / "admin.nk", ADMIN)
        errors: list[str] = []
        client = await connect(url, secrets / "client.nk", CLIENT, errors)
        other_errors: list[str] = []
        other = await connect(url, secrets / "other.nk", "other", other_errors)
        try:
            await apply_objects(
                adm, load_file(RETAIL_CONFIG), dry_run=False, file=str(RETAIL_CONFIG)
            )
            js = client.jetstream()
            for n in range(3):
                ack = await js.publish(
                    "cdp.ingest.crm",
                    json.dumps(person(n)).encode(),
                    headers={"Nats-Msg-Id": f"hostile-{n}"},
                )
                assert ack.stream == "CDP_INGEST"
            s0 = await _drained(adm)
            s1 = await _drained(adm)
            probe = {k: s1[k] - s0[k] for k in s1 if isinstance(s1[k], int)}

            seen: list[str] = []

            async def record(msg: Msg) -> None:
                # A lookup answer (a profile) or a PubAck outside the requests themselves.
                answer = b'"CDP_INGEST"' in msg.data or b'"profile_id"' in msg.data
                if answer and not msg.subject.startswith(("cdp.ingest.", "cdp.profile.lookup")):
                    seen.append(msg.subject)

            # Everything the admin can see on the platform's subjects, during the tricks.
            watch = await adm.subscribe("cdp.>", cb=record)

            # Publishing to any internal subject, or to the JetStream API.
            for subject in INTERNAL_SUBJECTS:
                await client.publish(subject, b'{"kind":"segmentation","status":"succeeded"}')
            # A lookup answered onto an internal subject.
            lookup = json.dumps({"identity": "crm_id:SEC0001", "events": 0}).encode()
            for reply in TRICK_REPLIES:
                await client.publish(subjects.PROFILE_LOOKUP, lookup, reply=reply)
            # A JetStream publish whose PubAck would land on an internal subject (a
            # duplicate message id: nothing new is stored, the PubAck is sent all the same).
            for reply in TRICK_REPLIES:
                await client.publish(
                    "cdp.ingest.crm",
                    json.dumps(person(1)).encode(),
                    reply=reply,
                    headers={"Nats-Msg-Id": "hostile-1"},
                )
            # The JetStream API through the client library.
            calls = (
                js.add_stream(name="EVIL", subjects=["evil.>"]),
                js.update_stream(config=StreamConfig(name="CDP_PROFILES", max_msgs=1)),
                js.delete_stream("CDP_PROFILES"),
                js.purge_stream("CDP_PROFILES"),
                js.stream_info("CDP_PROFILES"),
                js.delete_consumer("CDP_CHANGES", "segmentation"),
                js.consumer_info("CDP_CHANGES", "segmentation"),
                js.add_consumer("CDP_CHANGES", durable_name="evil"),
            )
            await _all_refused(calls)
            # Reading anything but its own inbox and membership announcements.
            for subject in FORBIDDEN_SUBSCRIPTIONS:
                await client.subscribe(subject, cb=record)
            await client.flush()

            # Two applications: neither reads the other's answers.
            for subject in ("_INBOX_client.>", "_INBOX.>", ">"):
                await other.subscribe(subject, cb=record)
            await other.flush()
            answer = await client.request(subjects.PROFILE_LOOKUP, lookup, timeout=5)
            assert json.loads(answer.data)["ok"], answer.data
            answer = await other.request(subjects.PROFILE_LOOKUP, lookup, timeout=5)
            assert json.loads(answer.data)["ok"], answer.data

            # The CLI with the admin seed under another file name: its answers stay its own.
            ops = tmp_path / "ops-key.nk"
            ops.write_bytes((secrets / "admin.nk").read_bytes())
            ops.chmod(0o600)
            ok = cli(data, url, "identity", "crm_id:SEC0001", nkey=ops)
            assert ok.returncode == 0, ok.stderr + ok.stdout
            assert "SEC0001" in ok.stdout

            await eventually(lambda: _at_least(errors, len(INTERNAL_SUBJECTS)), timeout=10)
            s2 = await _drained(adm)
            await watch.unsubscribe()
        finally:
            await client.close()
            await other.close()
            await adm.close()

    assert all("permissions violation" in e.lower() for e in errors + other_errors), errors
    refused_subs = [e for e in errors if "subscription" in e.lower()]
    assert len(refused_subs) >= len(FORBIDDEN_SUBSCRIPTIONS), errors
    assert len([e for e in other_errors if "subscription" in e.lower()]) == 3, other_errors
    # Nothing reached an internal subject but the probes of the drain...
    assert seen == [], seen
    # ... and nothing was stored anywhere: each stream grew by one drain's probe only,
    # every consumer and every dataset is as it was.
    assert {k: s2[k] - s1[k] for k in s2 if isinstance(s2[k], int)} == probe
    assert {k: v for k, v in s2.items() if not isinstance(v, int)} == {
        k: v for k, v in s1.items() if not isinstance(v, int)
    }


@pytest.mark.asyncio
@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_service_key_cannot_change_streams_or_touch_another_services_consumer(
    tmp_path: Path,
) -> None:
    """Before, the scheduler's key could set CDP_PROFILES to max_msgs=1 and delete the
    segmentation service's consumer."""
    ports = {name: free_port() for name in SERVICES}
    nats_port = free_port()
    url = f"nats://127.0.0.1:{nats_port}"
    async with cdp_up(tmp_path, ports, nats_port) as data:
        secrets = data / "secrets"
        adm = await connect(url, secrets / "admin.nk", ADMIN)
        sched = await connect(url, secrets / "scheduler.nk", "scheduler")
        try:
            before = await adm.jetstream().stream_info("CDP_PROFILES")
            js = sched.jetstream()
            calls = (
                js.update_stream(config=StreamConfig(name="CDP_PROFILES", max_msgs=1)),
                js.add_stream(name="CDP_EVIL", subjects=["evil.>"]),
                js.delete_stream("CDP_PROFILES"),
                js.purge_stream("CDP_PROFILES"),
                js.delete_consumer("CDP_CHANGES", "segmentation"),
                js.add_consumer("CDP_JOBS", durable_name="not-the-scheduler"),
            )
            await _all_refused(calls)
            after = await adm.jetstream().stream_info("CDP_PROFILES")
            assert after.config.max_msgs == before.config.max_msgs
            assert (await adm.jetstream().consumer_info("CDP_CHANGES", "segmentation")).name
            names = {c.name for c in await adm.jetstream().consumers_info("CDP_JOBS")}
            assert "not-the-scheduler" not in names
            # Its own consumer it may still read.
            info = await js.consumer_info("CDP_JOBS", "scheduler")
            assert info.name == "scheduler"
        finally:
            await sched.close()
            await adm.close()
