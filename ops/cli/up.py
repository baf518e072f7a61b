"""`cdp up`: the embedded default. Starts nats-server (unless CDP_NATS_URL names one),
creates the streams, runs the six services under the supervisor, waits for every
/readyz, prints the endpoints, and stops everything cleanly on Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import os
import secrets as token_source
import signal
import sys
import time
from pathlib import Path

import aiohttp
import nats
from rich.console import Console
from rich.table import Table

from ops.cli.supervisor import ProcessSpec, Supervisor
from ops.natsd import NatsServer, NatsServerError, NatsWatchdog, free_port, port_taken
from ops.security import (
    ADMIN,
    CLIENT,
    activation_subjects,
    app_names,
    cli_credentials,
    ensure_credentials,
    seed_path,
    server_authorization,
)
from shared.config import SERVICES, load_settings
from shared.streams import ensure_streams
from shared.subjects import inbox_prefix

PROFILE_TOKEN_FILE = "profile.token"


def profile_token(secrets: Path) -> tuple[str, Path | None]:
    """The bearer token of `GET /v1/profiles`: CDP_PROFILE_TOKEN when given, else the one in
    `<secrets>/profile.token`, written (0600) at first start."""
    given = os.environ.get("CDP_PROFILE_TOKEN")
    if given:
        return given, None
    path = secrets / PROFILE_TOKEN_FILE
    if not path.exists():
        secrets.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token_source.token_urlsafe(32) + "\n")
    return path.read_text().strip(), path


def probe_host(bind: str) -> str:
    return "127.0.0.1" if bind in ("0.0.0.0", "::", "") else bind


def health_urls(env: dict[str, str] | None = None) -> dict[str, str]:
    urls = {}
    for name in SERVICES:
        s = load_settings(name, env)
        urls[name] = f"http://{probe_host(s.bind)}:{s.port}"
    return urls


async def readiness(
    session: aiohttp.ClientSession, base: str, timeout: float = 2.0
) -> tuple[bool, str]:
    try:
        async with session.get(
            f"{base}/readyz", timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            body = await resp.json(content_type=None)
            if resp.status == 200:
                return True, "ready"
            return False, str(body.get("reason", resp.status))
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        return False, f"unreachable ({type(exc).__name__})"


async def wait_ready(urls: dict[str, str], timeout: float) -> dict[str, tuple[bool, str]]:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            states = dict(
                zip(
                    urls,
                    await asyncio.gather(*(readiness(session, u) for u in urls.values())),
                    strict=True,
                )
            )
            if all(ok for ok, _ in states.values()) or time.monotonic() > deadline:
                return states
            await asyncio.sleep(0.1)


def ports_taken(nats_port: int | None, env: dict[str, str] | None = None) -> list[str]:
    """What `cdp up` would listen on that another process holds: its NATS port (None:
    an external server) and every service's HTTP port."""
    wanted: list[tuple[str, int, str]] = []
    if nats_port is not None:
        wanted.append(("127.0.0.1", nats_port, "NATS"))
    for name in SERVICES:
        settings = load_settings(name, env)
        if settings.port:
            wanted.append((probe_host(settings.bind), settings.port, f"the {name} service"))
    return [
        f"port {port} on {host} ({what})" for host, port, what in wanted if port_taken(host, port)
    ]


