"""The scheduler actor: follows job requests and job status events on `cdp.jobs.>`."""

from __future__ import annotations

from collections.abc import Sequence

from services.scheduler.store import INSERT_JOB_EVENT, MIGRATIONS
from shared import subjects
from shared.runtime import Batch, ConsumerSpec, Service


class SchedulerService(Service):
    name = "scheduler"
    migrations = MIGRATIONS

    def consumers(self) -> Sequence[ConsumerSpec]:
        return (
            ConsumerSpec(
                "scheduler",
                subjects.STREAM_JOBS,
                self.handle_job_events,
                description="job requests and status events",
            ),
        )

    async def handle_job_events(self, batch: Batch) -> None:
        batch.tx.add_many(INSERT_JOB_EVENT, ((d.seq, d.subject, d.data) for d in batch.deliveries))
