"""The scheduler's SQLite state: the configured schedules and the runs of each schedule;
its named reads and writes (`SchedulerStore`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import aiosqlite
import msgspec

from shared.db import Migration, Tx, apply, rows
from shared.resources import Schedule
from shared.runtime.actor import Outgoing, to_outbox

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "scheduler",
        1,
        """
        CREATE TABLE job_events (
            seq INTEGER PRIMARY KEY,
            subject TEXT NOT NULL,
            payload BLOB NOT NULL
        );
        CREATE TABLE schedule_runs (
            schedule TEXT NOT NULL,
            due REAL NOT NULL,
            started_at REAL NOT NULL,
            job_id TEXT,
            status TEXT NOT NULL,
            detail TEXT,
            PRIMARY KEY (schedule, due)
        );
        CREATE TABLE schedules (
            name TEXT PRIMARY KEY,
            spec BLOB NOT NULL
        )
        """,
    ),
    Migration(
        "scheduler",
        2,
        """
        DROP TABLE job_events;
        ALTER TABLE schedule_runs ADD COLUMN finished_at REAL;
        CREATE INDEX schedule_runs_by_job ON schedule_runs (job_id) WHERE job_id IS NOT NULL
        """,
    ),
)
"""Version 2: runs are settled from the jobs' done events (by job id, with the time they
ended); the job events themselves are no longer kept."""


class Run(msgspec.Struct, kw_only=True):
    """One occurrence of a schedule: `registered` (the schedule began, nothing ran),
    `requested` (its job request is committed to the outbox), then `succeeded` or `failed`
    once the job's done event arrived."""

    schedule: str
    due: float
    started_at: float
    job_id: str | None
    status: str
    detail: str | None = None
    finished_at: float | None = None


_UPSERT_SCHEDULE = (
    "INSERT INTO schedules (name, spec) VALUES (?, ?) "
    "ON CONFLICT (name) DO UPDATE SET spec = excluded.spec"
)
_INSERT_RUN = (
    "INSERT OR REPLACE INTO schedule_runs "
    "(schedule, due, started_at, job_id, status, detail, finished_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_SETTLE_RUN = (
    "UPDATE schedule_runs SET status = ?, detail = ?, finished_at = ? "
    "WHERE job_id = ? AND finished_at IS NULL"
)
_schedule = msgspec.json.Decoder(Schedule)


class SchedulerStore:
    """Reads return structs decoded by column name; writes are added to a `Tx`."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    async def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return await rows(self.db, sql, params)

    # -- reads --
    async def schedules(self) -> list[Schedule]:
        rows = await self._rows("SELECT spec FROM schedules ORDER BY name")
        return [_schedule.decode(r["spec"]) for r in rows]

    async def last_due(self, schedule: str) -> float | None:
        """The due time of the schedule's latest run (None: it never began)."""
        rows = await self._rows(
            "SELECT max(due) AS due FROM schedule_runs WHERE schedule = ?", (schedule,)
        )
        due = rows[0]["due"] if rows else None
        return None if due is None else float(due)

    async def runs(self, schedule: str) -> list[Run]:
        """The schedule's runs, oldest due first."""
        rows = await self._rows(
            "SELECT schedule, due, started_at, job_id, status, detail, finished_at "
            "FROM schedule_runs WHERE schedule = ? ORDER BY due",
            (schedule,),
        )
        return [Run(**r) for r in rows]

    # -- writes --
    @staticmethod
    def record_run(tx: Tx, run: Run) -> None:
        tx.add(
            _INSERT_RUN,
            (
                run.schedule,
                run.due,
                run.started_at,
                run.job_id,
                run.status,
                run.detail,
                run.finished_at,
            ),
        )

    @staticmethod
    def settle(tx: Tx, job_id: str, status: str, detail: str | None, at: float) -> None:
        """The run that asked for `job_id` ended (a run settled already stays as it is)."""
        tx.add(_SETTLE_RUN, (status, detail, at, job_id))

    @staticmethod
    def save_schedule(tx: Tx, schedule: Schedule, spec: bytes) -> None:
        tx.add(_UPSERT_SCHEDULE, (schedule.name, spec))

    @staticmethod
    def send(tx: Tx, out: Iterable[Outgoing], at: float) -> None:
        """Put messages in the outbox, committed with `tx`'s other writes."""
        to_outbox(tx, out, at, if_new=True)

    async def commit(self, tx: Tx) -> None:
        await apply(self.db, tx)