async def run_up(data_dir: Path, nats_port: int, console: Console) -> int:
    data_dir = data_dir.resolve()  # noqa: ASYNC240 - start-up only
    data_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    env: dict[str, str] = {"CDP_DATA_DIR": str(data_dir)}
    server: NatsServer | None = None
    secrets = data_dir / "secrets"
    external = os.environ.get("CDP_NATS_URL")
    taken = ports_taken(None if external else nats_port)
    if taken:
        for what in taken:
            console.print(
                f"[red]cannot start: {what} is in use by another process[/]", soft_wrap=True
            )
        console.print("stop that process, or choose other ports (--nats-port, CDP_<SERVICE>_PORT)")
        return 1
    watchdog: NatsWatchdog | None = None
    if external:
        nats_url = external
        console.print(f"using NATS at [bold]{nats_url}[/]")
    else:
        keys = ensure_credentials(secrets, app_names())
        server = NatsServer(
            data_dir / "nats",
            port=nats_port,
            log_file=data_dir / "logs" / "nats.log",
            authorization=server_authorization(keys, activation_subjects()),
            monitor_port=free_port(),
        )
        (data_dir / "logs").mkdir(parents=True, exist_ok=True)
        try:
            await server.start()
        except NatsServerError as exc:
            console.print(f"[red]cannot start nats-server: {exc}[/]", soft_wrap=True)
            return 1
        watchdog = NatsWatchdog(
            server, lambda what: console.print(f"[yellow]nats-server[/] {what}", soft_wrap=True)
        )
        watchdog.start()
        nats_url = server.url
        console.print(
            f"nats-server with JetStream on [bold]{nats_url}[/] (data in {data_dir / 'nats'}); "
            f"credentials in {secrets}: {CLIENT}.nk for applications (inbox_prefix "
            f"{inbox_prefix(CLIENT)}), {ADMIN}.nk for operators"
        )
    env["CDP_NATS_URL"] = nats_url

    # The embedded server: the admin key it was just given; else the caller's credentials.
    seed: Path | None
    if server is not None:
        seed, prefix = seed_path(secrets, ADMIN), inbox_prefix(ADMIN)
    else:
        seed, prefix = cli_credentials()
    nc = await nats.connect(
        nats_url, connect_timeout=5, inbox_prefix=prefix, nkeys_seed=str(seed) if seed else None
    )
    try:
        await ensure_streams(nc.jetstream())
    finally:
        await nc.close()

    token, token_file = profile_token(secrets)
    if token_file is not None:
        console.print(f"profile lookups over HTTP need the bearer token in {token_file}")

    def service_env(name: str) -> dict[str, str]:
        out = {**env, "CDP_LOG_FORMAT": os.environ.get("CDP_LOG_FORMAT", "json")}
        if name == "profile":
            out["CDP_PROFILE_TOKEN"] = token
        if server is not None:  # the embedded server: each service has its own key
            out["CDP_NATS_NKEY"] = str(seed_path(secrets, name))
        return out

    specs = [
        ProcessSpec(
            name,
            [sys.executable, "-m", f"services.{name}"],
            env=service_env(name),
            log_file=data_dir / "logs" / f"{name}.log",
        )
        for name in SERVICES
    ]

    def on_event(name: str, what: str) -> None:
        if what != "started":
            console.print(f"[yellow]{name}[/] {what}")

    sup = Supervisor(specs, on_event=on_event)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    code = 0
    try:
        await sup.start()
        urls = health_urls({**os.environ, **env})
        waiting = asyncio.create_task(wait_ready(urls, timeout=60))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({waiting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if waiting.done():
            states = waiting.result()
            table = Table(title=f"CDP up in {time.monotonic() - started:.1f}s")
            table.add_column("service")
            table.add_column("health")
            table.add_column("state")
            for name, (ok, why) in states.items():
                table.add_row(
                    name, f"{urls[name]}/readyz", "[green]ready[/]" if ok else f"[red]{why}[/]"
                )
            console.print(table)
            console.print(f"logs in {data_dir / 'logs'}; press Ctrl-C to stop", soft_wrap=True)
        else:
            waiting.cancel()
        await stopped
    finally:
        console.print("stopping…")
        codes = await sup.stop()
        bad = {n: c for n, c in codes.items() if c not in (0, None)}
        if bad:
            console.print(f"[red]services exited with errors: {bad}[/]")
            code = 1
        if watchdog is not None:
            await watchdog.stop()
        if server is not None:
            await server.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    console.print("stopped")
    return code
