"""The web console against a running platform (real nats-server with every key, the six
services in process): its pages show what the platform holds, its live stream follows
membership changes, its login keeps strangers out, and its NATS key can only read."""

from __future__ import annotations

import asyncio
import html
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import nats
import nats.errors
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from ops.cli.apply import apply_objects, load_file
from ops.cli.check import wait_landed
from ops.cli.ingest import run_batch
from ops.console.app import make_app
from ops.console.auth import COOKIE
from ops.console.source import Source, credentials
from ops.console.views import AUTH
from ops.platform import Platform
from ops.security import CONSOLE
from shared import admin, subjects
from shared.admin import (
    AdminFailure,
    ApplyMany,
    ApplyManyResult,
    ConfigObject,
    ErrorsQuery,
    ErrorsResult,
    EstimateRequest,
    EstimateResult,
    ExportResult,
    ExportRun,
)
from shared.config import SERVICES
from shared.log import configure_logging
from shared.subjects import inbox_prefix
from tests.helpers import RETAIL_CONFIG, eventually

pytestmark = [pytest.mark.asyncio]
Client = TestClient[web.Request, web.Application]

EMAIL = "ada.console@example.com"


@pytest_asyncio.fixture
async def platform(tmp_path: Path) -> AsyncIterator[Platform]:
    """Locked down as `cdp up` runs it (a key per service, the console's included), the
    services in this process, the retail example applied."""
    p = Platform(tmp_path / "var", in_process=True, secure=True)
    await p.start()
    try:
        nc = await p.connect("test-console-setup")
        try:
            await apply_objects(
                nc, load_file(RETAIL_CONFIG), dry_run=False, file=str(RETAIL_CONFIG)
            )
        finally:
            await nc.close()
        yield p
    finally:
        await p.stop()


@pytest_asyncio.fixture
async def console(platform: Platform) -> AsyncIterator[Client]:
    """The console with its own key, on loopback (no login)."""
    seed, prefix = credentials(platform.data_dir, as_admin=False, env={})
    assert seed is not None and seed.name == "console.nk"
    source = Source(platform.nats_url, seed, prefix)
    await source.start()
    client: Client = TestClient(TestServer(make_app(source, None)))
    await client.start_server()
    try:
        yield client
    finally:
        await source.stop()
        await client.close()


async def _text(client: Client, path: str) -> str:
    resp = await client.get(path)
    assert resp.status == 200, (path, resp.status, await resp.text())
    return await resp.text()


async def _next_event(stream: aiohttp.StreamReader, timeout: float) -> dict[str, object]:
    """The next `membership` event of a server-sent event stream."""

    async def read() -> dict[str, object]:
        event = ""
        while True:
            line = (await stream.readline()).decode().rstrip("\n")
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event == "membership":
                data: dict[str, object] = json.loads(line.removeprefix("data: "))
                return data

    return await asyncio.wait_for(read(), timeout)


