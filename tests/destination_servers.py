"""Fake destination providers: real aiohttp servers on 127.0.0.1 that record what they get.

Each server listens on a free port (`await server.start()`, `server.url`, `await
server.stop()`, or `async with`), records every request (`received`: method, path, headers,
raw body, parsed JSON, the status answered) and keeps the state a provider would (list
members, audience rows, shared segments), so tests can check both the wire and the outcome.

Failures on demand: `fail_next(503, times=2)`, `fail_next(429, retry_after="7")`,
`fail_next(400)` answer the next requests with that status (queued in order);
`delay_next(seconds)` holds the next answers back (to provoke client timeouts). A server
built with `token=` answers 401 to requests without `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import msgspec
from aiohttp import web
from multidict import CIMultiDict

HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass
class Received:
    """One request as the server saw it."""

    method: str
    path: str
    headers: CIMultiDict[str]
    body: bytes
    json: Any
    """The parsed JSON body (None when the body is empty or not JSON)."""
    status: int = 0
    """The status the server answered."""


@dataclass
class _Failure:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: str = ""


class Reject(Exception):
    """Raised by a handler to answer an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class FakeProvider:
    """A recording HTTP server; subclasses implement `handle` (default: 200 {"ok": true})."""

    def __init__(self, *, token: str | None = None) -> None:
        self.token = token
        self.received: list[Received] = []
        self._failures: list[_Failure] = []
        self._delays: list[float] = []
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._changed = asyncio.Event()

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self._runner is None:
            raise RuntimeError("server not started")
        return f"http://127.0.0.1:{self._port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._port = int(sock.getsockname()[1])
        await web.SockSite(runner, sock).start()
        self._runner = runner

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- steering ------------------------------------------------------------------------
    def fail_next(
        self,
        status: int,
        times: int = 1,
        *,
        retry_after: str | None = None,
        headers: Mapping[str, str] | None = None,
        body: str = "",
    ) -> None:
        """Answer the next `times` requests with `status` (after any failures already queued)."""
        hdrs = dict(headers or {})
        if retry_after is not None:
            hdrs["Retry-After"] = retry_after
        self._failures.extend(
            _Failure(status, hdrs, body or f"forced {status}") for _ in range(times)
        )

    def delay_next(self, seconds: float, times: int = 1) -> None:
        """Hold the next `times` answers back for `seconds`."""
        self._delays.extend([seconds] * times)

    def clear(self) -> None:
        """Forget recorded requests and queued failures (provider state is kept)."""
        self.received.clear()
        self._failures.clear()
        self._delays.clear()

    # -- inspection ----------------------------------------------------------------------
    @property
    def accepted(self) -> list[Received]:
        """The requests answered with 2xx."""
        return [r for r in self.received if 200 <= r.status <= 299]

    def bodies(self, path: str | None = None) -> list[Any]:
        """Parsed bodies of accepted requests (to `path` when given)."""
        return [r.json for r in self.accepted if path is None or r.path == path]

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Wait until at least `count` requests were accepted; the accepted requests."""
        deadline = time.monotonic() + timeout
        while len(self.accepted) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"{type(self).__name__}: {len(self.accepted)} of {count} requests accepted"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return self.accepted

    # -- serving -------------------------------------------------------------------------
    async def handle(self, req: Received) -> tuple[int, Any]:
        """(status, JSON answer) of an accepted-so-far request; may raise Reject."""
        return 200, {"ok": True}

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            doc = msgspec.json.decode(body) if body else None
        except msgspec.DecodeError:
            doc = None
        rec = Received(request.method, request.path, CIMultiDict(request.headers), body, doc)
        self.received.append(rec)
        try:
            if self._delays:
                await asyncio.sleep(self._delays.pop(0))
            response = await self._answer(rec)
            rec.status = response.status
        finally:
            self._changed.set()
        return response

    async def _answer(self, rec: Received) -> web.Response:
        if self._failures:
            f = self._failures.pop(0)
            return web.Response(status=f.status, headers=f.headers, text=f.body)
        if self.token is not None and rec.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"error": "unauthorized"}, status=401)
        try:
            status, answer = await self.handle(rec)
        except Reject as e:
            return web.json_response({"error": e.message}, status=e.status)
        return web.json_response(answer, status=status)


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise Reject(400, message)


def _route(pattern: str, rec: Received) -> re.Match[str] | None:
    return re.fullmatch(pattern, rec.path) if rec.method == "POST" else None


class WebhookServer(FakeProvider):
    """Takes signed webhook batches at any path; with `signing_secret`, answers 401 to a
    request whose X-CDP-Signature does not match the body."""

    def __init__(self, *, signing_secret: str | None = None, token: str | None = None) -> None:
        super().__init__(token=token)
        self.signing_secret = signing_secret

    @property
    def activations(self) -> list[dict[str, Any]]:
        """Every activation accepted, in order."""
        return [a for body in self.bodies() for a in body["activations"]]

    async def handle(self, req: Received) -> tuple[int, Any]:
        if self.signing_secret is not None:
            mac = hmac.new(self.signing_secret.encode(), req.body, hashlib.sha256).hexdigest()
            got = req.headers.get("X-CDP-Signature", "")
            if not hmac.compare_digest(got, f"sha256={mac}"):
                raise Reject(401, "bad signature")
        _require(isinstance(req.json, dict), "JSON object expected")
        _require(isinstance(req.json.get("activations"), list), "activations expected")
        return 200, {"ok": True}


class _ListServer(FakeProvider):
    """A list API keyed by one identity (email or phone)."""

    collection = ""
    key = ""
    remove_key = ""

    def __init__(self, *, token: str | None = None) -> None:
        super().__init__(token=token)
        self.lists: dict[str, dict[str, dict[str, Any]]] = {}
        """list id -> identity -> fields."""

    def members(self, list_id: str) -> set[str]:
        return set(self.lists.get(list_id, {}))

    async def handle(self, req: Received) -> tuple[int, Any]:
        m = _route(rf"/lists/([^/]+)/{self.collection}(:remove)?", req)
        if m is None:
            raise Reject(404, "no such endpoint")
        entries = self.lists.setdefault(m.group(1), {})
        doc = req.json
        _require(isinstance(doc, dict), "JSON object expected")
        if m.group(2):
            values = doc.get(self.remove_key)
            _require(isinstance(values, list) and bool(values), f"{self.remove_key} expected")
            for v in values:
                entries.pop(v, None)
            return 200, {"removed": len(values)}
        items = doc.get(self.collection)
        _require(isinstance(items, list) and bool(items), f"{self.collection} expected")
        for item in items:
            _require(isinstance(item, dict) and isinstance(item.get(self.key), str), "bad item")
            entries[item[self.key]] = dict(item.get("fields") or {})
        return 200, {"added": len(items)}


class EmailListServer(_ListServer):
    """Email provider: /lists/{id}/members and /lists/{id}/members:remove."""

    collection = "members"
    key = "email"
    remove_key = "emails"


class SmsListServer(_ListServer):
    """SMS provider: /lists/{id}/subscribers and /lists/{id}/subscribers:remove."""

    collection = "subscribers"
    key = "phone"
    remove_key = "phones"


def _hashed(value: Any) -> bool:
    return isinstance(value, str) and (value == "" or HEX64.fullmatch(value) is not None)


class SocialAudienceServer(FakeProvider):
    """Custom audiences: /audiences/{id}/users and /audiences/{id}/users:remove; answers 400
    to anything but lower-case SHA-256 hex (or "") in the data rows."""

    SCHEMA = ["EMAIL_SHA256", "PHONE_SHA256"]

    def __init__(self, *, token: str | None = None) -> None:
        super().__init__(token=token)
        self.audiences: dict[str, set[tuple[str, str]]] = {}

    async def handle(self, req: Received) -> tuple[int, Any]:
        m = _route(r"/audiences/([^/]+)/users(:remove)?", req)
        if m is None:
            raise Reject(404, "no such endpoint")
        doc = req.json
        _require(isinstance(doc, dict) and doc.get("schema") == self.SCHEMA, "bad schema")
        rows = doc.get("data")
        _require(isinstance(rows, list) and bool(rows), "data expected")
        for row in rows:
            _require(isinstance(row, list) and len(row) == 2, "bad row")
            _require(all(_hashed(v) for v in row) and any(row), "values must be SHA-256")
        users = self.audiences.setdefault(m.group(1), set())
        keys = {(r[0], r[1]) for r in rows}
        if m.group(2):
            users.difference_update(keys)
        else:
            users.update(keys)
        return 200, {"num_received": len(rows)}


class AdsCustomerListServer(FakeProvider):
    """Customer match: /customer-lists/{id}:addMembers and :removeMembers; members are kept
    as (hashedEmail, hashedPhoneNumber, mobileId) with "" for a missing key."""

    KEYS = ("hashedEmail", "hashedPhoneNumber", "mobileId")

    def __init__(self, *, token: str | None = None) -> None:
        super().__init__(token=token)
        self.lists: dict[str, set[tuple[str, str, str]]] = {}

    async def handle(self, req: Received) -> tuple[int, Any]:
        m = _route(r"/customer-lists/([^/:]+):(addMembers|removeMembers)", req)
        if m is None:
            raise Reject(404, "no such endpoint")
        doc = req.json
        _require(isinstance(doc, dict), "JSON object expected")
        items = doc.get("members")
        _require(isinstance(items, list) and bool(items), "members expected")
        keys: set[tuple[str, str, str]] = set()
        for item in items:
            _require(isinstance(item, dict) and bool(item), "bad member")
            _require(set(item) <= set(self.KEYS), "unknown member field")
            _require(_hashed(item.get("hashedEmail", "")), "hashedEmail must be SHA-256")
            _require(
                _hashed(item.get("hashedPhoneNumber", "")), "hashedPhoneNumber must be SHA-256"
            )
            e, p, d = (str(item.get(k, "")) for k in self.KEYS)
            keys.add((e, p, d))
        members = self.lists.setdefault(m.group(1), set())
        if m.group(2) == "addMembers":
            members.update(keys)
        else:
            members.difference_update(keys)
        return 200, {"received": len(items)}


class AudienceManagerServer(FakeProvider):
    """An audience manager: POST /segments creates or updates a segment (same "id", same
    remote id "am-<id>"), POST /segments/{remote id}/members records memberships (404 for
    a segment it does not know)."""

    def __init__(self, *, token: str | None = None) -> None:
        super().__init__(token=token)
        self.segments: dict[str, dict[str, Any]] = {}
        """remote id -> metadata as last received."""
        self.members: dict[str, dict[str, str]] = {}
        """remote id -> profile id -> status."""

    def forget(self, remote_id: str) -> None:
        """Drop a segment as if it were deleted on the manager's side."""
        self.segments.pop(remote_id, None)
        self.members.pop(remote_id, None)

    async def handle(self, req: Received) -> tuple[int, Any]:
        doc = req.json
        if _route(r"/segments", req):
            _require(isinstance(doc, dict) and isinstance(doc.get("id"), str), "id expected")
            remote = f"am-{doc['id']}"
            created = remote not in self.segments
            self.segments[remote] = dict(doc)
            self.members.setdefault(remote, {})
            return (201 if created else 200), {"id": remote}
        m = _route(r"/segments/([^/]+)/members", req)
        if m is None:
            raise Reject(404, "no such endpoint")
        remote = m.group(1)
        if remote not in self.segments:
            raise Reject(404, "unknown segment")
        _require(isinstance(doc, dict) and doc.get("segment_id") == remote, "segment_id")
        items = doc.get("members")
        _require(isinstance(items, list) and bool(items), "members expected")
        for item in items:
            _require(isinstance(item, dict) and isinstance(item.get("profile_id"), str), "bad")
            self.members[remote][item["profile_id"]] = str(item.get("status"))
        return 200, {"received": len(items)}
