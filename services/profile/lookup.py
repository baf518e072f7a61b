"""Profile lookups by any identity: NATS request/reply on `cdp.profile.lookup` (JSON) and
HTTP GET /v1/profiles?identity=<namespace>:<value> on the profile service. The wiring
subscribes `on_request` and routes `http_get`, and gives the lookups a store over a
read-only connection of their own (`shared.db.open_reader`): a lookup never waits behind
a write batch, and reads one snapshot."""

from __future__ import annotations

import hmac
from typing import Any

import msgspec
import structlog
from aiohttp import web
from nats.aio.msg import Msg

from services.profile.config import ProfileConfig
from services.profile.merge import merge
from services.profile.store import ProfileStore
from shared.admin import AdminError, AdminFailure, AdminReply, answerable
from shared.db import snapshot
from shared.messages import ExperienceEvent, Identity
from shared.normalize import Unusable

MAX_EVENTS = 5000
"""Most events a lookup returns (a profile keeps no more)."""
_encoder = msgspec.json.Encoder()


class ProfileLookup(msgspec.Struct):
    identity: str = ""
    """`<namespace>:<value>`"""
    merge_policy: str | None = None
    events: int = 20
    """How many of the most recent events to include."""
    profile_id: str | None = None
    """Look up by profile id instead of an identity. A profile folded into another by a
    merge answers with the profile it was folded into."""


class Membership(msgspec.Struct):
    segment: str
    status: str
    at: float


class ProfileView(msgspec.Struct):
    profile_id: str
    merge_policy: str
    attributes: dict[str, Any]
    identities: list[Identity]
    events: list[ExperienceEvent]
    memberships: list[Membership]


_lookup_decoder = msgspec.json.Decoder(ProfileLookup)


class ProfileLookups:
    """Answers lookups from the store, under the configuration the service follows."""

    def __init__(
        self,
        store: ProfileStore,
        config: ProfileConfig,
        token: str | None,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.token = token
        """`CDP_PROFILE_TOKEN`: HTTP lookups need it; None: no one is served over HTTP."""
        self.log = log or structlog.get_logger(service="profile")

    async def on_request(self, msg: Msg) -> None:
        if not answerable(msg, self.log):
            return
        try:
            view = await self.lookup(_lookup_decoder.decode(msg.data))
            reply = AdminReply(ok=True, result=view)
        except msgspec.DecodeError as exc:
            reply = AdminReply(ok=False, error=AdminError("malformed", f"malformed request: {exc}"))
        except AdminFailure as exc:
            reply = AdminReply(ok=False, error=exc.to_error())
        await msg.respond(_encoder.encode(reply))

    def _refusal(self, request: web.Request) -> web.Response | None:
        """Personal data needs `Authorization: Bearer <CDP_PROFILE_TOKEN>` (compared in
        constant time); with no token configured nobody is served."""
        token = self.token
        if token is None:
            message = "profile lookups over HTTP are disabled: set CDP_PROFILE_TOKEN"
        else:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(
                given.strip().encode(), token.encode()
            ):
                return None
            message = "this endpoint needs `Authorization: Bearer <CDP_PROFILE_TOKEN>`"
        response = web.json_response(
            {"error": {"code": "unauthorized", "message": message}}, status=401
        )
        response.headers["WWW-Authenticate"] = 'Bearer realm="cdp-profile"'
        return response

    async def http_get(self, request: web.Request) -> web.Response:
        refused = self._refusal(request)
        if refused is not None:
            return refused
        identity = request.query.get("identity", "")
        try:
            events = int(request.query.get("events", "20"))
            view = await self.lookup(
                ProfileLookup(
                    identity,
                    request.query.get("merge_policy"),
                    events,
                    profile_id=request.query.get("profile_id"),
                )
            )
        except ValueError:
            return web.json_response(
                {"error": {"code": "invalid", "message": "events must be an integer"}}, status=400
            )
        except AdminFailure as exc:
            status = 404 if exc.code == "not_found" else 400
            return web.json_response({"error": msgspec.to_builtins(exc.to_error())}, status=status)
        return web.Response(body=_encoder.encode(view), content_type="application/json")

    async def lookup(self, request: ProfileLookup) -> ProfileView:
        """One consistent view: every read of a lookup runs in one read transaction on the
        store's (read-only) connection, so attributes, identities, events and memberships
        belong to the same committed moment, whatever commits meanwhile; and no write
        batch, open or committing, holds a lookup up (WAL)."""
        async with snapshot(self.store.db):
            if request.profile_id is not None:
                pid = await self.store.survivor(request.profile_id)
                if pid is None:
                    raise AdminFailure(
                        "not_found", f"no profile {request.profile_id!r}", field="profile_id"
                    )
            elif not request.identity:
                raise AdminFailure(
                    "invalid",
                    "a lookup names an identity (<namespace>:<value>) or a profile_id",
                    field="identity",
                )
            else:
                pid = await self._by_identity(request.identity)
            return await self._view(pid, request)

    async def _by_identity(self, identity: str) -> str:
        namespace, sep, raw = identity.partition(":")
        if not sep or not namespace or not raw:
            raise AdminFailure(
                "invalid",
                f"expected <namespace>:<value>, got {identity!r}",
                field="identity",
            )
        value = self.config.normalized(namespace, raw)
        if isinstance(value, Unusable):
            raise AdminFailure(
                "not_found",
                f"{identity} is not a usable identity value ({value.reason})",
            )
        pid = await self.store.holder(namespace, value)
        if pid is None:
            raise AdminFailure("not_found", f"no profile holds {namespace}:{raw}")
        return pid

    async def _view(self, pid: str, request: ProfileLookup) -> ProfileView:
        if request.merge_policy is not None:
            policy = self.config.policies.get(request.merge_policy)
            if policy is None:
                raise AdminFailure(
                    "not_found",
                    f"no merge policy named {request.merge_policy!r}",
                    kind="merge_policy",
                    name=request.merge_policy,
                )
        else:
            policy = self.config.default_policy()
        store = self.store
        attributes = merge(await store.attributes(pid), policy)
        limit = max(0, min(request.events, MAX_EVENTS))
        events = [
            e
            for e in await store.recent_events(pid, limit)
            if not self.config.expired(e.dataset, e.timestamp)
        ]
        memberships = [
            Membership(m.segment, m.status, float(m.at)) for m in await store.memberships(pid)
        ]
        return ProfileView(
            pid, policy.name, attributes, await store.identities(pid), events, memberships
        )
