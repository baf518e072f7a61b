"""Profile lookups read on a read-only connection of their own, one snapshot per lookup:
a write batch, open or committing, never holds them up, and a commit in the middle of a
lookup does not show in its answer. A real SQLite file, no NATS."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from services.profile.config import ProfileConfig
from services.profile.handlers import ProfileHandlers
from services.profile.lookup import ProfileLookup, ProfileLookups
from services.profile.merge import AttributeValue
from services.profile.store import MIGRATIONS, UPSERT_ATTRIBUTE, UPSERT_IDENTITY, ProfileStore
from shared import subjects
from shared.db import close_reader, open_db, open_reader, snapshot, write_lock
from shared.messages import Fragment, Identity, ProfileEnvelope, Record, msgpack_encoder
from shared.runtime.actor import RUNTIME_MIGRATIONS
from shared.runtime.harness import StepHarness

pytestmark = pytest.mark.asyncio

NOW = 1_700_000_000.0
ADA = Identity("email", "ada@example.com")
ADA_KEY = "email:ada@example.com"
ALL = (*RUNTIME_MIGRATIONS, *MIGRATIONS)
ANSWERED_WITHIN_S = 10.0
"""Not a timing assertion: a lookup that waited for the open write would never answer."""


def record(rid: str, payload: dict[str, Any], *, event: bool = False) -> Record:
    return Record(
        record_id=rid,
        dataset="web" if event else "crm",
        ingested_at=NOW,
        payload=payload,
        identities=[ADA],
        record_class="event" if event else "profile",
        timestamp=NOW,
        event_type="page.view" if event else None,
    )


@asynccontextmanager
async def ada(tmp_path: Path) -> AsyncIterator[tuple[StepHarness, aiosqlite.Connection]]:
    """A profile database holding Ada (tier gold, one event), and a reader of it."""
    async with StepHarness.open(MIGRATIONS, tmp_path / "profile.db") as h:
        handlers = ProfileHandlers(ProfileStore(h.db), ProfileConfig(), partitions=1)
        envelope = ProfileEnvelope(
            [
                Fragment("p1", record("r1", {"tier": "gold"})),
                Fragment("p1", record("e1", {"page": "/"}, event=True), anchor=ADA_KEY),
            ]
        )
        out = await h.run(
            handlers.on_items, [h.delivery(subjects.profiles(0), msgpack_encoder.encode(envelope))]
        )
        assert out.handled == 1
        reader = await open_reader(tmp_path / "profile.db", ALL)
        try:
            yield h, reader
        finally:
            await close_reader(reader)


def platinum_and_phone() -> list[tuple[str, tuple[Any, ...]]]:
    """Writes that change Ada: her tier and a second identity."""
    value = msgpack_encoder.encode("platinum")
    return [
        (UPSERT_ATTRIBUTE, ("p1", "crm", "tier", value, NOW + 1, "r2")),
        (UPSERT_IDENTITY, ("crm_id", "A1", "p1")),
    ]


async def ask(lookups: ProfileLookups) -> tuple[Any, list[str]]:
    view = await asyncio.wait_for(lookups.lookup(ProfileLookup(ADA_KEY)), ANSWERED_WITHIN_S)
    return view.attributes.get("tier"), [f"{i.namespace}:{i.value}" for i in view.identities]


async def test_a_lookup_answers_while_a_write_batch_is_open(tmp_path: Path) -> None:
    async with ada(tmp_path) as (h, reader):
        lookups = ProfileLookups(ProfileStore(reader), ProfileConfig(), None)
        async with write_lock(h.db):
            await h.db.execute("BEGIN IMMEDIATE")
            for sql, row in platinum_and_phone():
                await h.db.execute(sql, row)
            # The batch holds the write lock and SQLite's write lock, uncommitted.
            assert await ask(lookups) == ("gold", [ADA_KEY])
            await h.db.execute("COMMIT")
        assert await ask(lookups) == ("platinum", ["crm_id:A1", ADA_KEY])


class CommitsMidLookup(ProfileStore):
    """A store whose attribute read is followed, before the lookup's next read, by a batch
    committed on the write connection."""

    def __init__(self, reader: aiosqlite.Connection, writer: aiosqlite.Connection) -> None:
        super().__init__(reader)
        self.writer = writer

    async def attributes(self, profile_id: str) -> list[AttributeValue]:
        found = await super().attributes(profile_id)
        async with write_lock(self.writer):
            await self.writer.execute("BEGIN IMMEDIATE")
            for sql, row in platinum_and_phone():
                await self.writer.execute(sql, row)
            await self.writer.execute("COMMIT")
        return found


async def test_a_lookup_answers_one_snapshot_when_a_batch_commits_during_it(
    tmp_path: Path,
) -> None:
    async with ada(tmp_path) as (h, reader):
        lookups = ProfileLookups(CommitsMidLookup(reader, h.db), ProfileConfig(), None)
        # The commit landed between the attribute and the identity reads: the answer is
        # the moment before it, whole.
        assert await ask(lookups) == ("gold", [ADA_KEY])
        plain = ProfileLookups(ProfileStore(reader), ProfileConfig(), None)
        assert await ask(plain) == ("platinum", ["crm_id:A1", ADA_KEY])


async def test_the_reader_writes_nothing(tmp_path: Path) -> None:
    async with ada(tmp_path) as (_, reader), snapshot(reader):
        with pytest.raises(aiosqlite.OperationalError):
            await reader.execute("DELETE FROM profiles")


async def test_a_reader_opens_only_on_a_migrated_database(tmp_path: Path) -> None:
    db = await open_db(tmp_path / "profile.db", RUNTIME_MIGRATIONS)
    try:
        with pytest.raises(RuntimeError, match="migrations not applied"):
            await open_reader(tmp_path / "profile.db", ALL)
    finally:
        await db.close()
