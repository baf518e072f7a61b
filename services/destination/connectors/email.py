"""Email provider list API: add and remove list members by email address.

Settings: `url` (API base), `list_id` (required), `max_per_request`, `timeout`.
Secrets: `api_key` (bearer token).
- realized/existing -> POST {url}/lists/{list_id}/members
  `{"members": [{"email": <first email>, "fields": {mapped attributes}}]}`
- exited -> POST {url}/lists/{list_id}/members:remove `{"emails": [every email of the profile]}`
Only the latest activation of each profile in a batch counts; activations without an email
are not sent (`addressable` is False for them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import quote

import aiohttp

from services.destination.connectors.base import HttpConnector, require, split_by_status
from services.destination.connectors.identities import emails
from services.destination.model import Activation, SegmentMeta


class EmailConnector(HttpConnector):
    kind: ClassVar[str] = "email"
    token_secret: ClassVar[str | None] = "api_key"

    def __init__(self, settings: Mapping[str, Any], secrets: Mapping[str, str]) -> None:
        super().__init__(settings, secrets)
        self.list_path = "/lists/" + quote(require(settings, "list_id", self.kind), safe="")

    def addressable(self, a: Activation) -> bool:
        return bool(emails(a))

    async def send(
        self, session: aiohttp.ClientSession, segment: SegmentMeta, items: Sequence[Activation]
    ) -> None:
        adds, removals = split_by_status([a for a in items if self.addressable(a)])
        if adds:
            members = [{"email": emails(a)[0], "fields": a.attributes} for a in adds]
            await self.post(session, self.list_path + "/members", {"members": members})
        if removals:
            gone = list(dict.fromkeys(e for a in removals for e in emails(a)))
            await self.post(session, self.list_path + "/members:remove", {"emails": gone})
