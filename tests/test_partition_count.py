"""The partition count is fixed at the first set-up: the partitioned streams record it,
and neither a later set-up nor a service started with another CDP_PARTITIONS may go on
with it (profiles would be looked for on other partitions than they were put on)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from nats.aio.client import Client
from typer.testing import CliRunner

from ops.cli.main import app
from ops.natsd import NatsServer
from services.scheduler.service import SchedulerService
from shared import subjects
from shared.config import load_settings
from shared.errors import StartupError
from shared.streams import PartitionCountFixed, ensure_streams, recorded_partitions

pytestmark = pytest.mark.asyncio


async def _recorded(nc: Client) -> dict[str, int | None]:
    js = nc.jetstream()
    return {
        spec.name: recorded_partitions((await js.stream_info(spec.name)).config)
        for spec in subjects.ALL_STREAMS
    }


async def test_a_set_up_records_the_count_and_another_is_refused(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    js = nc.jetstream()
    await ensure_streams(js, partitions=8)
    recorded = await _recorded(nc)
    partitioned = {s.name for s in subjects.ALL_STREAMS if s.partitioned}
    assert partitioned == {"CDP_PROFILES", "CDP_CHANGES", "CDP_MEMBERS", "CDP_HANDOFFS"}
    assert {n: c for n, c in recorded.items() if c is not None} == dict.fromkeys(partitioned, 8)

    await ensure_streams(js, partitions=8)  # the same again: nothing to say
    await js.publish(subjects.profiles(3), b"kept")
    with pytest.raises(PartitionCountFixed) as refused:
        await ensure_streams(js, partitions=16, replicas=1)
    assert refused.value.recorded == 8 and refused.value.asked == 16
    assert "CDP_PARTITIONS=8" in str(refused.value)
    assert await _recorded(nc) == recorded
    assert (await js.stream_info("CDP_PROFILES")).state.messages == 1

    # `cdp setup` says so and fails, changing nothing.
    env = {"CDP_NATS_URL": nats_server.url, "CDP_PARTITIONS": "16"}
    result = await asyncio.to_thread(CliRunner().invoke, app, ["setup"], env=env)
    assert result.exit_code == 1, result.output
    assert "set up with 8 partitions" in " ".join(result.output.split())
    assert await _recorded(nc) == recorded

    # A service started with another count does not start.
    settings = load_settings(
        "scheduler",
        {
            "CDP_NATS_URL": nats_server.url,
            "CDP_DATA_DIR": str(tmp_path / "sched"),
            "CDP_SCHEDULER_PORT": "0",
            "CDP_PARTITIONS": "16",
        },
    )
    service = SchedulerService(settings)
    try:
        with pytest.raises(StartupError, match="CDP_PARTITIONS"):
            await asyncio.wait_for(service.start(), 30)
    finally:
        await service.stop()


async def test_streams_set_up_before_the_count_was_recorded_get_it(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    for spec in subjects.ALL_STREAMS:  # as an older set-up left them: no count recorded
        config = (await js.stream_info(spec.name)).config
        config.metadata = {}
        await js.update_stream(config)
    assert set((await _recorded(nc)).values()) == {None}
    await ensure_streams(js)  # without a count: none recorded either
    assert set((await _recorded(nc)).values()) == {None}
    await ensure_streams(js, partitions=4)
    assert (await _recorded(nc))["CDP_CHANGES"] == 4