@pytest.mark.timeout(150)
async def test_the_console_shows_services_audiences_profiles_destinations_and_batches(
    platform: Platform, console: Client, tmp_path: Path
) -> None:
    adm = await platform.connect("test-console-admin")
    try:
        await admin.request(
            adm,
            subjects.admin("destination", "apply"),
            ApplyMany(
                [
                    ConfigObject(
                        "destination",
                        {
                            "name": "console-hook",
                            "type": "webhook",
                            "segments": ["email-optin"],
                            "connection": {"url": "http://127.0.0.1:9/cdp"},
                            "secrets": {"signing_secret": "CDP_SECRET_CONSOLE_TEST"},
                        },
                    ),
                    ConfigObject(
                        "destination",
                        {
                            "name": "console-phones",
                            "type": "webhook",
                            "segments": ["email-optin"],
                            "connection": {"url": "http://127.0.0.1:9/cdp"},
                            "secrets": {"signing_secret": "CDP_SECRET_CONSOLE_TEST"},
                            "identity": "phone",
                        },
                    ),
                    ConfigObject(
                        "destination",
                        {
                            "name": "console-file",
                            "type": "file",
                            "segments": ["email-optin"],
                            "export": {"folder": "exports", "schedule": "manual"},
                        },
                    ),
                ]
            ),
            ApplyManyResult,
        )

        # Overview: the six services, each ready.
        page = await _text(console, "/")
        for name in SERVICES:
            assert f'data-service="{name}"' in page
        assert page.count('<span class="ok">ready</span>') == len(SERVICES)
        assert '<strong id="ingest-rate">-</strong>' in page, "no rate before a second look"

        # Audiences: the live stream sends the count change of a segment being realized.
        live = await console.get("/audiences/live")
        assert live.headers["Content-Type"].startswith("text/event-stream")
        record = {
            "crm_id": "CONSOLE1",
            "email": EMAIL,
            "person": {"name": {"first": "Ada", "last": "Lovelace"}},
            "consents": {"marketing": {"email": "y", "sms": "n", "any": "y"}},
        }
        await adm.jetstream().publish("cdp.ingest.crm", json.dumps(record).encode())
        change = await _next_event(live.content, timeout=30)
        while change["segment"] != "email-optin":
            change = await _next_event(live.content, timeout=30)
        assert change == {"segment": "email-optin", "delta": 1, "entered": 1, "exited": 0}
        live.close()
        assert (await wait_landed(adm, timeout=30)).landed

        page = await _text(console, "/audiences")
        row = re.search(r'<tr data-segment="email-optin">(.*?)</tr>', page, re.S)
        assert row is not None
        assert '<td class="members">1</td>' in row.group(1)
        assert "<td>1 / 0 / 0</td>" in row.group(1), "realized / existing / exited"
        assert 'aria-label="1 entered, 0 exited in the last 24 hours"' in row.group(1)
        assert "streaming" in row.group(1)
        assert "consents.marketing.email = &#34;y&#34;" in row.group(1)

        # An estimate of a typed expression, and the parser's message for a bad one.
        resp = await console.post("/audiences/estimate", data={"expression": "email exists"})
        assert "about <strong>1</strong> of 1 profiles" in await resp.text()
        resp = await console.post("/audiences/estimate", data={"expression": "email ==== 3"})
        bad = await resp.text()
        with pytest.raises(AdminFailure) as parser:
            await admin.request(
                adm,
                subjects.admin("segmentation", "estimate"),
                EstimateRequest("email ==== 3"),
                EstimateResult,
            )
        assert "estimate-error" in bad and parser.value.message in html.unescape(bad)

        # Profiles: attributes, memberships and the identity graph as SVG.
        page = await _text(console, f"/profiles?identity=email:{EMAIL}")
        attributes = page.split('id="attributes"', 1)[1].split("</table>", 1)[0]
        assert "person.name.first" in attributes and "Ada" in attributes
        assert "email-optin" in page.split('id="memberships"', 1)[1].split("</table>", 1)[0]
        svg = page.split('<svg class="graph"', 1)[1].split("</svg>", 1)[0]
        assert f"email:{EMAIL}" in svg
        assert "CONSOLE1" in svg and "<line" in svg
        bad_query = await _text(console, "/profiles?identity=no-namespace")
        assert "expected &lt;namespace&gt;:&lt;value&gt;" in bad_query

        # Overview again: the records streamed since its first look make an ingest rate.
        async def rate_shown() -> bool:
            found = re.search(
                r'<strong id="ingest-rate">([0-9.]+)</strong>', await _text(console, "/")
            )
            return found is not None and float(found.group(1)) > 0

        await eventually(rate_shown, timeout=20)

        # Destinations: the configured webhook with its counts; the member has no phone,
        # so the destination that sends phones leaves her out, by that reason; a file
        # export's file is listed.
        page = await _text(console, "/destinations")
        assert 'data-destination="console-hook"' in page
        assert "webhook" in page

        async def excluded_shown() -> bool:
            return "missing identity: 1" in await _text(console, "/destinations")

        await eventually(excluded_shown, timeout=20)
        exported = await admin.request(
            adm,
            subjects.admin("destination", "export.run"),
            ExportRun("console-file"),
            ExportResult,
        )
        assert exported.status == "succeeded" and exported.files
        page = await _text(console, "/destinations")
        assert "Files exported by console-file" in page
        assert html.escape(Path(exported.files[0]).name) in page

        # Batches: an ingested file with one bad row, and that row's reason.
        csv = tmp_path / "crm-console.csv"
        rows = ["crm_id,email,person.birth_date"]
        rows += [f"B{i},b{i}@example.com,1990-01-0{1 + i % 9}" for i in range(40)]
        rows.append("B-BAD,bad@example.com,not-a-date")
        csv.write_text("\n".join(rows) + "\n")
        info = await run_batch(adm, "crm", csv, "csv", lambda _: None, timeout=60)
        assert info.failed == 1
        page = await _text(console, "/batches")
        batch = re.search(rf'<tr data-batch="{info.batch_id}">(.*?)</tr>', page, re.S)
        assert batch is not None and info.status in batch.group(1)
        page = await _text(console, f"/batches?errors={info.batch_id}")
        rejected = page.split('id="rejected"', 1)[1]
        shown = await admin.request(
            adm, subjects.admin("ingest", "errors"), ErrorsQuery(info.batch_id), ErrorsResult
        )
        (why,) = shown.records
        assert "1 rejected records" in rejected
        assert why.path == "person.birth_date"
        assert why.reason in rejected and why.path in rejected
        assert "/destinations/console-hook/replay" not in await _text(console, "/destinations")
    finally:
        await adm.close()

    # With --admin (the admin key) a replay is made, with the form token only.
    seed, prefix = credentials(platform.data_dir, as_admin=True, env={})
    assert seed is not None and seed.name == "admin.nk"
    source = Source(platform.nats_url, seed, prefix, can_write=True)
    await source.start()
    try:
        async with Client(TestServer(make_app(source, None))) as operator:
            page = await _text(operator, "/destinations")
            token = re.search(r'name="form_token" value="([0-9a-f]+)"', page)
            resp = await operator.post("/destinations/console-hook/replay", data={})
            assert resp.status == 403
            form = {"form_token": operator.app[AUTH].form_token()}
            resp = await operator.post(
                "/destinations/console-hook/replay", data=form, allow_redirects=False
            )
            assert resp.status == 303, await resp.text()
            assert resp.headers["Location"] == "/destinations?replayed=0"
            assert token is None  # no dead letters: no replay form shown
    finally:
        await source.stop()


