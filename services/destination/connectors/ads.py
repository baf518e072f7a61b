"""Ad network customer match API: add and remove members of a customer list.

Settings: `url` (API base), `list_id` (required), `default_region` (the service's
`CDP_PHONE_REGION` unless set), `max_per_request`, `timeout`. Secrets: `api_key` (bearer token).
- realized/existing -> POST {url}/customer-lists/{list_id}:addMembers
- exited -> POST {url}/customer-lists/{list_id}:removeMembers
Body: `{"members": [{"hashedEmail": ..., "hashedPhoneNumber": ..., "mobileId": ...}]}`, one
member per email/phone/mobile id triple of a profile, a key left out when it has no value.
Emails and phones are normalised then SHA-256 (lower-case hex, no salt), `email_sha256` and
`phone_sha256` digests taken as they are; mobile ids (gaid, idfa) are sent raw. Activations
with none of these are not sent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import zip_longest
from typing import Any, ClassVar
from urllib.parse import quote

import aiohttp

from services.destination.connectors.base import (
    HttpConnector,
    phone_region,
    require,
    split_by_status,
)
from services.destination.connectors.identities import email_hashes, mobile_ids, phone_hashes
from services.destination.model import Activation, SegmentMeta

KEYS = ("hashedEmail", "hashedPhoneNumber", "mobileId")


class AdsConnector(HttpConnector):
    kind: ClassVar[str] = "ads"
    token_secret: ClassVar[str | None] = "api_key"

    def __init__(self, settings: Mapping[str, Any], secrets: Mapping[str, str]) -> None:
        super().__init__(settings, secrets)
        self.default_region = phone_region(settings, self.kind)
        self.list_path = "/customer-lists/" + quote(
            require(settings, "list_id", self.kind), safe=""
        )

    def members(self, a: Activation) -> list[dict[str, str]]:
        """The members of one activation."""
        triples = zip_longest(email_hashes(a), phone_hashes(a, self.default_region), mobile_ids(a))
        return [{k: v for k, v in zip(KEYS, t, strict=True) if v} for t in triples]

    def addressable(self, a: Activation) -> bool:
        return bool(self.members(a))

    async def send(
        self, session: aiohttp.ClientSession, segment: SegmentMeta, items: Sequence[Activation]
    ) -> None:
        adds, removals = split_by_status(items)
        for verb, group in ((":addMembers", adds), (":removeMembers", removals)):
            members = [m for a in group for m in self.members(a)]
            if members:
                await self.post(session, self.list_path + verb, {"members": members})
