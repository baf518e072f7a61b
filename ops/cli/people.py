"""`cdp identity`, `cdp profile`, `cdp delete`: one person, by any identity."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from ops.cli.client import ClientError
from shared import admin, subjects
from shared.messages import Identity, PrivacyDelete, PrivacyReport, privacy_report_decoder

PRIVACY_SERVICES: tuple[str, ...] = ("ingest", "identity", "profile", "segmentation", "destination")
"""The services that hold personal data and report a privacy delete (the scheduler holds none)."""


class IdentityQuery(msgspec.Struct):
    identity: str


class ProfileQuery(msgspec.Struct, omit_defaults=True):
    identity: str = ""
    merge_policy: str | None = None
    events: int = 20
    profile_id: str | None = None


def parse_identity(text: str) -> Identity:
    namespace, sep, value = text.partition(":")
    if not sep or not namespace or not value:
        raise ClientError(f"expected <namespace>:<value>, got {text!r}")
    return Identity(namespace, value)


async def _request(nc: Client, subject: str, payload: msgspec.Struct, who: str) -> Any:
    try:
        return await admin.request(nc, subject, payload, dict[str, Any])
    except nats.errors.NoRespondersError:
        raise ClientError(f"the {who} service is not running") from None
    except nats.errors.TimeoutError:
        raise ClientError(f"the {who} service did not answer in time") from None


async def identity_graph(nc: Client, identity: str) -> dict[str, Any]:
    parse_identity(identity)
    result: dict[str, Any] = await _request(
        nc, subjects.admin("identity", "lookup"), IdentityQuery(identity), "identity"
    )
    return result


async def profile(
    nc: Client,
    identity: str,
    merge_policy: str | None,
    events: int,
    *,
    profile_id: str | None = None,
) -> dict[str, Any]:
    """The unified profile holding `identity`, or the one `profile_id` names (a profile
    folded into another by a merge answers with that one)."""
    if profile_id is None:
        parse_identity(identity)
    query = ProfileQuery(identity, merge_policy, events, profile_id)
    result: dict[str, Any] = await _request(nc, subjects.PROFILE_LOOKUP, query, "profile")
    return result


async def delete(
    nc: Client, identity: str, on_report: Any = None, timeout: float = 60.0
) -> dict[str, PrivacyReport]:
    """Publish a privacy delete in-band and wait for every service's report."""
    ident = parse_identity(identity)
    request = PrivacyDelete(
        request_id=f"{int(time.time()):08x}-{secrets.token_hex(6)}",
        identity=ident,
        requested_at=time.time(),
    )
    reports: dict[str, PrivacyReport] = {}
    done = asyncio.Event()

    async def on_msg(msg: Msg) -> None:
        report = privacy_report_decoder.decode(msg.data)
        if report.service not in reports:
            reports[report.service] = report
            if on_report is not None:
                on_report(report)
        if all(s in reports for s in PRIVACY_SERVICES):
            done.set()

    js = nc.jetstream()
    sub = await js.subscribe(
        f"{subjects.PRIVACY_PREFIX}.{request.request_id}.*", cb=on_msg, ordered_consumer=True
    )
    try:
        await js.publish(subjects.PRIVACY_DELETE, msgspec.json.encode(request))
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except TimeoutError:
            missing = [s for s in PRIVACY_SERVICES if s not in reports]
            raise ClientError(
                f"delete {request.request_id} not reported by {', '.join(missing)} within "
                f"{timeout:.0f}s; it completes when they run again"
            ) from None
    finally:
        await sub.unsubscribe()
    return reports