@pytest.mark.timeout(90)
async def test_the_console_key_may_read_but_not_change_anything(platform: Platform) -> None:
    """The server itself refuses the console's key a write request: no service sees it."""
    seed = platform.data_dir / "secrets" / f"{CONSOLE}.nk"
    refused: list[str] = []

    async def on_error(exc: Exception) -> None:
        refused.append(str(exc))

    nc = await nats.connect(
        platform.nats_url,
        nkeys_seed=str(seed),
        inbox_prefix=inbox_prefix(CONSOLE),
        error_cb=on_error,
        max_reconnect_attempts=0,
    )
    try:
        listed = await admin.request(
            nc, subjects.admin("segmentation", "list"), admin.ListRequest(), admin.SegmentList
        )
        assert "email-optin" in {s.name for s in listed.segments}
        spec = {"name": "sneaky", "expression": "email exists"}
        for subject, payload in (
            (subjects.admin("segmentation", "apply"), ApplyMany([ConfigObject("segment", spec)])),
            (subjects.admin("destination", "replay"), admin.DestinationQuery("x")),
            (subjects.admin("segmentation", "job.run"), admin.JobRun()),
        ):
            with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
                await admin.request(nc, subject, payload, dict[str, object], timeout=1.5)
        await eventually(lambda: _async(bool(refused)), timeout=5)
        assert any("permissions violation" in r.lower() for r in refused)
    finally:
        await nc.close()
    adm = await platform.connect("test-console-check")
    try:
        listed = await admin.request(
            adm, subjects.admin("segmentation", "list"), admin.ListRequest(), admin.SegmentList
        )
        assert "sneaky" not in {s.name for s in listed.segments}
    finally:
        await adm.close()


