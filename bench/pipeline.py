"""The pipeline section: the bare-pipeline floor, this design's ceiling on this machine.

The same processes, streams, subjects, batching and outbox as the platform, with the
pass-through handlers of `bench/passthrough.py` (one process per service, under the
supervisor behind `cdp up`, with a nats-server of its own), measured as the platform's
end-to-end streaming throughput is: the same web events (`scripts/gen`, the same count
for the same `--profiles`), published the same way (acked JetStream publishes, windows of
1,000), from the first publish to the last membership event they caused. The end-to-end
figure over this one says how much of the ceiling the platform's own work leaves.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from bench import Progress, Result, procs, rate
from bench.live import (
    Memberships,
    PlatformError,
    Scale,
    bounded,
    drained,
    generate,
    limit_for,
    publish_all,
    restamped_events,
    stream_last_seq,
    until,
)
from bench.passthrough import STAGES
from ops.natsd import free_port
from ops.platform import Platform, wait_ready
from ops.supervisor import ProcessSpec, Supervisor
from shared import subjects
from shared.config import port_variable

ROOT = Path(__file__).resolve().parent.parent
NAME = "bare pipeline, end to end"
MEASURE = "bare pipeline"
"""The measure's name in the CPU table."""


@asynccontextmanager
async def pipeline_up(folder: Path) -> AsyncIterator[tuple[Platform, dict[str, int | None]]]:
    """nats-server and the streams (as `cdp up`), then the six pass-through stages as
    processes; yields the platform (its nats-server) and every process id."""
    platform = Platform(folder / "var", services=(), ready_timeout=90)
    await platform.start()
    supervisor: Supervisor | None = None
    try:
        ports = {name: free_port() for name in STAGES}
        env = {
            "CDP_DATA_DIR": str(platform.data_dir),
            "CDP_NATS_URL": platform.nats_url,
            "CDP_LOG_FORMAT": os.environ.get("CDP_LOG_FORMAT", "json"),
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
            **{port_variable(name): str(port) for name, port in ports.items()},
        }
        supervisor = Supervisor(
            [
                ProcessSpec(
                    name,
                    [sys.executable, "-m", "bench.passthrough", name],
                    env=env,
                    log_file=platform.logs / f"{name}.log",
                )
                for name in STAGES
            ]
        )
        await supervisor.start()
        states = await wait_ready(
            {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}, 90
        )
        not_ready = {name: why for name, (ok, why) in states.items() if not ok}
        if not_ready:
            raise PlatformError(f"pass-through stages not ready within 90s: {not_ready}")
        yield platform, {**{n: supervisor.pid(n) for n in STAGES}, **platform.pids()}
    finally:
        try:
            if supervisor is not None:
                codes = await supervisor.stop()
                bad = {n: c for n, c in codes.items() if c not in (0, None)}
                if bad:
                    raise PlatformError(f"pass-through stages exited with errors: {bad}")
        finally:
            await platform.stop()


async def measure(
    platform: Platform, pids: dict[str, int | None], events: list[bytes]
) -> list[Result]:
    """Publish `events` as the throughput measure does; first publish to last membership."""
    n = len(events)
    seen = Memberships()
    watcher = await platform.connect("cdp-bench-memberships")
    nc = await platform.connect("cdp-bench")
    try:
        await watcher.subscribe(
            subjects.MEMBERSHIP_ALL, cb=seen.on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1
        )
        await watcher.flush()
        js = nc.jetstream()
        before = procs.CpuSample.take(pids)
        started = time.perf_counter()
        async with bounded("bare pipeline: publishing", limit_for(n, 500)):
            await publish_all(js, events)
        published_s = time.perf_counter() - started
        async with bounded("bare pipeline: every membership event", limit_for(n, 300)):
            await until(lambda: len(seen.ids) >= n)
            await drained(js)
        last = seen.last_at
        spent = procs.cpu_spent(before, procs.CpuSample.take(pids))
        made = await stream_last_seq(js, subjects.STREAM_MEMBERSHIP.name)
    finally:
        await nc.close()
        await watcher.close()
    if made != n or len(seen.ids) != n:
        raise PlatformError(
            f"bare pipeline: {made} membership events stored, {len(seen.ids)} received, "
            f"for {n} events"
        )
    return [
        rate(
            NAME,
            "events/s",
            n,
            last - started,
            f"{n:,} web events through six pass-through processes (the platform's streams, "
            f"subjects, fetch batches and outbox; one membership event per event), acked "
            f"JetStream publishes in windows of 1,000: first publish to the last membership "
            f"event (publishing alone took {published_s:.1f}s)",
        ),
        *procs.cpu_results(MEASURE, spent, n),
    ]


async def run(progress: Progress, scale: Scale | None = None) -> list[Result]:
    scale = scale or Scale()
    with tempfile.TemporaryDirectory(prefix="cdp-bench-") as tmp:
        folder = Path(tmp)
        progress(f"generating the web events of {scale.stream_profiles:,} people (scripts/gen)")
        await asyncio.to_thread(
            generate, folder / "stream", scale.stream_profiles, scale.events_per_profile
        )
        events, _ = restamped_events(folder / "stream" / "web.jsonl", time.time())
        progress("starting nats-server and six pass-through processes")
        async with pipeline_up(folder) as (platform, pids):
            progress(f"bare pipeline: {len(events):,} events")
            results = await measure(platform, pids, events)
    first = results[0]
    progress(f"{first.name}: {first.value:,.0f} {first.unit}")
    return results
