"""`cdp up`: the embedded default. Brings the platform up (ops.platform: nats-server unless
CDP_NATS_URL names one; with --cluster 3, three nodes routed to each other on loopback),
the streams (kept by CDP_REPLICAS nodes, or the cluster's size up to 3), the six
services under the supervisor) and the web
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
from ops.natsd import NatsServerError, Placement, stream_placement
from ops.platform import Platform, PlatformError, PortsTaken, parse_instances
from ops.security import ADMIN, CLIENT, cli_credentials
from shared.config import SERVICES, ConfigError, load_settings
from shared.config import replicas as replicas_setting
from shared.subjects import ALL_STREAMS, inbox_prefix


def placement_table(placements: list[Placement]) -> Table:
    """Which node leads each stream, and how current the other copies are."""
    table = Table(title="streams on the cluster")
    table.add_column("stream")
    table.add_column("leader")
    table.add_column("last seq")
    table.add_column("other copies")
    for p in placements:
        copies = ", ".join(
            f"{r.name} "
            + (
                "[red]offline[/]"
                if r.offline
                else "current"
                if r.current and not r.lag
                else f"[yellow]{r.lag} behind[/]"
            )
            for r in p.replicas
        )
        table.add_row(p.stream, p.leader, str(p.last_seq), copies or "-")
    return table


async def run_up(
    data_dir: Path,
    nats_port: int,
    console: Console,
    *,
    cluster: int = 1,
    cluster_port: int = 6222,
    instances: str = "",
) -> int:
    started = time.monotonic()
    external = os.environ.get("CDP_NATS_URL")
    if external and cluster > 1:
        console.print("[red]--cluster starts its own nodes: unset CDP_NATS_URL[/]")
        return 1
    try:
        given = os.environ.get("CDP_REPLICAS")
        copies = replicas_setting() if given or external else min(cluster, 3)
        counts = parse_instances(instances)
        platform = Platform(
            data_dir,
            nats_url=external or None,
            nats_port=nats_port,
            cluster=cluster,
            route_port=cluster_port,
            replicas=copies,
            instances=counts,
            setup_seed=cli_credentials() if external else None,
            secure=True,
            ports={name: load_settings(name).port for name in SERVICES},
            watch_nats=lambda what: console.print(f"[yellow]nats-server[/] {what}", soft_wrap=True),
            on_event=lambda name, what: (
                None if what == "started" else console.print(f"[yellow]{name}[/] {what}")
            ),
        )
    except (ConfigError, PlatformError) as exc:
        console.print(f"[red]cannot start: {exc}[/]", soft_wrap=True)
        return 1
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


async def _print_placement(platform: Platform, console: Console) -> None:
    try:
        nc = await platform.connect("cdp-up")
    except (nats.errors.Error, OSError):
        return
    try:
        placements = await stream_placement(nc.jetstream(), [s.name for s in ALL_STREAMS])
    except (nats.errors.Error, TimeoutError):
        return
    finally:
        await nc.close()
    console.print(placement_table(placements))


async def _serve(
    platform: Platform,
    started: float,
    stop: asyncio.Event,
    console: Console,
    web: WebConsole | None,
) -> int:
    """Print where things are, wait until ready (or Ctrl-C), then until Ctrl-C; stop."""
    if platform.cluster is not None:
        console.print(
            f"{len(platform.cluster.nodes)} nats-server nodes (cluster "
            f"{platform.cluster.name}) with JetStream, each stream kept by "
            f"{platform.replicas}; data in {platform.cluster.store_dir}",
            soft_wrap=True,
        )
        for node in platform.cluster.nodes:
            console.print(f"  {node.server_name} on [bold]{node.url}[/]", soft_wrap=True)
        console.print(f"clients give every node: CDP_NATS_URL={platform.nats_url}", soft_wrap=True)
    if platform.embedded:
        if platform.cluster is None:
            console.print(
                f"nats-server with JetStream on [bold]{platform.nats_url}[/] (data in "
                f"{platform.data_dir / 'nats'})"
            )
        console.print(
            f"credentials in {platform.secrets}: {CLIENT}.nk "
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
            table.add_column("instance")
            table.add_column("health")
            table.add_column("state")
            for instance, (ok, why) in states.items():
                name = platform.service_of[instance]
                table.add_row(
                    name if instance == platform.instances[name][0] else "",
                    instance,
                    f"{platform.urls[instance]}/readyz",
                    "[green]ready[/]" if ok else f"[red]{why}[/]",
                )
            console.print(table)
            if platform.cluster is not None:
                await _print_placement(platform, console)
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
