"""`cdp status`: every instance of every service, gathered over one request each.

Each instance answers `cdp.admin.<service>.status` (a queue group of its own), so one
request per service reaches all of them; the CLI collects the replies until the instances
the registry (`cdp-instances`) lists as live have answered, or a short time has passed."""

from __future__ import annotations

import asyncio

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError
from rich.table import Table

from shared import admin, subjects
from shared.admin import AdminFailure, ServiceStatus, StatusRequest
from shared.config import SERVICES

GATHER_TIMEOUT = 3.0
"""Seconds `cdp status` waits for a service's instances at most."""

GATHER_QUIET = 0.75
"""For a service whose instances do not register (the registry lists none): seconds
without a further reply after which its instances are taken to have all answered."""


class ServiceInstances(msgspec.Struct, kw_only=True):
    """What one service's instances answered."""

    service: str
    live: list[str] = []
    """The instances the registry lists as live (partitioned services register)."""
    replies: list[ServiceStatus] = []
    errors: list[str] = []


async def live_instances(js: JetStreamContext) -> dict[str, list[str]]:
    """The live instances of each service that registers (`<service>.<instance>` keys of
    the `cdp-instances` bucket that hold a value); none when the bucket is missing."""
    bucket = subjects.INSTANCES_BUCKET
    root = f"$KV.{bucket}."
    try:
        kv = await js.key_value(bucket)
        info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"{root}>")
    except (NotFoundError, nats.errors.Error, TimeoutError):
        return {}
    out: dict[str, list[str]] = {}
    for subject in info.state.subjects or {}:
        key = subject[len(root) :]
        service, _, instance = key.partition(".")
        try:
            await kv.get(key)
        except NotFoundError:  # left (a delete marker), or expired since
            continue
        out.setdefault(service, []).append(instance)
    return {s: sorted(ids) for s, ids in out.items()}


async def gather_status(
    nc: Client, services: tuple[str, ...] = SERVICES, timeout: float = GATHER_TIMEOUT
) -> list[ServiceInstances]:
    """Every service's instances' status, the services asked at once."""
    live = await live_instances(nc.jetstream())

    async def one(name: str) -> ServiceInstances:
        found = ServiceInstances(service=name, live=live.get(name, []))
        try:
            got = await admin.gather_each(
                nc,
                subjects.admin(name, "status"),
                StatusRequest(),
                ServiceStatus,
                expect=len(found.live),
                timeout=timeout,
                quiet=GATHER_QUIET,
            )
        except nats.errors.Error as exc:
            found.errors.append(f"{type(exc).__name__}: {exc}")
            return found
        for reply in got:
            if isinstance(reply, AdminFailure):
                found.errors.append(str(reply))
            else:
                found.replies.append(reply)
        found.replies.sort(key=lambda r: r.instance or r.service)
        return found

    return list(await asyncio.gather(*(one(n) for n in services)))


def as_json(found: list[ServiceInstances]) -> list[dict[str, object]]:
    """One object per instance that answered (as `cdp.admin.<service>.status` has it), and
    one `{"service", "ready": false, "reason": "not running"}` per service none answered."""
    out: list[dict[str, object]] = []
    for s in found:
        if not s.replies:
            reason = "; ".join(s.errors) or "not running"
            out.append({"service": s.service, "ready": False, "reason": reason})
        for reply in s.replies:
            item = msgspec.to_builtins(reply)
            assert isinstance(item, dict)
            out.append(item)
    return out


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def services_table(found: list[ServiceInstances]) -> Table:
    """One row per consumer of each instance: its role, readiness and backlog."""
    table = Table()
    for col in (
        "service",
        "instance",
        "role",
        "ready",
        "consumer",
        "stream",
        "pending",
        "in flight",
        "applied up to",
    ):
        table.add_column(col)
    for s in found:
        if not s.replies:
            why = "; ".join(s.errors)
            table.add_row(s.service, "", "", f"[red]not running[/] {why}", "", "", "", "", "")
            continue
        for n, r in enumerate(s.replies):
            ready = "[green]yes[/]" if r.ready else f"[red]no[/] {r.reason or ''}"
            extra = []
            if r.outbox:
                extra.append(f"outbox {r.outbox}")
            if r.failed:
                extra.append(f"{r.failed} failed")
            name = (s.service if n == 0 else "") + (f" ({', '.join(extra)})" if extra else "")
            head = (name, r.instance or s.service, r.role or "-", ready)
            if not r.consumers:
                table.add_row(*head, "", "", "", "", "")
            for i, c in enumerate(r.consumers):
                table.add_row(
                    *(head if i == 0 else ("", "", "", "")),
                    c.name,
                    c.stream,
                    str(c.pending),
                    str(c.ack_pending),
                    str(c.offset) if c.error is None else f"[red]{c.error}[/]",
                )
    return table


def partitions_table(s: ServiceInstances) -> Table | None:
    """A partitioned service's partitions: owner, applied sequence, lag, last snapshot."""
    rows = sorted(
        (p for r in s.replies for p in r.partitions), key=lambda p: (p.partition, p.owner)
    )
    if not rows:
        return None
    table = Table(title=f"{s.service} partitions")
    for col in ("partition", "owner", "token", "applied seq", "lag", "snapshot seq", "snapshot"):
        table.add_column(col)
    for p in rows:
        table.add_row(
            str(p.partition),
            p.owner,
            str(p.token),
            str(p.applied_seq) if p.error is None else f"[red]{p.error}[/]",
            str(p.pending),
            "-" if p.snapshot_seq is None else str(p.snapshot_seq),
            _age(p.snapshot_age_s),
        )
    return table
