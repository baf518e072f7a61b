"""Start-up without a graph: rebuilding it from the records stream, or refusing to.

Without its state (no offset: a new or lost identity.db) the service rebuilds the graph by
replaying the records stream from its first message, which gives every graph the profile id
it had. That needs the stream to still hold its first message: if retention removed any, a
replay would build other graphs than the ones the profile service holds, so the service
refuses to start instead. What the profile service already received (up to the last records
sequence identity published to it) is applied again but not announced again.
"""

from __future__ import annotations

from nats.js import JetStreamContext

from services.identity.errors import ReplayImpossible
from services.identity.handlers import RECORDS_CONSUMER
from services.identity.store import IdentityStore
from shared import subjects
from shared.runtime.actor import StepRef, last_step


async def announced_until(js: JetStreamContext, store: IdentityStore, db_path: str) -> int:
    """0 if the graph is there (or nothing was announced yet); else the records sequence up
    to which a replay must stay quiet. Raises ReplayImpossible if the replay cannot give
    the graphs their profile ids."""
    if await store.has_offset(RECORDS_CONSUMER):
        return 0
    info = await js.stream_info(subjects.STREAM_RECORDS.name)
    first, last = info.state.first_seq, info.state.last_seq
    if last > 0 and first > 1:
        raise ReplayImpossible(subjects.STREAM_RECORDS.name, first, db_path)
    return await last_announced(js)


async def last_announced(js: JetStreamContext) -> int:
    """The records sequence of the last message this service published to the profile
    service (the last sequence of the step its message id names), 0 if there is none."""
    last = await last_published_step(js)
    return last.last if last is not None else 0


async def last_published_step(js: JetStreamContext) -> StepRef | None:
    """The step of the records consumer that published the last message of the profiles
    stream (what a writer published last), none if there is none."""
    return await last_step(js, subjects.STREAM_PROFILES.name, RECORDS_CONSUMER)
