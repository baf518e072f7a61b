"""A privacy delete, as every service carries it out: count what it holds of the person,
delete it in the step's transaction, and report what it removed.

The report goes out on `cdp.privacy.<request>.<service>` (stream CDP_PRIVACY) through the
step's outbox, so it is published only once the removal is committed, and exactly once.
`cdp delete` waits for one report per service.

A service whose state is keyed by profile id calls `forget`; one with its own rule (ingest
removes rejected records by identity key, identity removes nodes and links) removes what it
must and calls `report` with the counts.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import msgspec

from shared import subjects
from shared.messages import PrivacyDelete, PrivacyReport
from shared.runtime.actor import Step

_encoder = msgspec.json.Encoder()


def report(
    step: Step,
    service: str,
    request: PrivacyDelete,
    removed: Mapping[str, int],
    *,
    profile_ids: Iterable[str] = (),
    at: float | None = None,
) -> PrivacyReport:
    """Emit `service`'s report for `request`: what it removed, by kind."""
    done = PrivacyReport(
        request_id=request.request_id,
        service=service,
        identity=request.identity,
        profile_ids=list(profile_ids),
        removed=dict(removed),
        at=time.time() if at is None else at,
    )
    step.emit(subjects.privacy_report(request.request_id, service), _encoder.encode(done))
    return done


async def forget(
    step: Step,
    service: str,
    request: PrivacyDelete,
    profile_ids: list[str],
    tables: Iterable[str],
    *,
    counted: Iterable[str] | None = None,
    at: float | None = None,
) -> PrivacyReport:
    """Delete every row of `tables` whose `profile_id` is one of `profile_ids` (one
    statement per table, in the step's transaction) and report the rows removed from
    `counted` (all of `tables` unless given). Table names are the service's own
    constants, never input."""
    tables = tuple(tables)
    counted = tables if counted is None else tuple(counted)
    ids = _encoder.encode(profile_ids)
    removed: dict[str, int] = {}
    for table in counted:
        rows = await step.db.execute_fetchall(
            f"SELECT count(*) FROM {table} WHERE profile_id IN (SELECT value FROM json_each(?))",
            (ids,),
        )
        removed[table] = int(next(iter(rows))[0])
    for table in tables:
        step.tx.add(
            f"DELETE FROM {table} WHERE profile_id IN (SELECT value FROM json_each(?))", (ids,)
        )
    return report(step, service, request, removed, profile_ids=profile_ids, at=at)
