"""The ingest service's wiring: builds its store, state, step, doors, admin API and jobs,
and starts and stops them. No rule lives here.

- `handlers.Records`: the step over `cdp.ingest.<dataset>` (validate, forward, keep
  rejects, privacy deletes, probes), its rules in `rules`;
- `http.HttpDoor`: POST /v1/datasets/<dataset>/records, published to the ingest stream;
- `api.IngestApi`: the admin request/reply (configuration via `catalog.Catalog`, batches,
  errors, landed);
- `batches.BatchJobs`: batch files, published to identity directly;
- `retention.Retention`: the error store's age and size limits;
- `store.Store`: every read and write of the service's SQLite.

With `CDP_INSTANCE` set (or `CDP_INGEST_SHARED=1`) the process is one of several
instances that share the ingest stream as competing consumers (`settings.Scaling`).
"""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web
from prometheus_client import Counter

from services.ingest import http
from services.ingest.api import IngestApi
from services.ingest.batches import BatchJobs
from services.ingest.catalog import Catalog
from services.ingest.handlers import Records
from services.ingest.retention import Retention, key_old_rows
from services.ingest.settings import Scaling, load_limits, load_scaling
from services.ingest.state import IngestState, id_prefix
from services.ingest.store import MIGRATIONS, Store
from services.ingest.validation import Limits
from shared import subjects
from shared.config import Settings
from shared.runtime import ConsumerSpec, Service
from shared.runtime.actor import Outgoing, publish_outbox

SOLE_CONSUMER = "ingest"
SHARED_CONSUMER = "ingest-shared"
"""The durable consumer the instances share (competing consumers, explicit acks)."""


class IngestService(Service):
    name = "ingest"
    migrations = MIGRATIONS

    def __init__(
        self, settings: Settings, limits: Limits | None = None, scaling: Scaling | None = None
    ) -> None:
        super().__init__(settings)
        self.scaling = scaling or load_scaling()
        self.state = IngestState(limits or load_limits(), settings.phone_region)
        self._dropped = Counter(
            "cdp_errors_dropped_total",
            "Rejected records the error store dropped by retention (age or size).",
            registry=self.metrics.registry,
        )
        self._records: Records | None = None
        self._door: http.HttpDoor | None = None
        self._retention: Retention | None = None
        self._api: IngestApi | None = None
        self._batches: BatchJobs | None = None
        # Routes are fixed before the HTTP server starts; the door is built at start.
        self.health.app._client_max_size = http.MAX_BODY_BYTES
        self.health.app.router.add_post(http.ROUTE, self._post_records)

    async def _post_records(self, request: web.Request) -> web.Response:
        door = self._door
        return http.not_ready() if door is None else await door.post_records(request)

    async def _publish(self, out: list[Outgoing]) -> bool:
        return await publish_outbox(self.js, self.db, out, self.log, lambda: False)

    async def on_start(self) -> None:
        s = self.settings
        store = Store(self.db)
        catalog = Catalog(store, self.state, self._publish)
        shared = self.scaling.shared
        if shared:
            await catalog.catch_up(self.js)
            await self._start_shared_after_own_offset()
        await catalog.load()
        info = await self.js.stream_info(subjects.STREAM_INGEST.name)
        self.state.id_prefix = id_prefix(info.created)
        await store.prepare()
        await key_old_rows(store)
        retention = Retention(
            store,
            max_age_days=s.errors_max_age_days,
            max_bytes=s.errors_max_bytes,
            on_dropped=self._dropped.inc,
        )
        batches = BatchJobs(
            store=store,
            state=self.state,
            retention=retention,
            nc=self.nc,
            js=self.js,
            work_dir=s.data_dir / "batches",
        )
        api = IngestApi(
            self.nc, store, catalog, batches, instance=self.scaling.instance, shared=shared
        )
        self._records = Records(
            self.state,
            retention,
            shared=shared,
            forget_elsewhere=api.forget_elsewhere if shared else None,
        )
        self._door = http.HttpDoor(
            state=self.state,
            store=store,
            js=self.js,
            health=http.Health(
                ready=lambda: self.ready,
                connected=lambda: self.nats_connected,
                publish_failed=self.publish_failed,
                publish_succeeded=self.publish_succeeded,
            ),
            token=s.ingest_token,
        )
        self._retention, self._batches = retention, batches
        self._api = api
        await retention.start()
        await self._api.start()
        await batches.start()

    async def _start_shared_after_own_offset(self) -> None:
        """An instance that ran alone before: the shared consumer, if it creates it,
        starts after what it applied alone."""
        await self.db.execute(
            "INSERT OR IGNORE INTO rt_offsets (consumer, stream_seq) "
            "SELECT ?, stream_seq FROM rt_offsets WHERE consumer = ?",
            (SHARED_CONSUMER, SOLE_CONSUMER),
        )
        await self.db.commit()

    async def on_stop(self) -> None:
        if self._retention is not None:
            await self._retention.stop()
        if self._batches is not None:
            await self._batches.stop()
        if self._api is not None:
            await self._api.stop()

    def consumers(self) -> Sequence[ConsumerSpec]:
        assert self._records is not None, "consumers are built at start"
        if self.scaling.shared:
            return (
                ConsumerSpec(
                    SHARED_CONSUMER,
                    subjects.STREAM_INGEST,
                    self._records,
                    description="records on cdp.ingest.<dataset>, shared by the ingest instances",
                    competing=True,
                    barriers=(subjects.PROBE, subjects.PRIVACY_DELETE),
                ),
            )
        return (
            ConsumerSpec(
                SOLE_CONSUMER,
                subjects.STREAM_INGEST,
                self._records,
                description="records published on cdp.ingest.<dataset> (NATS and HTTP doors)",
            ),
        )
