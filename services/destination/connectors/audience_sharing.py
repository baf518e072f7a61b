"""Audience sharing: share segments (metadata and memberships) with an audience manager.

Settings: `url` (API base), `max_per_request`, `timeout`. Secrets: `api_key` (bearer token).
- `sync_segment` -> POST {url}/segments `{"id": <segment name>, "name", "description"}`; the
  call is idempotent (create or update) and the answer's `"id"` is the remote id (the segment
  name when the answer carries none). The connector remembers it for `send`.
- `send` -> POST {url}/segments/{remote id}/members
  `{"segment_id": <remote id>, "members": [{"profile_id", "status", "identities"}]}` with the
  latest activation of each profile. Before a successful sync (or after the manager answers
  404 for the segment) it raises a retryable DeliveryError "segment metadata not synced yet".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import quote

import aiohttp
import msgspec

from services.destination.connectors.base import HttpConnector, latest_per_profile
from services.destination.model import Activation, DeliveryError, SegmentMeta

NOT_SYNCED = "segment metadata not synced yet"


class AudienceSharingConnector(HttpConnector):
    kind: ClassVar[str] = "audience_sharing"
    token_secret: ClassVar[str | None] = "api_key"

    def __init__(self, settings: Mapping[str, Any], secrets: Mapping[str, str]) -> None:
        super().__init__(settings, secrets)
        self.remote_ids: dict[str, str] = {}
        """Segment name -> the audience manager's id, after a successful sync."""

    async def sync_segment(
        self, session: aiohttp.ClientSession, segment: SegmentMeta
    ) -> str | None:
        meta = {"id": segment.name, "name": segment.name, "description": segment.description}
        answer = await self.post(session, "/segments", meta)
        remote = segment.name
        try:
            doc = msgspec.json.decode(answer) if answer.strip() else None
        except msgspec.DecodeError:
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("id"), str) and doc["id"]:
            remote = doc["id"]
        self.remote_ids[segment.name] = remote
        return remote

    async def send(
        self, session: aiohttp.ClientSession, segment: SegmentMeta, items: Sequence[Activation]
    ) -> None:
        remote = self.remote_ids.get(segment.name)
        if remote is None:
            raise DeliveryError(f"{self.kind}: {NOT_SYNCED}", retryable=True)
        if not items:
            return
        members = [
            {"profile_id": a.profile_id, "status": a.status, "identities": a.identities}
            for a in latest_per_profile(items)
        ]
        path = "/segments/" + quote(remote, safe="") + "/members"
        try:
            await self.post(session, path, {"segment_id": remote, "members": members})
        except DeliveryError as e:
            if e.status != 404:
                raise
            self.remote_ids.pop(segment.name, None)
            raise DeliveryError(f"{self.kind}: {NOT_SYNCED}", retryable=True, status=404) from e
