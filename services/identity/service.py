"""The identity service's wiring: its store, its steps, its admin API and its consumers.

The actor's steps are in `handlers` (the graph rules they call in `graph`), the admin API
in `api`, the SQLite state in `store`, and what a start without a graph does in `rebuild`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, ClassVar

from services.identity import rebuild
from services.identity.api import IdentityApi
from services.identity.handlers import NAMESPACES_CONSUMER, RECORDS_CONSUMER, IdentityHandlers
from services.identity.store import LISTINGS, MIGRATIONS, IdentityStore
from shared import subjects
from shared.config import ConfigError
from shared.runtime import ConsumerSpec, Service


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, raw, "a positive integer") from None
    if value < 2:
        raise ConfigError(name, raw, "an integer of at least 2")
    return value


class IdentityService(Service):
    name = "identity"
    migrations = MIGRATIONS
    listings: ClassVar[dict[str, str]] = LISTINGS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_identities = _env_int("CDP_IDENTITY_MAX_GRAPH_SIZE", 50)
        self._handlers: IdentityHandlers | None = None
        self._api: IdentityApi | None = None

    @property
    def handlers(self) -> IdentityHandlers:
        if self._handlers is None:
            raise RuntimeError("identity: not started")
        return self._handlers

    def consumers(self) -> Sequence[ConsumerSpec]:
        handlers = self.handlers
        return (
            ConsumerSpec(
                NAMESPACES_CONSUMER,
                subjects.STREAM_CONFIG,
                handlers.on_namespaces,
                filter_subjects=(subjects.config("namespace", "*"),),
                description="identity namespaces (linking rules), from ingest's configuration",
            ),
            ConsumerSpec(
                RECORDS_CONSUMER,
                subjects.STREAM_RECORDS,
                handlers.on_records,
                description="accepted records and privacy deletes, from ingest",
            ),
        )

    async def on_start(self) -> None:
        store = IdentityStore(self.db)
        quiet = await rebuild.announced_until(self.js, store, str(self.settings.db_path))
        if quiet:
            self.log.warning(
                "no identity graph: rebuilding it from the records stream; the records up to "
                "this sequence are not announced again (the profile service has them)",
                records_seq=quiet,
            )
        handlers = IdentityHandlers(
            store,
            partitions=self.settings.partitions,
            max_identities=self.max_identities,
            phone_region=self.settings.phone_region,
            announced_until=quiet,
        )
        handlers.install(await store.namespaces())
        self._handlers = handlers
        self._api = IdentityApi(store, lambda: handlers.graph)
        await self._api.start(self.nc)

    async def on_stop(self) -> None:
        if self._api is not None:
            await self._api.stop()
