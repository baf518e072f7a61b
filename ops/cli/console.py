"""`cdp console`: serve the web console until Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import nats.errors
from rich.console import Console as Terminal

from ops.cli.client import nats_url
from ops.console.app import Console


async def serve(
    url: str | None,
    data_dir: Path,
    *,
    as_admin: bool,
    bind: str | None,
    port: int | None,
    terminal: Terminal,
) -> int:
    console = Console(nats_url(url), data_dir, as_admin=as_admin, bind=bind, port=port)
    try:
        await console.start()
    except (OSError, nats.errors.Error) as exc:
        terminal.print(
            f"[red]cannot start the console: {type(exc).__name__}: {exc}[/]; is the platform "
            "up (`cdp up`), are --nats-url and --data-dir right?",
            soft_wrap=True,
        )
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        terminal.print(f"web console on [bold]{console.url}[/]", soft_wrap=True)
        if console.token_file is not None:
            terminal.print(f"log in with the token in {console.token_file}", soft_wrap=True)
        elif console.login_required:
            terminal.print("log in with the token of CDP_CONSOLE_TOKEN")
        if not as_admin:
            terminal.print("read-only: start it with --admin to replay dead letters")
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await console.stop()
    return 0


def data_dir_default() -> Path:
    return Path(os.environ.get("CDP_DATA_DIR") or "var")
