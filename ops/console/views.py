"""The console's pages and fragments. Each handler asks the platform over NATS (admin
requests, the profile lookup) and renders a template; a service that does not answer is
shown as such on the page, never as a server error."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import aiohttp_jinja2
import structlog
from aiohttp import web

from ops.cli.people import IdentityQuery, ProfileQuery
from ops.console.auth import Auth
from ops.console.drawing import bars, graph_layout, when
from ops.console.source import Source
from shared import admin, subjects
from shared.admin import (
    DeadLetters,
    DestinationInfo,
    DestinationList,
    DestinationQuery,
    ErrorsResult,
    EstimateRequest,
    EstimateResult,
    GetRequest,
    GetResult,
    JobList,
    ListRequest,
    ReplayResult,
    SegmentList,
    ServiceStatus,
    StatusRequest,
)
from shared.config import SERVICES

log = structlog.get_logger(component="console")

SOURCE: web.AppKey[Source] = web.AppKey("source", Source)
AUTH: web.AppKey[Auth] = web.AppKey("auth", Auth)


class IngestRate:
    """Records per second the ingest service applied from `CDP_INGEST` (the streaming doors,
    NATS and HTTP), from its consumer's offset at two overview refreshes at least
    `MIN_SPAN` seconds apart."""

    MIN_SPAN = 1.0

    def __init__(self) -> None:
        self.last: tuple[float, int] | None = None
        self.rate: float | None = None

    def sample(self, at: float, offset: int) -> float | None:
        if self.last is None or offset < self.last[1]:  # first look, or the stream was reset
            self.last = (at, offset)
        elif at - self.last[0] >= self.MIN_SPAN:
            self.rate = (offset - self.last[1]) / (at - self.last[0])
            self.last = (at, offset)
        return self.rate


RATE: web.AppKey[IngestRate] = web.AppKey("ingest_rate", IngestRate)

_IDENTITY = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}:\S.{0,319}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
MAX_EXPRESSION = 4000
MAX_POLICIES = 5


def _source(request: web.Request) -> Source:
    return request.app[SOURCE]


def _common(request: web.Request, page: str) -> dict[str, Any]:
    auth = request.app[AUTH]
    return {
        "page": page,
        "login_required": auth.required,
        "can_write": _source(request).can_write,
        "form_token": auth.form_token(),
        "when": when,
    }


# -- overview ----------------------------------------------------------------------------
async def _overview(request: web.Request) -> dict[str, Any]:
    src = _source(request)

    async def status(name: str) -> tuple[str, ServiceStatus | None, str | None]:
        got, why = await src.ask_or_error(
            subjects.admin(name, "status"), StatusRequest(), ServiceStatus, timeout=3.0
        )
        return name, got, why

    statuses, (batches, batches_error), (seg_jobs, _), (export_jobs, _) = await asyncio.gather(
        asyncio.gather(*(status(n) for n in SERVICES)),
        src.gather_or_error(lambda nc: admin.ingest_batches(nc, 10, timeout=5.0), "batch.list"),
        src.ask_or_error(subjects.admin("segmentation", "jobs"), ListRequest(10), JobList),
        src.ask_or_error(subjects.admin("destination", "jobs"), ListRequest(10), JobList),
    )
    jobs = sorted(
        [*(seg_jobs.jobs if seg_jobs else []), *(export_jobs.jobs if export_jobs else [])],
        key=lambda j: -j.started_at,
    )[:10]
    hour_ago = time.time() - 3600
    recent = [b for b in (batches.batches if batches else []) if b.created_at >= hour_ago]
    doors = [
        c.offset
        for name, got, _ in statuses
        if name == "ingest" and got
        for c in got.consumers
        if c.stream == subjects.STREAM_INGEST.name
    ]
    rate = request.app[RATE].sample(time.monotonic(), doors[0]) if doors else None
    return {
        "ingest_rate": rate,
        "services": [
            {
                "name": name,
                "status": got,
                "error": why,
                "pending": sum(c.pending + c.ack_pending for c in got.consumers) if got else 0,
            }
            for name, got, why in statuses
        ],
        "batches": batches.batches if batches else [],
        "batches_error": batches_error,
        "jobs": jobs,
        "errors_last_hour": sum(b.failed for b in recent),
        "failed_batches_last_hour": sum(b.status == "failed" for b in recent),
        "failed_messages": sum(got.failed for _, got, _ in statuses if got),
    }


async def overview(request: web.Request) -> web.StreamResponse:
    context = {**_common(request, "overview"), **await _overview(request)}
    return aiohttp_jinja2.render_template("overview.html", request, context)


async def overview_fragment(request: web.Request) -> web.StreamResponse:
    context = {**_common(request, "overview"), **await _overview(request)}
    return aiohttp_jinja2.render_template("_overview.html", request, context)


# -- audiences ---------------------------------------------------------------------------
async def audiences(request: web.Request) -> web.StreamResponse:
    src = _source(request)
    found, error = await src.ask_or_error(
        subjects.admin("segmentation", "list"), ListRequest(), SegmentList
    )
    segments = [
        {"info": seg, "chart": bars(seg.entered_24h, seg.exited_24h)}
        for seg in (found.segments if found else [])
    ]
    context = {**_common(request, "audiences"), "segments": segments, "error": error}
    return aiohttp_jinja2.render_template("audiences.html", request, context)


async def estimate(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    expression = str(form.get("expression", "")).strip()
    context: dict[str, Any] = {"expression": expression, "result": None, "error": None}
    if not expression:
        context["error"] = "type an expression"
    elif len(expression) > MAX_EXPRESSION:
        context["error"] = f"an expression is at most {MAX_EXPRESSION} characters"
    else:
        result, error = await _source(request).ask_or_error(
            subjects.admin("segmentation", "estimate"),
            EstimateRequest(expression),
            EstimateResult,
            timeout=15.0,
        )
        context.update(result=result, error=error)
    return aiohttp_jinja2.render_template("_estimate.html", request, context)


async def audiences_live(request: web.Request) -> web.StreamResponse:
    """Server-sent events: one `membership` event per membership change, with the
    segment's counts since the console started."""
    feed = _source(request).feed
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    queue = feed.listen()
    try:
        await response.write(b"retry: 2000\n: connected\n\n")
        while True:
            try:
                data = await asyncio.wait_for(queue.get(), timeout=15.0)
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            if data is None:
                break
            await response.write(f"event: membership\ndata: {data}\n\n".encode())
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        feed.forget(queue)
    return response


