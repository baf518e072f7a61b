"""The two pieces the ordering contract stands on, without NATS: SQLite writes run in the
order they were added, and per-partition output never puts an item about a profile before
an earlier one."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.db import Tx, apply, open_db
from shared.runtime.partitioned import PartitionedOutput


@pytest.mark.asyncio
async def test_writes_run_in_the_order_they_were_added(tmp_path: Path) -> None:
    """An insert added after an update of the same rows is not moved by it (the field bug:
    an event inserted after a merge's move stayed on the folded profile)."""
    db = await open_db(tmp_path / "t.db")
    try:
        await db.execute("CREATE TABLE events (id TEXT PRIMARY KEY, profile TEXT)")
        tx = Tx()
        insert = "INSERT INTO events (id, profile) VALUES (?, ?)"
        move = "UPDATE events SET profile = ? WHERE profile = ?"
        tx.add(insert, ("e1", "X"))
        tx.add(move, ("S", "X"))
        tx.add(insert, ("e2", "X"))  # after the move: stays on X
        tx.add(insert, ("e3", "X"))
        assert tx.statements == 3, "consecutive rows of one statement go in one call"
        await apply(db, tx)
        got = await db.execute_fetchall("SELECT id, profile FROM events ORDER BY id")
        assert [tuple(r) for r in got] == [("e1", "S"), ("e2", "X"), ("e3", "X")]
    finally:
        await db.close()


Op = tuple[str, int, tuple[int, ...]]


@st.composite
def operations(draw: st.DrawFn) -> list[Op]:
    """Items about one profile ("one", partition) or several ("across", host, others)."""
    n = draw(st.integers(1, 60))
    out: list[Op] = []
    for _ in range(n):
        if draw(st.booleans()):
            out.append(("one", draw(st.integers(0, 3)), ()))
        else:
            host = draw(st.integers(0, 3))
            others = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
            out.append(("across", host, others))
    return out


@given(ops=operations(), size=st.integers(1, 5))
def test_no_item_is_published_before_an_earlier_item_of_a_partition_it_involves(
    ops: list[Op], size: int
) -> None:
    out: PartitionedOutput[int] = PartitionedOutput(
        lambda p: f"s.{p}", lambda items: ",".join(map(str, items)).encode(), 4, max_items=size
    )
    involves: dict[int, set[int]] = {}
    for i, (kind, host, others) in enumerate(ops):
        if kind == "one":
            out.add(host, i)
            involves[i] = {host}
        else:
            out.add_across(host, others, i)
            involves[i] = {host, *others}
    published = [
        (int(subject.split(".")[1]), [int(x) for x in body.decode().split(",")])
        for subject, body in out.messages()
    ]
    position = {item: n for n, (_, items) in enumerate(published) for item in items}
    assert sorted(position) == list(range(len(ops))), "every item once"
    for partition, items in published:
        assert items == sorted(items), "a message keeps its items' order"
        assert all(partition in involves[i] for i in items)
    for a in range(len(ops)):
        for b in range(a + 1, len(ops)):
            if involves[a] & involves[b] and (len(involves[a]) > 1 or len(involves[b]) > 1):
                assert position[a] <= position[b], (a, b)
            if involves[a] == involves[b] == {next(iter(involves[a]))}:
                assert position[a] <= position[b], (a, b)
