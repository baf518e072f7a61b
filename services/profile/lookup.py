"""Profile lookups by any identity: NATS request/reply on `cdp.profile.lookup` (JSON) and
HTTP GET /v1/profiles?identity=<namespace>:<value> on the profile service."""

from __future__ import annotations

import hmac
import time
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from services.profile.merge import AttributeValue, default_policy, merge
from shared import subjects
from shared.admin import AdminError, AdminFailure, AdminReply, answerable
from shared.db import write_lock
from shared.messages import ExperienceEvent, Identity
from shared.normalize import Unusable

if TYPE_CHECKING:
    from services.profile.service import ProfileService

_value_decoder = msgspec.msgpack.Decoder()
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
    def __init__(self, service: ProfileService) -> None:
        self.svc = service
        self._sub: Subscription | None = None
        service.health.app.router.add_get("/v1/profiles", self.http_get)

    async def start(self) -> None:
        self._sub = await self.svc.nc.subscribe(
            subjects.PROFILE_LOOKUP, queue="profile-lookup", cb=self._on_request
        )

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception as exc:
                self.svc.log.debug("unsubscribe failed", error=repr(exc))

    async def _on_request(self, msg: Msg) -> None:
        if not answerable(msg, self.svc.log):
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
        token = self.svc.settings.profile_token
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
        """One consistent view: the reads hold the write lock, so no batch commits between
        them (attributes, identities and events always belong to the same moment)."""
        async with write_lock(self.svc.db):
            return await self._lookup(request)

    async def _by_profile_id(self, profile_id: str) -> str:
        """The live profile a profile id names now: itself, or the one it was folded into."""
        db = self.svc.db
        pid = profile_id
        for _ in range(64):
            rows = list(
                await db.execute_fetchall(
                    "SELECT folded_into FROM profiles WHERE profile_id = ?", (pid,)
                )
            )
            if not rows:
                raise AdminFailure("not_found", f"no profile {profile_id!r}", field="profile_id")
            into = rows[0][0]
            if into is None:
                return pid
            pid = str(into)
        raise AdminFailure("not_found", f"no live profile for {profile_id!r}", field="profile_id")

    async def _lookup(self, request: ProfileLookup) -> ProfileView:
        if request.profile_id is not None:
            pid = await self._by_profile_id(request.profile_id)
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
        value = self.svc.namespaces.normalized(namespace, raw)
        if isinstance(value, Unusable):
            raise AdminFailure(
                "not_found",
                f"{identity} is not a usable identity value ({value.reason})",
            )
        db = self.svc.db
        rows = await db.execute_fetchall(
            "SELECT profile_id FROM identities WHERE namespace = ? AND value = ?",
            (namespace, value),
        )
        found = [str(r[0]) for r in rows]
        if not found:
            raise AdminFailure("not_found", f"no profile holds {namespace}:{raw}")
        return found[0]

    async def _view(self, pid: str, request: ProfileLookup) -> ProfileView:
        db = self.svc.db
        policies = self.svc.policies
        if request.merge_policy is not None:
            policy = policies.get(request.merge_policy)
            if policy is None:
                raise AdminFailure(
                    "not_found",
                    f"no merge policy named {request.merge_policy!r}",
                    kind="merge_policy",
                    name=request.merge_policy,
                )
        else:
            policy = default_policy(policies.items())
        attrs = [
            AttributeValue(ds, path, _value_decoder.decode(v), ts, rid)
            for ds, path, v, ts, rid in await db.execute_fetchall(
                "SELECT dataset, path, value, ts, record_id FROM attributes WHERE profile_id = ?",
                (pid,),
            )
        ]
        identities = [
            Identity(str(ns), str(v))
            for ns, v in await db.execute_fetchall(
                "SELECT namespace, value FROM identities WHERE profile_id = ? "
                "ORDER BY namespace, value",
                (pid,),
            )
        ]
        limit = max(0, min(request.events, 5000))
        events = [
            ExperienceEvent(
                record_id=rid,
                dataset=ds,
                event_type=et,
                timestamp=ts,
                payload=_value_decoder.decode(payload),
            )
            for rid, ds, et, ts, payload in await db.execute_fetchall(
                "SELECT record_id, dataset, event_type, ts, payload FROM events WHERE "
                "profile_id = ? ORDER BY ts DESC, record_id DESC LIMIT ?",
                (pid, limit),
            )
            if not self._expired(ds, ts)
        ]
        memberships = [
            Membership(str(seg), str(status), float(at))
            for seg, status, at in await db.execute_fetchall(
                "SELECT segment, status, at FROM memberships WHERE profile_id = ? ORDER BY segment",
                (pid,),
            )
        ]
        return ProfileView(pid, policy.name, merge(attrs, policy), identities, events, memberships)

    def _expired(self, dataset: str, ts: float) -> bool:
        ds = self.svc.datasets.get(dataset)
        return bool(ds and ds.expiration_days and ts < time.time() - ds.expiration_days * 86400.0)