# -- profiles ----------------------------------------------------------------------------
async def profiles(request: web.Request) -> web.StreamResponse:
    identity = request.query.get("identity", "").strip()
    context: dict[str, Any] = {
        **_common(request, "profiles"),
        "identity": identity,
        "view": None,
        "error": None,
        "graph": None,
        "graph_raw": None,
        "graph_error": None,
        "by_policy": [],
        "flat": _flatten,
    }
    if identity:
        if not _IDENTITY.match(identity):
            context["error"] = "expected <namespace>:<value>, e.g. email:ada@example.com"
        else:
            context.update(await _profile(request, identity))
    return aiohttp_jinja2.render_template("profiles.html", request, context)


async def _profile(request: web.Request, identity: str) -> dict[str, Any]:
    src = _source(request)
    (view, error), (graph, graph_error), (policies, _) = await asyncio.gather(
        src.ask_or_error(subjects.PROFILE_LOOKUP, ProfileQuery(identity), dict[str, Any]),
        src.ask_or_error(
            subjects.admin("identity", "lookup"), IdentityQuery(identity), dict[str, Any]
        ),
        src.ask_or_error(subjects.admin("profile", "get"), GetRequest("merge_policy"), GetResult),
    )
    by_policy: list[dict[str, Any]] = []
    if view is not None and policies is not None:
        names = [str(p.get("name")) for p in policies.items if p.get("name")][:MAX_POLICIES]
        others = [n for n in names if n != view.get("merge_policy")]
        looked = await asyncio.gather(
            *(
                src.ask_or_error(
                    subjects.PROFILE_LOOKUP, ProfileQuery(identity, merge_policy=n, events=0), dict
                )
                for n in others
            )
        )
        by_policy = [
            {"name": n, "attributes": v.get("attributes", {}) if v else {}, "error": e}
            for n, (v, e) in zip(others, looked, strict=True)
        ]
    return {
        "view": view,
        "error": error,
        "graph": graph_layout(graph) if graph else None,
        "graph_raw": graph,
        "graph_error": graph_error,
        "by_policy": by_policy,
        "flat": _flatten,
    }


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested attributes as (dotted path, leaf) rows."""
    if isinstance(value, dict) and value:
        out: list[tuple[str, Any]] = []
        for key in sorted(value, key=str):
            out += _flatten(value[key], f"{prefix}.{key}" if prefix else str(key))
        return out
    return [(prefix or "(value)", value)]


# -- destinations ------------------------------------------------------------------------
async def destinations(request: web.Request) -> web.StreamResponse:
    src = _source(request)
    found, error = await src.ask_or_error(
        subjects.admin("destination", "list"), ListRequest(), DestinationList
    )
    listed = found.destinations if found else []

    async def dead_letters(d: DestinationInfo) -> tuple[DeadLetters | None, str | None]:
        if not d.dead_letters:
            return None, None
        return await src.ask_or_error(
            subjects.admin("destination", "dlq"), DestinationQuery(d.name, 20), DeadLetters
        )

    letters = await asyncio.gather(*(dead_letters(d) for d in listed))
    rows = [
        {"info": d, "dlq": dlq.items if dlq else [], "dlq_error": dlq_error}
        for d, (dlq, dlq_error) in zip(listed, letters, strict=True)
    ]
    context = {
        **_common(request, "destinations"),
        "destinations": rows,
        "error": error,
        "flash": request.query.get("replayed"),
    }
    return aiohttp_jinja2.render_template("destinations.html", request, context)


async def replay(request: web.Request) -> web.StreamResponse:
    src = _source(request)
    if not src.can_write:
        raise web.HTTPForbidden(text="replay needs the admin key: start the console with --admin")
    form = await request.post()
    if not request.app[AUTH].form_ok(str(form.get("form_token", ""))):
        raise web.HTTPForbidden(text="missing or wrong form token; reload the page")
    name = request.match_info["name"]
    if not _NAME.match(name):
        raise web.HTTPBadRequest(text="not a destination name")
    result, error = await src.ask_or_error(
        subjects.admin("destination", "replay"), DestinationQuery(name), ReplayResult
    )
    if error is not None or result is None:
        raise web.HTTPBadGateway(text=f"replay failed: {error}")
    log.info("dead letters replayed", destination=name, requeued=result.requeued)
    raise web.HTTPSeeOther(f"/destinations?replayed={result.requeued}")


# -- batches -----------------------------------------------------------------------------
async def batches(request: web.Request) -> web.StreamResponse:
    src = _source(request)
    found, error = await src.gather_or_error(
        lambda nc: admin.ingest_batches(nc, 50, timeout=5.0), "batch.list"
    )
    target = request.query.get("errors", "").strip()
    rejected: ErrorsResult | None = None
    rejected_error = None
    if target:
        if not _NAME.match(target):
            rejected_error = "not a batch id or dataset name"
        else:
            rejected, rejected_error = await src.gather_or_error(
                lambda nc: admin.ingest_errors(nc, target, 100, timeout=5.0), "errors"
            )
    context = {
        **_common(request, "batches"),
        "batches": found.batches if found else [],
        "error": error,
        "target": target,
        "rejected": rejected,
        "rejected_error": rejected_error,
    }
    return aiohttp_jinja2.render_template("batches.html", request, context)
