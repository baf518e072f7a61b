"""The `cdp` command."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import aiohttp
import typer
from rich.console import Console
from rich.table import Table

from shared.cli.up import health_urls, readiness, run_up
from shared.log import configure_logging

app = typer.Typer(help="An open-source real-time Customer Data Platform.", no_args_is_help=True)
console = Console()


@app.command()
def up(
    data_dir: Annotated[
        Path, typer.Option("--data-dir", help="Where SQLite files, JetStream data and logs live.")
    ] = Path("var"),
    nats_port: Annotated[int, typer.Option(help="Port of the embedded nats-server.")] = 4222,
) -> None:
    """Start nats-server (unless CDP_NATS_URL is set) and the six services; Ctrl-C stops all."""
    configure_logging("warning", "console")
    raise typer.Exit(asyncio.run(run_up(data_dir, nats_port, console)))


@app.command()
def health() -> None:
    """Show every service's readiness."""

    async def probe() -> dict[str, tuple[bool, str]]:
        urls = health_urls()
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(*(readiness(session, u) for u in urls.values()))
        return dict(zip(urls, results, strict=True))

    urls = health_urls()
    states = asyncio.run(probe())
    table = Table()
    table.add_column("service")
    table.add_column("endpoint")
    table.add_column("ready")
    for name, (ok, why) in states.items():
        table.add_row(name, f"{urls[name]}/readyz", "[green]yes[/]" if ok else f"[red]no: {why}[/]")
    console.print(table)
    raise typer.Exit(0 if all(ok for ok, _ in states.values()) else 1)


def main() -> None:
    app()
