"""Knowing when data has landed: `cdp.admin.ingest.landed` (and `cdp ingest --wait`).

A probe is published to `cdp.ingest._probe`, behind everything published to the ingest
stream before it. The ingest actor passes it to identity behind the records before it;
identity sends a copy on every partition; each later stage (profile, segmentation, the
profile's membership write-back, the destination's profile view and its membership
consumer) reports each copy it passes on `cdp.probe.<id>`, once everything before it is
committed. When every stage has reported every partition, the data has landed.

A report is a core NATS message: one lost (a service killed between its commit and the
report) makes this request time out with the stages missing; asking again sends a new
probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from shared import subjects
from shared.admin import LANDING_STAGES, AdminFailure, LandedRequest, LandedResult
from shared.messages import Probe, json_encoder, probe_report_decoder

MAX_TIMEOUT_S = 3600.0


def new_probe_id() -> str:
    return f"{int(time.time()):08x}-{secrets.token_hex(6)}"


async def wait_landed(nc: Client, request: LandedRequest) -> LandedResult:
    """Publish a probe and wait until every stage reported every partition."""
    if not 0 < request.timeout <= MAX_TIMEOUT_S:
        raise AdminFailure(
            "invalid", f"timeout must be in (0, {MAX_TIMEOUT_S:.0f}] seconds", field="timeout"
        )
    stages = list(request.stages) if request.stages is not None else list(LANDING_STAGES)
    unknown = [s for s in stages if s not in LANDING_STAGES]
    if unknown:
        raise AdminFailure(
            "invalid",
            f"unknown stage {unknown[0]!r} (one of {', '.join(LANDING_STAGES)})",
            field="stages",
        )
    probe_id = new_probe_id()
    seen: set[tuple[str, int]] = set()
    partitions = 0
    done = asyncio.Event()

    def complete() -> bool:
        if "identity" in stages and ("identity", -1) not in seen:
            return False
        if partitions == 0:
            return not [s for s in stages if s != "identity"]
        return all((s, p) in seen for s in stages if s != "identity" for p in range(partitions))

    async def on_report(msg: Msg) -> None:
        nonlocal partitions
        try:
            report = probe_report_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        if report.probe_id != probe_id:
            return
        partitions = max(partitions, report.partitions)
        seen.add((report.stage, -1 if report.stage == "identity" else report.partition))
        if complete():
            done.set()

    started = time.monotonic()
    sub = await nc.subscribe(subjects.probe_report(probe_id), cb=on_report)
    try:
        await nc.jetstream().publish(subjects.PROBE, json_encoder.encode(Probe(probe_id)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), request.timeout)
    finally:
        await sub.unsubscribe()
    landed = done.is_set()
    missing: list[str] = []
    if not landed:
        if ("identity", -1) not in seen and "identity" in stages:
            missing.append("identity")
        for s in stages:
            if s == "identity":
                continue
            for p in range(max(partitions, 1)):
                if (s, p) not in seen:
                    missing.append(f"{s}/{p}" if partitions else s)
    return LandedResult(
        probe_id=probe_id,
        landed=landed,
        waited_s=round(time.monotonic() - started, 3),
        partitions=partitions,
        missing=missing,
    )
