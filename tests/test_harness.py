"""The handler-level harness runs a step as the runtime does, with no NATS."""

from __future__ import annotations

import pytest

from shared.admin import AdminError, AdminFailure, Conflict, Invalid, NotFound
from shared.db import Migration
from shared.runtime.actor import Step
from shared.runtime.harness import StepHarness

NOTES = (Migration("notes", 1, "CREATE TABLE notes (seq INTEGER PRIMARY KEY, text TEXT)"),)


async def remember(batch: Step) -> None:
    for d in batch.deliveries:
        if d.data == b"boom":
            raise ValueError("boom")
        batch.tx.add("INSERT INTO notes (seq, text) VALUES (?, ?)", (d.seq, d.data.decode()))
        batch.emit(f"out.{d.seq}", d.data.upper())


@pytest.mark.asyncio
async def test_a_step_commits_its_writes_and_returns_its_outbox_in_order() -> None:
    async with StepHarness.open(NOTES) as h:
        out = await h.run(remember, [h.delivery("in", b"a"), h.delivery("in", b"b")])
        assert [(m.subject, m.payload) for m in out.messages] == [("out.1", b"A"), ("out.2", b"B")]
        rows = await h.db.execute_fetchall("SELECT seq, text FROM notes ORDER BY seq")
        assert [tuple(r) for r in rows] == [(1, "a"), (2, "b")]
        offset = await h.db.execute_fetchall("SELECT stream_seq FROM rt_offsets")
        assert [r[0] for r in offset] == [2]


@pytest.mark.asyncio
async def test_a_failing_message_is_kept_with_its_error_and_the_others_applied() -> None:
    async with StepHarness.open(NOTES) as h:
        out = await h.run(remember, [h.delivery("in", b"a"), h.delivery("in", b"boom")])
        assert (out.handled, out.failed) == (1, 1)
        assert [m.subject for m in out.messages] == ["out.1"]
        assert await h.failed() == [(2, "in", "ValueError: boom")]


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("not_found", NotFound),
        ("invalid", Invalid),
        ("cycle", Invalid),
        ("conflict", Conflict),
        ("breaking_change", Conflict),
        ("internal", AdminFailure),
    ],
)
def test_an_admin_error_comes_back_as_its_kind(code: str, kind: type[AdminFailure]) -> None:
    failure = AdminFailure.from_error(AdminError(code, "why", kind="segment", name="vip"))
    assert type(failure) is kind
    assert (failure.code, failure.message, failure.name) == (code, "why", "vip")
    assert failure.to_error() == AdminError(code, "why", "segment", "vip")
