"""The configuration ingest owns: identity namespaces, schemas and datasets.

SQLite is the source of truth; each object is published on `cdp.config.<kind>.<name>`
(stream CDP_CONFIG keeps the latest version of each) through the outbox, for the services
that need it. An apply is planned on a scratch copy of the configuration in force and
committed whole or not at all; the new configuration is then put in force.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Awaitable, Callable

import msgspec
import structlog
from nats.js import JetStreamContext

from services.ingest.registry import Registry
from services.ingest.state import IngestState
from services.ingest.store import Store
from shared import subjects
from shared.admin import ApplyMany, ApplyManyResult, ApplyResult, Invalid
from shared.db import Tx
from shared.resources import OWNERS, PLURALS, Dataset, Namespace, Schema, name_of
from shared.runtime.actor import Outgoing

Spec = Namespace | Schema | Dataset
Publish = Callable[[list[Outgoing]], Awaitable[object]]
"""Publishes committed outgoing messages (and removes them from the outbox)."""

KINDS: dict[str, type[Spec]] = {"namespace": Namespace, "schema": Schema, "dataset": Dataset}
"""The kinds ingest owns, in the order they depend on each other."""
_encoder = msgspec.json.Encoder()


def own_kind(kind: str) -> str:
    """The singular kind, if ingest owns it; else `unknown_kind`."""
    kind = PLURALS.get(kind, kind)
    if OWNERS.get(kind) != "ingest":
        raise Invalid(f"the ingest service does not own {kind!r}", kind=kind, code="unknown_kind")
    return kind


class Catalog:
    def __init__(self, store: Store, state: IngestState, publish: Publish) -> None:
        self.store = store
        self.state = state
        self.publish = publish
        self.log = structlog.get_logger(service="ingest")

    async def catch_up(self, js: JetStreamContext) -> int:
        """When several instances share the work: take into this instance's store what
        another one applied (the latest version of each object of ingest's kinds on
        CDP_CONFIG, where it differs from the stored one). Called before `load`; returns
        how many objects it took."""
        stored = {
            (o.kind, o.name): msgspec.json.decode(o.spec, type=KINDS[o.kind])
            for o in await self.store.config_objects()
            if o.kind in KINDS
        }
        stream = subjects.STREAM_CONFIG.name
        now = time.time()
        tx = Tx()
        taken = 0
        for kind, spec_type in KINDS.items():
            prefix = subjects.config(kind, "")
            info = await js.stream_info(stream, subjects_filter=f"{prefix}>")
            for subject in sorted(info.state.subjects or {}):
                msg = await js.get_last_msg(stream, subject)
                if not msg.data:
                    continue
                try:
                    spec = msgspec.json.decode(msg.data, type=spec_type)
                except msgspec.DecodeError:
                    continue
                name = subject[len(prefix) :]
                if stored.get((kind, name)) != spec:
                    self.store.put_config(tx, kind, name, _encoder.encode(spec), now)
                    taken += 1
        if taken:
            await self.store.apply(tx)
            self.log.info("configuration taken from the other instances", objects=taken)
        return taken

    async def load(self) -> None:
        """Put the stored configuration in force and publish all of it (built-in namespaces
        included), so that a fresh consumer sees every object."""
        reg = Registry()
        order = list(KINDS)
        versions: dict[tuple[str, str], int] = {}
        stored = [o for o in await self.store.config_objects() if o.kind in KINDS]
        for obj in sorted(stored, key=lambda o: order.index(o.kind)):
            reg.put(msgspec.json.decode(obj.spec, type=KINDS[obj.kind]))
            versions[obj.kind, obj.name] = obj.version
        self.state.replace(reg)
        out = []
        for kind in KINDS:
            for spec in reg.items(kind):
                name = name_of(kind, spec)
                msg_id = f"config:{kind}:{name}:{versions.get((kind, name), 0)}"
                out.append(Outgoing(msg_id, subjects.config(kind, name), _encoder.encode(spec)))
        await self.publish(out)

    async def apply(self, request: ApplyMany) -> ApplyManyResult:
        """Plan every object on a scratch copy of the configuration; commit all or none."""
        scratch = copy.deepcopy(self.state.registry)
        planned: list[tuple[Spec, ApplyResult]] = []
        for obj in request.objects:
            spec, result = scratch.plan(own_kind(obj.kind), obj.spec)
            scratch.put(spec)
            planned.append((spec, result))
        if not request.dry_run:
            changed = [(s, r) for s, r in planned if r.action != "unchanged"]
            if changed:
                await self._commit(changed)
                self.state.replace(scratch)
        return ApplyManyResult([r for _, r in planned])

    async def _commit(self, changed: list[tuple[Spec, ApplyResult]]) -> None:
        now = time.time()
        tx = Tx()
        out: list[Outgoing] = []
        for spec, result in changed:
            payload = _encoder.encode(spec)
            self.store.put_config(tx, result.kind, result.name, payload, now)
            msg_id = f"config:{result.kind}:{result.name}:{now}"
            out.append(Outgoing(msg_id, subjects.config(result.kind, result.name), payload))
        self.store.add_outbox(tx, out, now)
        await self.store.apply(tx)
        await self.publish(out)
        for _, result in changed:
            self.log.info(
                "configuration applied", kind=result.kind, name=result.name, action=result.action
            )
