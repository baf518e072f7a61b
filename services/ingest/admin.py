"""The ingest service's admin API: namespaces, schemas, datasets, batches, errors.

Configuration is stored in the service's SQLite (the source of truth) and published on
`cdp.config.<kind>.<name>` (stream CDP_CONFIG keeps the latest version of each object)
for the services that need it.
"""

from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING, Any

import msgspec
from nats.aio.subscription import Subscription

from services.ingest.landing import wait_landed
from services.ingest.registry import Registry
from services.ingest.store import BATCH_COLUMNS, UPSERT_CONFIG
from shared import admin, subjects
from shared.admin import (
    AdminFailure,
    ApplyMany,
    ApplyManyResult,
    ApplyResult,
    BatchInfo,
    BatchListResult,
    ErrorsQuery,
    ErrorsResult,
    GetRequest,
    GetResult,
    ListRequest,
    RejectedRecord,
)
from shared.db import Tx, apply
from shared.resources import OWNERS, PLURALS, Dataset, Namespace, Schema, name_of, to_builtins
from shared.runtime.actor import Outgoing, publish_outbox

if TYPE_CHECKING:
    from services.ingest.service import IngestService

_spec_encoder = msgspec.json.Encoder()
_problems_decoder = msgspec.json.Decoder(list[dict[str, str]])
_OUTBOX_INSERT = "INSERT INTO rt_outbox (msg_id, subject, payload, created_at) VALUES (?, ?, ?, ?)"
_KIND_TYPES: dict[str, type[Namespace | Schema | Dataset]] = {
    "namespace": Namespace,
    "schema": Schema,
    "dataset": Dataset,
}


def batch_from_row(row: Any) -> BatchInfo:
    (
        bid,
        dataset,
        file_name,
        fmt,
        status,
        rows,
        accepted,
        failed,
        threshold,
        error,
        created,
        started,
        finished,
    ) = row
    return BatchInfo(
        batch_id=bid,
        dataset=dataset,
        file_name=file_name,
        format=fmt,
        status=status,
        input_rows=rows,
        accepted=accepted,
        failed=failed,
        threshold=threshold,
        error=error,
        created_at=created,
        started_at=started,
        finished_at=finished,
        progress=1.0 if status in ("success", "partial", "failed") else 0.0,
    )


