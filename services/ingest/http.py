"""The HTTP door: POST /v1/datasets/<dataset>/records (one JSON record or an array).

Each record is validated at once, for the answer, and then published to
`cdp.ingest.<dataset>` like any NATS client would, so that one path (the consumer)
ingests the good ones and keeps the bad ones in the error store. The answer is 202 with
the record ids when every record is valid, else 400 with an error per rejected record
(the valid ones of the same request are ingested all the same).

A record is reported rejected only when it is known not to be stored. While NATS is
unreachable the door answers 503 at once; a publish whose outcome is unknown (no
acknowledgement in time, the connection lost) makes the answer 503 too: the client sends
the request again with the same `Idempotency-Key`, whose records keep their message ids
(`Nats-Msg-Id`, one per record: the key and the record's index), so JetStream stores
each record once however often it is sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import nats.errors
import structlog
from aiohttp import web
from nats.js import JetStreamContext
from nats.js.api import PubAck

from services.ingest.records import rejected
from services.ingest.state import IngestState
from services.ingest.store import Store
from services.ingest.validation import Accepted, Problem
from shared import subjects
from shared.db import Tx
from shared.subjects import MAX_PAYLOAD

ROUTE = "/v1/datasets/{dataset}/records"
MAX_BODY_BYTES = MAX_PAYLOAD - 64 * 1024
MAX_RECORDS_PER_REQUEST = 10_000
MAX_KEY_CHARS = 200
PUBLISH_TIMEOUT = 5.0
"""Seconds to wait for JetStream's acknowledgement of a record before answering 503."""
RETRY_AFTER_S = 1

_any_decoder = msgspec.json.Decoder()
_JSON_SPACE = b" \t\n\r"
_encoder = msgspec.json.Encoder()


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _unavailable(message: str, **extra: Any) -> web.Response:
    """503: nothing the client sent is lost by retrying (with the same Idempotency-Key)."""
    response = web.json_response(
        {"error": {"code": "unavailable", "message": message}, **extra}, status=503
    )
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


def message_ids(dataset: str, key: str, count: int) -> list[str]:
    """The Nats-Msg-Id of each record of a request: derived from its dataset, its
    Idempotency-Key and the record's index, so that a retried request has the same ids."""
    digest = hashlib.sha256(f"{dataset}\n{key}".encode()).hexdigest()[:32]
    return [f"http:{digest}:{i}" for i in range(count)]


def _valid_key(key: str) -> bool:
    return 0 < len(key) <= MAX_KEY_CHARS and key.isascii() and key.isprintable()


def _known_not_stored(exc: BaseException) -> bool:
    """Whether a failed publish certainly stored nothing, for a reason retrying cannot
    change (the record is too big for NATS). Every other failure (no acknowledgement in
    time, connection lost, JetStream unavailable or out of storage) is worth a retry."""
    return isinstance(exc, nats.errors.MaxPayloadError)


def split_body(body: bytes) -> list[bytes]:
    """One JSON record, or the elements of a JSON array; anything else is one (bad) record:
    malformed JSON, invalid UTF-8 in a string, or nesting too deep to read (msgspec raises
    UnicodeDecodeError and RecursionError for those, not DecodeError). Only a body that
    begins with `[` can be an array: any other is one record as it is, without decoding it
    here (the validator decodes it once)."""
    if not body.lstrip(_JSON_SPACE).startswith(b"["):
        return [body]
    try:
        value = _any_decoder.decode(body)
    except (msgspec.DecodeError, UnicodeError, RecursionError):
        return [body]
    if isinstance(value, list):
        return [_encoder.encode(v) for v in value]
    return [body]


@dataclass(frozen=True)
class Health:
    """What the door asks of, and tells, the process it runs in."""

    ready: Callable[[], bool]
    """Whether the service is started (and not stopping)."""
    connected: Callable[[], bool]
    """Whether the NATS connection is up now."""
    publish_failed: Callable[[str], None]
    publish_succeeded: Callable[[], None]


def not_ready() -> web.Response:
    return _error(503, "not_ready", "the ingest service is starting or stopping")


