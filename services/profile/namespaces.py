"""The identity namespaces the profile service follows, so that a lookup reads an identity
exactly as the identity service linked it (a custom hashed namespace, phones in the region
of `CDP_PHONE_REGION`).

The namespaces come from ingest's configuration (`cdp.config.namespace.<symbol>` on
CDP_CONFIG, consumer `profile-namespaces`) and are kept in the `namespaces` table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from services.profile.store import UPSERT_NAMESPACE
from shared import subjects
from shared.normalize import Unusable, normalized
from shared.resources import BUILTIN_NAMESPACES, Namespace
from shared.runtime import ConsumerSpec, Step

if TYPE_CHECKING:
    from services.profile.service import ProfileService

_namespace_decoder = msgspec.json.Decoder(Namespace)


class ProfileNamespaces:
    def __init__(self, service: ProfileService) -> None:
        self.svc = service
        self.namespaces: dict[str, Namespace] = {n.symbol: n for n in BUILTIN_NAMESPACES}

    def consumer(self) -> ConsumerSpec:
        return ConsumerSpec(
            "profile-namespaces",
            subjects.STREAM_CONFIG,
            self.handle,
            filter_subjects=(subjects.config("namespace", "*"),),
            description="identity namespaces (how lookups read an identity), from ingest",
        )

    async def load(self) -> None:
        for _symbol, spec in await self.svc.db.execute_fetchall(
            "SELECT symbol, spec FROM namespaces"
        ):
            ns = _namespace_decoder.decode(spec)
            self.namespaces[ns.symbol] = ns

    async def handle(self, batch: Step) -> None:
        updates: dict[str, Namespace] = {}
        for d in batch.deliveries:
            try:
                ns = _namespace_decoder.decode(d.data)
            except msgspec.DecodeError:
                self.svc.log.warning("undecodable namespace configuration", subject=d.subject)
                continue
            updates[ns.symbol] = ns
            batch.tx.add(UPSERT_NAMESPACE, (ns.symbol, d.data))
        batch.after_commit(lambda: self.namespaces.update(updates))

    def normalized(self, symbol: str, value: str) -> str | Unusable:
        """`symbol:value` as the identity service links it, or why it cannot be used."""
        return normalized(
            self.namespaces.get(symbol), symbol, value, self.svc.settings.phone_region
        )