async def _async(value: bool) -> bool:
    return value


@pytest.mark.timeout(30)
async def test_off_loopback_every_page_needs_the_login_token(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No platform needed: the login stands before every page."""
    token = "console-test-token-9c2e"
    source = Source("nats://127.0.0.1:1", None, inbox_prefix(CONSOLE))  # never connected
    async with TestClient(TestServer(make_app(source, token))) as client:
        for path in ("/", "/audiences", "/profiles?identity=email:a@b.co", "/batches"):
            resp = await client.get(path, allow_redirects=False)
            assert resp.status == 303 and resp.headers["Location"] == "/login", path
        resp = await client.get("/audiences/live", allow_redirects=False)
        assert resp.status == 303
        resp = await client.post(
            "/audiences/estimate", data={"expression": "x"}, headers={"HX-Request": "true"}
        )
        assert resp.status == 401 and resp.headers["HX-Redirect"] == "/login"
        assert (await client.get("/login")).status == 200
        assert (await client.get("/static/htmx.min.js")).status == 200

        resp = await client.post("/login", data={"token": "wrong"}, allow_redirects=False)
        assert resp.status == 401 and "wrong token" in await resp.text()
        assert COOKIE not in resp.cookies
        assert (await client.get("/", allow_redirects=False)).status == 303

        resp = await client.post("/login", data={"token": token}, allow_redirects=False)
        assert resp.status == 303
        cookie = resp.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert token not in cookie
        page = await client.get("/", allow_redirects=False)
        assert page.status == 200
        assert "not answering" in await page.text()  # no platform behind it: said so
        configure_logging("info", "json")
        try:
            capsys.readouterr()
            page = await client.get("/profiles?identity=email:ada.private@example.com")
            assert page.status == 200
            logged = capsys.readouterr().err
        finally:
            configure_logging("warning", "json")
        assert "/profiles" in logged, "the request is logged"
        assert "ada.private" not in logged, "a raw email in the console's log"
        # A replay without the admin key is refused whatever the form says.
        resp = await client.post("/destinations/x/replay", data={"form_token": "forged"})
        assert resp.status == 403


# -- in a real browser ---------------------------------------------------------------------------
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
"""Where the browser test leaves its screenshots (kept out of git)."""


def _browser(user_data: Path) -> Any:
    """Headless Chromium driven through chromedriver, or a skip that says what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(
            f"no headless browser: {', '.join(missing)} missing (scripts/test installs Debian's "
            "chromium and chromium-driver where it runs as root with apt-get)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
        f"--user-data-dir={user_data}",
    ):
        options.add_argument(arg)
    service = webdriver.ChromeService(executable_path=str(CHROMEDRIVER))
    return webdriver.Chrome(options=options, service=service)


def _screenshot(driver: Any, name: str) -> None:
    """The whole page (the window made as tall as the page) as test-artifacts/<name>.png."""
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(1400, max(1000, min(height + 40, 6000)))
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))
    driver.set_window_size(1400, 1000)


