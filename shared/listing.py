"""Paged listings of a service's state, for `cdp check` (the invariant check).

A service declares named listings: a SQL query over its own tables whose first column is
the cursor (a rowid), with two parameters (the cursor to start after, the page size). The admin
request `cdp.admin.<service>.check.list` returns one page at a time, so that a client can
read millions of rows without any one reply growing past the message size limit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiosqlite
import msgspec
from nats.aio.client import Client
from nats.aio.subscription import Subscription

from shared import admin, subjects
from shared.admin import AdminFailure

MAX_PAGE = 20_000


class ListRequest(msgspec.Struct, kw_only=True):
    what: str
    after: str = ""
    limit: int = 5_000


class ListPage(msgspec.Struct, kw_only=True):
    rows: list[list[Any]]
    next: str | None = None
    """The key to ask for the next page after; None when this page is the last."""


async def serve_listings(
    nc: Client, service: str, db: aiosqlite.Connection, queries: Mapping[str, str]
) -> Subscription:
    """Answer `cdp.admin.<service>.check.list` with pages of `queries[what]`."""

    async def handle(request: ListRequest) -> ListPage:
        sql = queries.get(request.what)
        if sql is None:
            raise AdminFailure(
                "invalid",
                f"unknown listing {request.what!r} (one of {', '.join(sorted(queries))})",
                field="what",
            )
        if not 0 < request.limit <= MAX_PAGE:
            raise AdminFailure("invalid", f"limit must be in 1..{MAX_PAGE}", field="limit")
        try:
            after = int(request.after or 0)
        except ValueError:
            raise AdminFailure(
                "invalid", "after must be a cursor of a page", field="after"
            ) from None
        rows = [list(r) for r in await db.execute_fetchall(sql, (after, request.limit))]
        more = len(rows) == request.limit
        return ListPage(rows=rows, next=str(rows[-1][0]) if more else None)

    return await admin.serve(nc, subjects.admin(service, "check.list"), ListRequest, handle)


async def read_all(nc: Client, service: str, what: str, page: int = 5_000) -> list[list[Any]]:
    """Every row of a service's listing, page by page, without the cursor column."""
    out: list[list[Any]] = []
    after = ""
    while True:
        got = await admin.request(
            nc,
            subjects.admin(service, "check.list"),
            ListRequest(what=what, after=after, limit=page),
            ListPage,
            timeout=30.0,
        )
        out += [r[1:] for r in got.rows]
        if got.next is None:
            return out
        after = got.next