class HttpDoor:
    def __init__(
        self,
        *,
        state: IngestState,
        store: Store,
        js: JetStreamContext,
        health: Health,
        token: str | None,
    ) -> None:
        self.state = state
        self.store = store
        self.js = js
        self.health = health
        self.token = token
        self.log = structlog.get_logger(service="ingest", door="http")

    def _authorized(self, request: web.Request) -> bool:
        token = self.token
        if token is None:
            return True
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), token.encode()
        )

    async def post_records(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            response = _error(
                401, "unauthorized", "this door needs `Authorization: Bearer <CDP_INGEST_TOKEN>`"
            )
            response.headers["WWW-Authenticate"] = 'Bearer realm="cdp-ingest"'
            return response
        if not self.health.ready():
            return not_ready()
        key = request.headers.get("Idempotency-Key")
        if key is not None and not _valid_key(key):
            return _error(
                400,
                "bad_idempotency_key",
                f"Idempotency-Key: 1 to {MAX_KEY_CHARS} printable ASCII characters",
            )
        if not self.health.connected():
            # Fail fast: holding the request for a publish timeout helps nobody.
            return _unavailable("NATS is unreachable; nothing was stored, retry later")
        dataset = request.match_info["dataset"]
        found = self.state.compiled(dataset)
        if found is None:
            return _error(404, "unknown_dataset", f"no dataset named {dataset!r}")
        _, compiled = found
        body = await request.read()
        items = split_body(body)
        if not items:
            return _error(400, "no_records", "the body is an empty array: no record to ingest")
        if len(items) > MAX_RECORDS_PER_REQUEST:
            return _error(
                400,
                "too_many_records",
                f"{len(items)} records in one request; at most {MAX_RECORDS_PER_REQUEST}",
            )
        results = [compiled.validate_json(item) for item in items]
        request_id = key or uuid.uuid4().hex
        ids = message_ids(dataset, request_id, len(items))
        subject = subjects.ingest(dataset)
        acks = await self._publish(subject, items, ids)
        accepted: list[dict[str, Any]] = []
        rejected: list[dict[str, Any]] = []
        unpublished: list[tuple[int, bytes, list[Problem]]] = []
        unknown: list[int] = []
        failure: BaseException | None = None
        for i, (item, result, ack) in enumerate(zip(items, results, acks, strict=True)):
            if isinstance(ack, BaseException):
                if not _known_not_stored(ack):
                    unknown.append(i)
                    failure = failure or ack
                    continue
                problems = (
                    result
                    if isinstance(result, list)
                    else [Problem("not stored", "", "a record NATS can carry", type(ack).__name__)]
                )
                unpublished.append((i, item, problems))
                rejected.append({"index": i, "record_id": None, "errors": _errors(problems)})
                continue
            record_id = self.state.record_id(ack.seq)
            if isinstance(result, Accepted):
                accepted.append({"index": i, "record_id": record_id})
            else:
                rejected.append({"index": i, "record_id": record_id, "errors": _errors(result)})
        if unpublished:
            await self._keep_unpublished(dataset, request_id, unpublished)
        if unknown:
            self.health.publish_failed(
                "nats: JetStream storage full or unavailable "
                f"(a publish was not acknowledged: {type(failure).__name__})"
            )
            self.log.warning(
                "records not acknowledged", dataset=dataset, count=len(unknown), error=repr(failure)
            )
            return _unavailable(
                f"{len(unknown)} record(s) not acknowledged by NATS "
                f"({type(failure).__name__}): they may or may not be stored; "
                "retry with the same Idempotency-Key, which stores each record once",
                dataset=dataset,
                idempotency_key=request_id,
                unknown=unknown,
                accepted=accepted,
                rejected=rejected,
            )
        self.health.publish_succeeded()
        body_out = {"dataset": dataset, "accepted": accepted, "rejected": rejected}
        return web.Response(
            body=_encoder.encode(body_out),
            status=400 if rejected else 202,
            content_type="application/json",
            charset="utf-8",
        )

    async def _publish(
        self, subject: str, items: list[bytes], ids: list[str]
    ) -> list[PubAck | BaseException]:
        """Publish each record with its message id, all in flight at once; each one's
        acknowledgement or error, in order (one record, the most common request: awaited
        as it is, without a task around it)."""
        if len(items) == 1:
            try:
                ack = await self.js.publish(
                    subject, items[0], timeout=PUBLISH_TIMEOUT, headers={"Nats-Msg-Id": ids[0]}
                )
            except Exception as exc:
                return [exc]
            return [ack]
        return await asyncio.gather(
            *(
                self.js.publish(
                    subject, item, timeout=PUBLISH_TIMEOUT, headers={"Nats-Msg-Id": msg_id}
                )
                for item, msg_id in zip(items, ids, strict=True)
            ),
            return_exceptions=True,
        )

    async def _keep_unpublished(
        self, dataset: str, request_id: str, rows: list[tuple[int, bytes, list[Problem]]]
    ) -> None:
        """A record NATS could not take is still kept, in the error store, with its reason."""
        tx = Tx()
        now = time.time()
        self.store.add_rejected(
            tx,
            (
                rejected(
                    record_id=f"http-{request_id}-{i}",
                    dataset=dataset,
                    problems=problems,
                    payload=item,
                    source="http",
                    now=now,
                )
                for i, item, problems in rows
            ),
        )
        await self.store.apply(tx)


def _errors(problems: list[Problem]) -> list[dict[str, str]]:
    return [msgspec.structs.asdict(p) for p in problems]