async def _until(check: Callable[[], bool], timeout: float) -> None:
    """Wait until `check` (a blocking browser call, run in a thread) holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await asyncio.to_thread(check):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("the page did not change in time")
        await asyncio.sleep(0.2)


@pytest.mark.timeout(180)
async def test_in_a_browser_an_audience_fills_live_and_a_profile_shows_its_graph(
    platform: Platform, console: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Headless Chromium opens the audiences page; a customer who accepts email arrives
    on the stream and the email-optin row counts her without a reload; then her profile,
    looked up through the search form, shows her identity graph. Screenshots are left in
    test-artifacts/."""
    driver = await asyncio.to_thread(_browser, tmp_path / "chromium")
    ARTIFACTS.mkdir(exist_ok=True)
    by = pytest.importorskip("selenium.webdriver.common.by").By
    base = str(console.make_url("/")).rstrip("/")
    monkeypatch.setenv("CDP_SECRET_CONSOLE_TEST", "a-signing-secret")
    adm = await platform.connect("test-console-browser")
    try:
        hooks = [
            {
                "name": name,
                "type": "webhook",
                "segments": ["email-optin"],
                "connection": {"url": "http://127.0.0.1:9/cdp"},
                "secrets": {"signing_secret": "CDP_SECRET_CONSOLE_TEST"},
                **extra,
            }
            for name, extra in (("crm-webhook", {}), ("phone-webhook", {"identity": "phone"}))
        ]
        await admin.request(
            adm,
            subjects.admin("destination", "apply"),
            ApplyMany([ConfigObject("destination", h) for h in hooks]),
            ApplyManyResult,
        )
        await asyncio.to_thread(driver.get, f"{base}/audiences")
        row = 'tr[data-segment="email-optin"]'

        def cell(name: str) -> str:
            return str(driver.find_element(by.CSS_SELECTOR, f"{row} .{name}").text)

        assert await asyncio.to_thread(cell, "members") == "0"
        record = {
            "crm_id": "BROWSER1",
            "email": "grace.browser@example.com",
            "person": {"name": {"first": "Grace", "last": "Hopper"}},
            "consents": {"marketing": {"email": "y", "sms": "n", "any": "y"}},
        }
        await adm.jetstream().publish("cdp.ingest.crm", json.dumps(record).encode())
        await _until(lambda: cell("members") == "1" and cell("live-entered") == "1", 30)
        login = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "eventType": "app.login",
            "ecid": "browser-cookie",
            "email": "grace.browser@example.com",
            "device": {"type": "mobile", "os": "iOS"},
        }
        await adm.jetstream().publish("cdp.ingest.web", json.dumps(login).encode())
        await asyncio.to_thread(_screenshot, driver, "console-audiences")

        await asyncio.to_thread(driver.get, f"{base}/profiles")

        def search() -> None:
            box = driver.find_element(by.ID, "identity")
            box.send_keys("email:grace.browser@example.com")
            box.submit()

        await asyncio.to_thread(search)

        def graph_drawn() -> bool:
            found = driver.find_elements(by.CSS_SELECTOR, "#graph svg.graph")
            drawn = str(found[0].get_attribute("innerHTML")) if found else ""
            return "email:grace.browser@example.com" in drawn and "ecid:browser-cookie" in drawn

        async def reload_until_drawn() -> None:
            for _ in range(60):  # the login may land after the first look-up: look again
                if await asyncio.to_thread(graph_drawn):
                    return
                await asyncio.sleep(0.5)
                await asyncio.to_thread(driver.refresh)
            raise AssertionError("the profile's graph never showed the device")

        await reload_until_drawn()
        page = await asyncio.to_thread(lambda: str(driver.page_source))
        assert "BROWSER1" in page and "Grace" in page
        await asyncio.to_thread(_screenshot, driver, "console-profile")

        await asyncio.to_thread(driver.get, f"{base}/destinations")

        def left_out_shown() -> bool:
            driver.refresh()
            return "missing identity: 1" in str(driver.page_source)

        await _until(left_out_shown, 30)
        await asyncio.to_thread(_screenshot, driver, "console-destinations")
    finally:
        await asyncio.to_thread(driver.quit)
        await adm.close()
