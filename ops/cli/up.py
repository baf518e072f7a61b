"""`cdp up`: the embedded default. Brings the platform up (ops.platform: nats-server unless
CDP_NATS_URL names one, the streams, the six services under the supervisor) and the web
console (read-only, in this process), waits for every /readyz, prints the endpoints, and
stops everything cleanly on Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import nats.errors
from rich.console import Console
from rich.table import Table

from ops.console.app import Console as WebConsole
from ops.natsd import NatsServerError
from ops.platform import Platform, PortsTaken
from ops.security import ADMIN, CLIENT, cli_credentials
from shared.config import SERVICES, load_settings
from shared.subjects import inbox_prefix


async def run_up(data_dir: Path, nats_port: int, console: Console) -> int:
    started = time.monotonic()
    external = os.environ.get("CDP_NATS_URL")
    platform = Platform(
        data_dir,
        nats_url=external or None,
        nats_port=nats_port,
        setup_seed=cli_credentials() if external else None,
        secure=True,
        ports={name: load_settings(name).port for name in SERVICES},
        watch_nats=lambda what: console.print(f"[yellow]nats-server[/] {what}", soft_wrap=True),
        on_event=lambda name, what: (
            None if what == "started" else console.print(f"[yellow]{name}[/] {what}")
        ),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        try:
            await platform.start(wait=False)
        except PortsTaken as exc:
            for what in exc.taken:
                console.print(
                    f"[red]cannot start: {what} is in use by another process[/]", soft_wrap=True
                )
            console.print(
                "stop that process, or choose other ports (--nats-port, CDP_<SERVICE>_PORT)"
            )
            return 1
        except NatsServerError as exc:
            console.print(f"[red]cannot start nats-server: {exc}[/]", soft_wrap=True)
            return 1
        web = await _start_console(platform, console)
        return await _serve(platform, started, stop, console, web)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _start_console(platform: Platform, console: Console) -> WebConsole | None:
    """The web console, read-only, in this process; a console that cannot listen (its
    port taken) is said and left out: the platform runs without it."""
    try:
        web = WebConsole(platform.nats_url, platform.data_dir)
        await web.start()
    except (OSError, ValueError, nats.errors.Error) as exc:
        console.print(f"[yellow]web console not started: {exc}[/]", soft_wrap=True)
        return None
    console.print(f"web console on [bold]{web.url}[/]", soft_wrap=True)
    if web.token_file is not None:
        console.print(f"log in to it with the token in {web.token_file}", soft_wrap=True)
    return web


async def _serve(
    platform: Platform,
    started: float,
    stop: asyncio.Event,
    console: Console,
    web: WebConsole | None,
) -> int:
    """Print where things are, wait until ready (or Ctrl-C), then until Ctrl-C; stop."""
    if platform.embedded:
        console.print(
            f"nats-server with JetStream on [bold]{platform.nats_url}[/] (data in "
            f"{platform.data_dir / 'nats'}); credentials in {platform.secrets}: {CLIENT}.nk "
            f"for applications (inbox_prefix {inbox_prefix(CLIENT)}), {ADMIN}.nk for operators"
        )
    else:
        console.print(f"using NATS at [bold]{platform.nats_url}[/]")
    if platform.token_file is not None:
        console.print(f"profile lookups over HTTP need the bearer token in {platform.token_file}")
    code = 0
    try:
        waiting = asyncio.create_task(platform.wait_ready(timeout=60))
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
                    name,
                    f"{platform.urls[name]}/readyz",
                    "[green]ready[/]" if ok else f"[red]{why}[/]",
                )
            console.print(table)
            console.print(f"logs in {platform.logs}; press Ctrl-C to stop", soft_wrap=True)
        else:
            waiting.cancel()
        await stopped
    finally:
        console.print("stopping…")
        try:
            if web is not None:  # before nats-server goes: its connection drains while it can
                await web.stop()
        finally:
            codes = await platform.stop()
        bad = {n: c for n, c in codes.items() if c not in (0, None)}
        if bad:
            console.print(f"[red]services exited with errors: {bad}[/]")
            code = 1
    console.print("stopped")
    return code
