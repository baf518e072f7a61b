"""A step takes a bounded share of a fetch: the runtime cuts a fetch of many large
messages into steps of at most `step_max_bytes` of payload, applied and committed in order."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.config import load_settings
from shared.db import Migration
from shared.runtime.actor import Delivery, Step, split_steps
from shared.runtime.harness import StepHarness

NOTES = (Migration("notes", 1, "CREATE TABLE notes (seq INTEGER PRIMARY KEY, size INTEGER)"),)


class Recorder:
    """A handler that remembers the payload bytes of each step it was given."""

    def __init__(self) -> None:
        self.steps: list[list[int]] = []

    async def __call__(self, step: Step) -> None:
        self.steps.append([len(d.data) for d in step.deliveries])
        for d in step.deliveries:
            if d.data.startswith(b"boom"):
                raise ValueError("boom")
            step.tx.add("INSERT INTO notes (seq, size) VALUES (?, ?)", (d.seq, len(d.data)))
            step.emit(f"out.{d.seq}", b"")


@pytest.mark.asyncio
async def test_no_step_takes_more_payload_than_the_bound() -> None:
    async with StepHarness.open(NOTES) as h:
        handler = Recorder()
        deliveries = [h.delivery("in", b"x" * 1000) for _ in range(10)]
        out = await h.run(handler, deliveries, max_step_bytes=3500)
        assert handler.steps == [[1000] * 3, [1000] * 3, [1000] * 3, [1000]]
        assert out.handled == 10


@pytest.mark.asyncio
async def test_the_steps_of_a_fetch_emit_and_commit_in_stream_order() -> None:
    async with StepHarness.open(NOTES) as h:
        deliveries = [h.delivery("in", b"x" * 1000) for _ in range(10)]
        out = await h.run(Recorder(), deliveries, max_step_bytes=3500)
        assert [m.subject for m in out.messages] == [f"out.{i}" for i in range(1, 11)]
        assert len({m.msg_id for m in out.messages}) == 10
        rows = await h.db.execute_fetchall("SELECT seq FROM notes ORDER BY seq")
        assert [r[0] for r in rows] == list(range(1, 11))
        offset = await h.db.execute_fetchall("SELECT stream_seq FROM rt_offsets")
        assert [r[0] for r in offset] == [10]


@pytest.mark.asyncio
async def test_a_message_larger_than_the_bound_is_a_step_alone() -> None:
    async with StepHarness.open(NOTES) as h:
        handler = Recorder()
        sizes = [10, 5000, 10]
        await h.run(handler, [h.delivery("in", b"x" * n) for n in sizes], max_step_bytes=100)
        assert handler.steps == [[10], [5000], [10]]


@pytest.mark.asyncio
async def test_a_failing_message_is_retried_alone_within_its_own_step_only() -> None:
    async with StepHarness.open(NOTES) as h:
        handler = Recorder()
        data = [b"a" * 60, b"b" * 60, b"boom" + b"c" * 56, b"d" * 60]
        out = await h.run(handler, [h.delivery("in", x) for x in data], max_step_bytes=130)
        assert handler.steps == [[60, 60], [60, 60], [60], [60]]
        assert (out.handled, out.failed) == (3, 1)
        assert [f[0] for f in await h.failed()] == [3]


def test_the_step_bound_is_a_setting_with_a_default() -> None:
    assert load_settings("profile", {}).step_max_bytes == 4 * 1024 * 1024
    assert load_settings("profile", {"CDP_STEP_MAX_BYTES": "1000"}).step_max_bytes == 1000


@given(st.lists(st.integers(0, 300)), st.integers(1, 500))
def test_steps_keep_every_delivery_in_order_and_within_the_bound(
    sizes: list[int], bound: int
) -> None:
    deliveries = [Delivery("in", b"x" * n, i + 1) for i, n in enumerate(sizes)]
    steps = split_steps(deliveries, bound) if deliveries else []
    assert [d for s in steps for d in s] == deliveries
    for s in steps:
        assert s and (len(s) == 1 or sum(len(d.data) for d in s) <= bound)
