"""`cdp check`: the platform's invariants, checked across the services' state.

- every profile that the profile, segmentation and destination services hold (a profile
  row, a view, a membership) is a live profile of the identity graph;
- the profile service maps each identity to the profile its identity graph belongs to;
- every event sits on the profile that holds its anchor identity (or, if the graph size
  limit dropped that identity, on a live profile), in the profile service and in
  segmentation's copy alike, which holds every event the profile service holds.

It reads every identity, profile and event through the services' paged listings
(`cdp.admin.<service>.check.list`), so it takes time in proportion to the data: run it on
a quiet platform (it first waits until what was published has landed).
"""

from __future__ import annotations

import time
from collections import Counter

import msgspec
import nats.errors
from nats.aio.client import Client

from ops.cli.client import ClientError
from shared import admin, subjects
from shared.admin import GetRequest, GetResult, LandedRequest, LandedResult
from shared.listing import read_all

MAX_LISTED = 50


class CheckReport(msgspec.Struct, kw_only=True):
    counts: dict[str, int]
    violations: list[str]
    """The first violations found, each one sentence."""
    total: int
    """How many violations in all."""

    @property
    def ok(self) -> bool:
        return self.total == 0


async def wait_landed(nc: Client, timeout: float) -> LandedResult:
    """Ask the ingest service to follow a probe through every stage (see
    services/ingest/landing.py); returns whether everything published before has landed."""
    try:
        return await admin.request(
            nc,
            subjects.admin("ingest", "landed"),
            LandedRequest(timeout=timeout),
            LandedResult,
            timeout=timeout + 10.0,
        )
    except nats.errors.NoRespondersError:
        raise ClientError("the ingest service is not running") from None
    except nats.errors.TimeoutError:
        raise ClientError("the ingest service did not answer in time") from None


async def _expirations(nc: Client) -> dict[str, float]:
    got = await admin.request(
        nc, subjects.admin("ingest", "get"), GetRequest("dataset"), GetResult, timeout=10.0
    )
    out: dict[str, float] = {}
    for spec in got.items:
        days = spec.get("expiration_days")
        if days:
            out[str(spec["name"])] = float(days) * 86400.0
    return out


async def check(nc: Client, *, events: bool = True) -> CheckReport:
    found: list[str] = []
    tally: Counter[str] = Counter()

    def violation(kind: str, text: str) -> None:
        tally[kind] += 1
        if len(found) < MAX_LISTED:
            found.append(text)

    counts: dict[str, int] = {}
    nodes = {str(k): str(p) for k, p in await read_all(nc, "identity", "nodes")}
    live = set(nodes.values())
    counts["identities"] = len(nodes)
    counts["live profiles"] = len(live)
    for service, what in (
        ("profile", "profiles"),
        ("profile", "members"),
        ("segmentation", "profiles"),
        ("segmentation", "members"),
        ("destination", "profiles"),
        ("destination", "members"),
    ):
        rows = await read_all(nc, service, what)
        counts[f"{service} {what}"] = len(rows)
        for row in rows:
            pid = str(row[0])
            if pid not in live:
                extra = f" (member of {row[1]})" if what == "members" else ""
                violation(
                    "dead profile",
                    f"{service} holds profile {pid}{extra}, which is not a live profile of "
                    "the identity graph",
                )
    mirror = await read_all(nc, "profile", "identities")
    for key, pid in mirror:
        held = nodes.get(str(key))
        if held != pid:
            violation(
                "identity",
                f"profile maps {key} to {pid}, the identity graph to {held or 'no profile'}",
            )
    if events:
        placed: dict[str, str] = {}
        rows = await read_all(nc, "profile", "events")
        counts["profile events"] = len(rows)
        for rid, pid, anchor in rows:
            placed[str(rid)] = str(pid)
            if anchor:
                holder = nodes.get(str(anchor))
                if holder != pid:
                    violation(
                        "event",
                        f"event {rid} sits on {pid}, its identity {anchor} on "
                        f"{holder or 'no profile'}",
                    )
            elif pid not in live:
                violation("event", f"event {rid} sits on {pid}, which is not a live profile")
        expiry = await _expirations(nc)
        now = time.time()
        rows = await read_all(nc, "segmentation", "events")
        counts["segmentation events"] = len(rows)
        copies: dict[str, set[str]] = {}
        for rid, pid, _dataset, _ts in rows:
            copies.setdefault(str(rid), set()).add(str(pid))
        for rid, pid in placed.items():
            if pid not in copies.get(rid, ()):
                violation(
                    "event",
                    f"segmentation lacks event {rid} of {pid}, which the profile service holds",
                )
        for rid, pid, dataset, ts in rows:
            where = placed.get(str(rid))
            if where is None:
                ttl = expiry.get(str(dataset))
                if ttl is not None and float(ts) < now - ttl:
                    continue  # expired: the profile service dropped it first
                violation(
                    "event",
                    f"segmentation holds event {rid} on {pid}; the profile service has no such "
                    "event",
                )
            elif where != pid:
                violation(
                    "event",
                    f"segmentation holds event {rid} on {pid}, the profile service on {where}",
                )
    return CheckReport(counts=counts, violations=found, total=sum(tally.values()))
