"""A merge and a move across partitions, at the handler level (no NATS): two partition
files held by two instances, the folded profile's owner hands its state over, the
survivor's owner waits for it and applies it once; the outcome is what one store holding
both profiles reaches."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import pytest

from services.profile.config import ProfileConfig
from services.profile.handlers import ProfileHandlers
from services.profile.store import MIGRATIONS, PARTITION_MIGRATIONS, ProfileStore
from shared import subjects
from shared.messages import (
    Awaits,
    ChangeEnvelope,
    ChangeItem,
    Fragment,
    Identity,
    Merged,
    ProfileChanged,
    ProfileEnvelope,
    ProfileItem,
    ProfileMerged,
    Reassigned,
    Record,
    fold_key,
    handoff_decoder,
    move_key,
    msgpack_encoder,
)
from shared.runtime.actor import Delivery
from shared.runtime.harness import StepHarness, StepOutput
from shared.subjects import partition_of

pytestmark = pytest.mark.asyncio
PARTITIONS = 8
NOW = 1_700_000_000.0


def _ids_on(partition: int, n: int) -> list[str]:
    return list(
        itertools.islice((f"p{i}" for i in itertools.count() if _on(f"p{i}", partition)), n)
    )


def _on(pid: str, partition: int) -> bool:
    return partition_of(pid, PARTITIONS) == partition


Q, P = 1, 2
X, Z = _ids_on(Q, 2)  # folded, and a profile the tablet leaves
(Y,) = _ids_on(P, 1)  # survivor, and the profile the tablet moves to
ADA = Identity("email", "ada@example.com")
ADA_CRM = Identity("crm_id", "A1")
TABLET = Identity("ecid", "tablet")


def record(
    rid: str, payload: dict[str, Any], *ids: Identity, ts: float = NOW, event: bool = False
) -> Record:
    return Record(
        record_id=rid,
        dataset="web" if event else "crm",
        ingested_at=ts,
        payload=payload,
        identities=list(ids),
        record_class="event" if event else "profile",
        timestamp=ts,
        event_type="page.view" if event else None,
    )


def items(h: StepHarness, partition: int, *batch: ProfileItem) -> Delivery:
    return h.delivery(
        subjects.profiles(partition), msgpack_encoder.encode(ProfileEnvelope(list(batch)))
    )


def changes(out: StepOutput) -> list[ChangeItem]:
    return [
        i
        for m in out.on(subjects.CHANGES_PREFIX)
        for i in msgspec.msgpack.decode(m.payload, type=ChangeEnvelope).items
    ]


@asynccontextmanager
async def holder(partition: int | None) -> AsyncIterator[tuple[StepHarness, ProfileHandlers]]:
    """A store holding `partition` only (None: every partition, one instance)."""
    migrations = MIGRATIONS if partition is None else PARTITION_MIGRATIONS
    async with StepHarness.open(migrations) as h:
        yield (
            h,
            ProfileHandlers(
                ProfileStore(h.db),
                ProfileConfig(),
                partitions=PARTITIONS,
                held=None if partition is None else (partition,),
            ),
        )


async def state(*stores: StepHarness) -> dict[str, Any]:
    """Attributes, identities and events of the live profiles, over these stores."""
    out: dict[str, Any] = {"attributes": set(), "identities": set(), "events": set()}
    for h in stores:
        live = "SELECT profile_id FROM profiles WHERE folded_into IS NULL"
        out["attributes"] |= {
            tuple(r)
            for r in await h.db.execute_fetchall(
                f"SELECT profile_id, dataset, path, value, ts FROM attributes "
                f"WHERE profile_id IN ({live})"
            )
        }
        out["identities"] |= {
            tuple(r)
            for r in await h.db.execute_fetchall(
                f"SELECT namespace, value, profile_id FROM identities WHERE profile_id IN ({live})"
            )
        }
        out["events"] |= {
            tuple(r)
            for r in await h.db.execute_fetchall(
                f"SELECT record_id, profile_id FROM events WHERE profile_id IN ({live})"
            )
        }
    return out


FOLD = Merged(Y, [X], NOW + 10)
MOVE = Reassigned(Z, Y, [TABLET], "login", NOW + 20)
MOVE_KEY = move_key(Z, Y, ["ecid:tablet"], NOW + 20)


def q_items(h: StepHarness) -> list[Delivery]:
    return [
        items(
            h,
            Q,
            Fragment(X, record("x1", {"name": "Ada", "tier": "silver"}, ADA, ts=NOW + 1)),
            Fragment(
                X, record("xe", {"page": "/x"}, ADA, event=True), anchor="email:ada@example.com"
            ),
            Fragment(Z, record("z1", {"name": "Tab"}, TABLET)),
            Fragment(Z, record("te", {"page": "/t"}, TABLET, event=True), anchor="ecid:tablet"),
        ),
        items(h, Q, FOLD),
        items(h, Q, MOVE),
    ]


def p_items(h: StepHarness) -> list[Delivery]:
    return [
        items(h, P, Fragment(Y, record("y1", {"tier": "gold", "crm": "A1"}, ADA_CRM, ts=NOW))),
        items(h, P, Awaits(Y, X, fold_key(X))),
        items(h, P, Awaits(Y, Z, MOVE_KEY)),
        items(h, P, Fragment(Y, record("y2", {"city": "Oslo"}, ADA_CRM, ts=NOW + 30))),
    ]


async def test_a_merge_and_a_move_across_partitions_end_where_one_store_ends() -> None:
    async with holder(None) as (one, whole), holder(Q) as (hq, on_q), holder(P) as (hp, on_p):
        # One store: identity's items in causal order (the HandOver/Awaits are ignored).
        causal = [*p_items(one)[:1], *q_items(one)[:2], *p_items(one)[1:2]]
        causal += [*q_items(one)[2:], *p_items(one)[2:]]
        await one.run(whole.on_items, causal)

        # The survivor's owner meets the merge's Awaits before the handoff: it stops there.
        early = await hp.run(on_p.on_items, p_items(hp))
        assert early.handled == 1, "only what comes before the Awaits is applied"
        assert [c.profile_id for c in changes(early) if isinstance(c, ProfileChanged)] == [Y]

        # The folded profile's owner applies the merge and the move: it hands X's state
        # and the tablet over, keeps X's fold pointer and nothing of Y.
        out_q = await hq.run(on_q.on_items, q_items(hq))
        handed = out_q.on(subjects.handoffs(P))
        assert len(handed) == 1, "one handoff per survivor and step, answering both"
        merged = [c for c in changes(out_q) if isinstance(c, ProfileMerged)]
        assert merged == [ProfileMerged(Y, [X], NOW + 10)]
        assert Y not in {c.profile_id for c in changes(out_q) if isinstance(c, ProfileChanged)}
        folds = await hq.db.execute_fetchall(
            "SELECT profile_id, folded_into FROM profiles WHERE profile_id = ?", (X,)
        )
        assert [tuple(r) for r in folds] == [(X, Y)]
        assert list(
            await hq.db.execute_fetchall(
                "SELECT count(*) FROM events WHERE profile_id IN (?, ?)", (X, Y)
            )
        ) == [(0,)]
        first = handoff_decoder.decode(handed[0].payload)
        assert first.profile_id == Y and first.sources == [X]
        assert sorted(first.keys) == sorted([fold_key(X), MOVE_KEY])
        assert sorted(e.record_id for e in first.events) == ["te", "xe"]

        # The handoffs arrive (one twice: a replay), and the survivor's partition goes on.
        for m in (*handed, handed[0]):
            await hp.run(on_p.on_handoffs, [hp.delivery(m.subject, m.payload)])
        rest = p_items(hp)[1:]
        later = await hp.run(on_p.on_items, rest)
        assert later.handled == 3
        [*_, last] = [c for c in changes(later) if isinstance(c, ProfileChanged)]
        assert last.profile_id == Y and X in last.folded
        assert {"name", "tier", "crm", "city"} <= set(last.attributes)

        # Both owners together hold what one store holds; nothing applied twice.
        assert await state(hq, hp) == await state(one)
        assert list(await hp.db.execute_fetchall("SELECT count(*) FROM events")) == [(2,)]
