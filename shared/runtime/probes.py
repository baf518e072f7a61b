"""Passing a probe: the report a stage sends once everything before the probe is
committed (see services/ingest/landing.py for who waits for them)."""

from __future__ import annotations

import time

import msgspec
import structlog

from shared import subjects
from shared.messages import Probe, ProbeReport, json_encoder, probe_decoder
from shared.runtime.actor import Step

_log = structlog.get_logger()


def report_probe(batch: Step, probe: Probe, stage: str, partitions: int | None = None) -> None:
    """Send `stage`'s report of `probe` once the batch is committed and published."""
    report = ProbeReport(
        probe_id=probe.probe_id,
        stage=stage,
        partition=probe.partition,
        partitions=probe.partitions if partitions is None else partitions,
        at=time.time(),
    )
    batch.notify(subjects.probe_report(probe.probe_id), json_encoder.encode(report))


def decode_probe(data: bytes) -> Probe | None:
    """A probe from a public subject (JSON), or None if it is not one (logged)."""
    try:
        return probe_decoder.decode(data)
    except msgspec.DecodeError as exc:
        _log.warning("undecodable probe ignored", error=str(exc))
        return None