class IngestAdmin:
    def __init__(self, service: IngestService) -> None:
        self.svc = service
        self._subs: list[Subscription] = []

    async def load(self) -> None:
        """Read the configuration from SQLite into the registry; publish all of it."""
        reg = Registry()
        rows = await self.svc.db.execute_fetchall(
            "SELECT kind, name, spec, version FROM config_objects"
        )
        order = {"namespace": 0, "schema": 1, "dataset": 2}
        versions: dict[tuple[str, str], int] = {}
        for kind, name, spec, version in sorted(rows, key=lambda r: order.get(r[0], 9)):
            if kind in _KIND_TYPES:
                reg.put(msgspec.json.decode(spec, type=_KIND_TYPES[kind]))
                versions[kind, name] = version
        self.svc.registry = reg
        self.svc.config_changed()
        # Publish every object (built-ins included) so a fresh consumer sees all of them.
        out = []
        for kind in ("namespace", "schema", "dataset"):
            for spec in reg.items(kind):
                name = name_of(kind, spec)
                v = versions.get((kind, name), 0)
                out.append(
                    Outgoing(
                        f"config:{kind}:{name}:{v}",
                        subjects.config(kind, name),
                        _spec_encoder.encode(spec),
                    )
                )
        await publish_outbox(self.svc.js, self.svc.db, out, self.svc.log, lambda: False)

    async def start(self) -> None:
        nc = self.svc.nc
        self._subs = [
            await admin.serve(nc, subjects.admin("ingest", "apply"), ApplyMany, self.apply),
            await admin.serve(nc, subjects.admin("ingest", "get"), GetRequest, self.get),
            await admin.serve(
                nc,
                subjects.admin("ingest", "batch.start"),
                admin.BatchStart,
                self.svc.batches.start_batch,
            ),
            await admin.serve(
                nc, subjects.admin("ingest", "batch.list"), ListRequest, self.batches
            ),
            await admin.serve(nc, subjects.admin("ingest", "errors"), ErrorsQuery, self.errors),
            await admin.serve(
                nc, subjects.admin("ingest", "landed"), admin.LandedRequest, self.landed
            ),
        ]

    async def landed(self, request: admin.LandedRequest) -> admin.LandedResult:
        return await wait_landed(self.svc.nc, request)

    async def stop(self) -> None:
        await admin.unsubscribe_all(self._subs)

    # -- configuration ---------------------------------------------------------------
    async def apply(self, request: ApplyMany) -> ApplyManyResult:
        """Plan every object on a scratch copy of the registry; commit all or none."""
        scratch = copy.deepcopy(self.svc.registry)
        planned: list[tuple[Namespace | Schema | Dataset, ApplyResult]] = []
        for obj in request.objects:
            kind = PLURALS.get(obj.kind, obj.kind)
            if OWNERS.get(kind) != "ingest":
                raise AdminFailure(
                    "unknown_kind", f"the ingest service does not own {kind!r}", kind=kind
                )
            spec, result = scratch.plan(kind, obj.spec)
            scratch.put(spec)
            planned.append((spec, result))
        if not request.dry_run:
            changed = [(s, r) for s, r in planned if r.action != "unchanged"]
            if changed:
                await self._commit(changed)
                self.svc.registry = scratch
                self.svc.config_changed()
        return ApplyManyResult([r for _, r in planned])

    async def _commit(
        self, changed: list[tuple[Namespace | Schema | Dataset, ApplyResult]]
    ) -> None:
        now = time.time()
        tx = Tx()
        out: list[Outgoing] = []
        for spec, result in changed:
            payload = _spec_encoder.encode(spec)
            tx.add(UPSERT_CONFIG, (result.kind, result.name, payload, now))
            msg_id = f"config:{result.kind}:{result.name}:{now}"
            out.append(Outgoing(msg_id, subjects.config(result.kind, result.name), payload))
        tx.add_many(_OUTBOX_INSERT, ((o.msg_id, o.subject, o.payload, now) for o in out))
        await apply(self.svc.db, tx)
        await publish_outbox(self.svc.js, self.svc.db, out, self.svc.log, lambda: False)
        for _, result in changed:
            self.svc.log.info(
                "configuration applied", kind=result.kind, name=result.name, action=result.action
            )

    async def get(self, request: GetRequest) -> GetResult:
        kind = PLURALS.get(request.kind, request.kind)
        if OWNERS.get(kind) != "ingest":
            raise AdminFailure(
                "unknown_kind", f"the ingest service does not own {kind!r}", kind=kind
            )
        if request.name is not None:
            spec = self.svc.registry.get(kind, request.name)
            if spec is None:
                raise AdminFailure(
                    "not_found", f"no {kind} named {request.name!r}", kind=kind, name=request.name
                )
            return GetResult(kind, [to_builtins(spec)])
        return GetResult(kind, [to_builtins(s) for s in self.svc.registry.items(kind)])

    # -- batches and errors ------------------------------------------------------------
    async def batches(self, request: ListRequest) -> BatchListResult:
        rows = await self.svc.db.execute_fetchall(
            f"SELECT {BATCH_COLUMNS} FROM batches ORDER BY created_at DESC LIMIT ?",
            (max(1, min(request.limit, 1000)),),
        )
        listed = [batch_from_row(r) for r in rows]
        live = self.svc.batches.live
        return BatchListResult([live.get(b.batch_id, b) for b in listed])

    async def errors(self, request: ErrorsQuery) -> ErrorsResult:
        column = "batch_id" if await self._is_batch(request.target) else "dataset"
        limit = max(1, min(request.limit, 10_000))
        rows = await self.svc.db.execute_fetchall(
            "SELECT record_id, dataset, batch_id, row_number, source, reason, path, expected, "
            f"got, problems, payload, rejected_at FROM rejected_records WHERE {column} = ? "
            "ORDER BY rejected_at, row_number, record_id LIMIT ?",
            (request.target, limit),
        )
        total_rows = await self.svc.db.execute_fetchall(
            f"SELECT count(*) FROM rejected_records WHERE {column} = ?", (request.target,)
        )
        total = int(next(iter(total_rows))[0])
        records = [
            RejectedRecord(
                record_id=r[0],
                dataset=r[1],
                batch_id=r[2],
                row_number=r[3],
                source=r[4],
                reason=r[5],
                path=r[6],
                expected=r[7],
                got=r[8],
                problems=_problems_decoder.decode(r[9]),
                payload=bytes(r[10]).decode("utf-8", "replace")[:4096],
                rejected_at=r[11],
            )
            for r in rows
        ]
        if total == 0 and column == "dataset" and request.target not in self.svc.registry.datasets:
            raise AdminFailure(
                "not_found",
                f"no dataset or batch named {request.target!r}",
                kind="dataset",
                name=request.target,
            )
        dropped_rows = await self.svc.db.execute_fetchall(
            "SELECT dropped FROM error_store WHERE id = 1"
        )
        dropped = int(next(iter(dropped_rows), (0,))[0])
        return ErrorsResult(request.target, total, records, dropped=dropped)

    async def _is_batch(self, target: str) -> bool:
        rows = await self.svc.db.execute_fetchall(
            "SELECT 1 FROM batches WHERE batch_id = ?", (target,)
        )
        return bool(list(rows))
