"""The bare pipeline: the platform's six processes with pass-through handlers.

    python -m bench.passthrough <stage>      # ingest, identity, profile, segmentation,
                                             # scheduler or destination

Each stage is a `shared.runtime.Service` named as the service it stands for, with that
service's durable consumers on the same streams and subjects (shared.subjects), the same
fetch batch (`CDP_FETCH_BATCH`), the same partitions (`CDP_PARTITIONS`) and the runtime's
outbox, but a handler that does nothing except pass the records on:

- ingest: the JSON events of a fetch, as they are, into messages of at most 500 records
  (msgpack lists of bytes) on `cdp.x.records`, as ingest forwards a batch;
- identity: each record to the `cdp.x.profiles.<partition>` of its hash, one message per
  partition a batch touches (`PartitionedOutput`, as identity sends them);
- profile: the same onwards to `cdp.x.changes.<partition>`; and the membership envelopes
  consumed (offset committed, nothing written), as the profile's write-back consumes them;
- segmentation: one JSON membership event per record on `cdp.membership.<segment>`, the
  public per-change subject, and the same changes in one envelope per partition on
  `cdp.x.members.<partition>`;
- destination: consumes the changes and the membership envelopes, writes and sends nothing;
- scheduler: its consumer of the jobs stream, idle.

No state of their own: each commit holds the consumer's offset and the outbox only. What
the pipeline does per event end to end is then the least this design costs on a machine:
its ceiling (`bench/pipeline.py` measures it).
"""

from __future__ import annotations

import sys
import time
import zlib
from collections.abc import Sequence
from typing import ClassVar

import msgspec

from shared import subjects
from shared.messages import (
    MAX_ITEMS_PER_MESSAGE,
    MembershipChange,
    MembershipEnvelope,
    MembershipEvent,
    chunks,
    msgpack_encoder,
)
from shared.runtime import ConsumerSpec, Service, Step, run_service
from shared.runtime.actor import Handler
from shared.runtime.partitioned import PartitionedOutput

SEGMENT = "bench-passthrough"
"""The segment every pass-through membership event is about."""

_encode_records = msgspec.msgpack.Encoder().encode
_decode_records = msgspec.msgpack.Decoder(list[bytes]).decode
_encode_json = msgspec.json.Encoder().encode


def records_of(step: Step) -> list[bytes]:
    """Every record of a step's messages (msgpack lists of bytes), in order."""
    return [r for d in step.deliveries for r in _decode_records(d.data)]


def partition_of(record: bytes, partitions: int) -> int:
    return zlib.crc32(record) % partitions


async def ignore(_step: Step) -> None:
    """Consume: the runtime commits the offset, nothing else happens."""


# -- the handlers ------------------------------------------------------------------------
async def forward(step: Step) -> None:
    """ingest: the JSON events of a fetch, as they are, in messages of at most 500."""
    raw = [d.data for d in step.deliveries]
    for chunk in chunks(raw, MAX_ITEMS_PER_MESSAGE):
        step.emit(subjects.RECORDS, _encode_records(chunk))


def repartition(prefix: str, partitions: int) -> Handler:
    """identity, profile: each record on to `<prefix>.<partition>` of its hash, one
    message per partition the fetch touches (at most 500 records each)."""

    async def handle(step: Step) -> None:
        out: PartitionedOutput[bytes] = PartitionedOutput(
            lambda p: f"{prefix}.{p}", _encode_records, partitions
        )
        for record in records_of(step):
            out.add(partition_of(record, partitions), record)
        for subject, payload in out.messages():
            step.emit(subject, payload)

    return handle


def _members_message(items: list[MembershipChange]) -> bytes:
    return msgpack_encoder.encode(MembershipEnvelope(list(items)))


def memberships(partitions: int) -> Handler:
    """segmentation: one JSON membership event per record, on the public subject, and the
    same changes in one msgpack envelope per partition on `cdp.x.members.<partition>` (as
    segmentation sends them to profile and destination)."""

    async def handle(step: Step) -> None:
        now = time.time()
        subject = subjects.membership(SEGMENT)
        out: PartitionedOutput[MembershipChange] = PartitionedOutput(
            subjects.members, _members_message, partitions
        )
        for record in records_of(step):
            event = MembershipEvent(
                profile_id=f"{zlib.crc32(record):08x}",
                segment=SEGMENT,
                status="realized",
                at=now,
                method="streaming",
            )
            step.emit(subject, _encode_json(event))
            out.add(partition_of(record, partitions), MembershipChange(event))
        for members_subject, payload in out.messages():
            step.emit(members_subject, payload)

    return handle


# -- the stages ----------------------------------------------------------------------------
class Stage(Service):
    """A pass-through stage (subclasses name it and declare its consumers)."""

    migrations = ()
    stage_consumers: ClassVar[tuple[tuple[str, subjects.StreamSpec, tuple[str, ...]], ...]] = ()
    """Consumers (name, stream, subjects) that only commit their offset."""

    def consumers(self) -> Sequence[ConsumerSpec]:
        return tuple(
            ConsumerSpec(name, stream, ignore, filter_subjects=filters)
            for name, stream, filters in self.stage_consumers
        )


class IngestStage(Stage):
    name = "ingest"

    def consumers(self) -> Sequence[ConsumerSpec]:
        return (ConsumerSpec("ingest", subjects.STREAM_INGEST, forward),)


class IdentityStage(Stage):
    name = "identity"

    def consumers(self) -> Sequence[ConsumerSpec]:
        handler = repartition(subjects.PROFILES_PREFIX, self.settings.partitions)
        return (ConsumerSpec("identity", subjects.STREAM_RECORDS, handler),)


class ProfileStage(Stage):
    name = "profile"
    stage_consumers = (("profile-members", subjects.STREAM_MEMBERS, ()),)

    def consumers(self) -> Sequence[ConsumerSpec]:
        handler = repartition(subjects.CHANGES_PREFIX, self.settings.partitions)
        return (*super().consumers(), ConsumerSpec("profile", subjects.STREAM_PROFILES, handler))


class SegmentationStage(Stage):
    name = "segmentation"

    def consumers(self) -> Sequence[ConsumerSpec]:
        handler = memberships(self.settings.partitions)
        return (ConsumerSpec("segmentation", subjects.STREAM_CHANGES, handler),)


class SchedulerStage(Stage):
    name = "scheduler"
    stage_consumers = (
        (
            "scheduler",
            subjects.STREAM_JOBS,
            (subjects.SEGMENTATION_JOB_DONE, subjects.export_done("*")),
        ),
    )


class DestinationStage(Stage):
    name = "destination"
    stage_consumers = (
        ("destination-profiles", subjects.STREAM_CHANGES, ()),
        ("destination-members", subjects.STREAM_MEMBERS, ()),
    )


STAGES: dict[str, type[Stage]] = {
    cls.name: cls
    for cls in (
        IngestStage,
        IdentityStage,
        ProfileStage,
        SegmentationStage,
        SchedulerStage,
        DestinationStage,
    )
}
"""Every stage by name, in the order `cdp up` starts the services."""


def main(argv: list[str]) -> None:
    if len(argv) != 1 or argv[0] not in STAGES:
        sys.exit(f"usage: python -m bench.passthrough {{{','.join(STAGES)}}}")
    run_service(STAGES[argv[0]])


if __name__ == "__main__":
    main(sys.argv[1:])
