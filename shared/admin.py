"""The admin API: typed NATS request/reply under `cdp.admin.>`.

Every reply is an `AdminReply`: `ok` with a `result`, or an `AdminError` that names the
object and the field at fault. Requests and replies are JSON so that any client can
drive the platform; the `cdp` CLI is only one such client.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import msgspec
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from shared.errors import CdpError
from shared.resources import PLURALS

T = TypeVar("T")
R = TypeVar("R", bound=msgspec.Struct)


class AdminError(msgspec.Struct, omit_defaults=True):
    code: str
    message: str
    kind: str | None = None
    name: str | None = None
    field: str | None = None


class AdminReply(msgspec.Struct, omit_defaults=True):
    ok: bool
    result: Any = None
    error: AdminError | None = None


class AdminFailure(CdpError):
    """An admin request refused, with where the problem is.

    Raise one of its kinds (`NotFound`, `Invalid`, `Conflict`); the admin client raises
    the same kind on the caller's side (`from_error`), so callers catch by type, never by
    comparing codes. The code travels in the reply for clients in other languages.
    """

    code = "failed"

    def __init__(
        self,
        code: str,
        message: str,
        *,
        kind: str | None = None,
        name: str | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.kind = kind
        self.name = name
        self.field = field

    def to_error(self) -> AdminError:
        return AdminError(self.code, self.message, self.kind, self.name, self.field)

    @classmethod
    def from_error(cls, e: AdminError) -> AdminFailure:
        """The failure a reply carries, as the kind its code names."""
        kind = _KINDS.get(e.code, AdminFailure)
        failure = AdminFailure.__new__(kind)
        AdminFailure.__init__(failure, e.code, e.message, kind=e.kind, name=e.name, field=e.field)
        return failure

    def where(self) -> str:
        parts = []
        if self.kind:
            parts.append(f'{self.kind} "{self.name}"' if self.name else self.kind)
        if self.field:
            parts.append(f"field {self.field}")
        return ": ".join(parts)


class NotFound(AdminFailure):
    """The object, batch, job or person asked for does not exist."""

    def __init__(
        self,
        message: str,
        *,
        kind: str | None = None,
        name: str | None = None,
        field: str | None = None,
        code: str = "not_found",
    ) -> None:
        super().__init__(code, message, kind=kind, name=name, field=field)


class Invalid(AdminFailure):
    """The request or the object it carries is wrong: a field, a syntax, a cycle, an
    unknown kind. `code` says which (`invalid` unless more precise)."""

    def __init__(
        self,
        message: str,
        *,
        kind: str | None = None,
        name: str | None = None,
        field: str | None = None,
        code: str = "invalid",
    ) -> None:
        super().__init__(code, message, kind=kind, name=name, field=field)


class Conflict(AdminFailure):
    """The request is valid but the current state refuses it: a breaking change, a job
    already running, an object in use."""

    def __init__(
        self,
        message: str,
        *,
        kind: str | None = None,
        name: str | None = None,
        field: str | None = None,
        code: str = "conflict",
    ) -> None:
        super().__init__(code, message, kind=kind, name=name, field=field)


_KINDS: dict[str, type[AdminFailure]] = {
    "not_found": NotFound,
    "invalid": Invalid,
    "syntax": Invalid,
    "cycle": Invalid,
    "unknown_kind": Invalid,
    "malformed": Invalid,
    "conflict": Conflict,
    "breaking_change": Conflict,
}
"""Which kind each code is (codes not named here stay plain `AdminFailure`)."""


# -- requests and results -------------------------------------------------------------
class Change(msgspec.Struct):
    path: str
    before: Any
    after: Any


class ApplyRequest(msgspec.Struct):
    kind: str
    spec: dict[str, Any]
    dry_run: bool = False


class ApplyResult(msgspec.Struct):
    kind: str
    name: str
    action: Literal["created", "updated", "unchanged"]
    changes: list[Change] = []


class GetRequest(msgspec.Struct):
    kind: str
    name: str | None = None


class GetResult(msgspec.Struct):
    kind: str
    items: list[dict[str, Any]]


_VALIDATION_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")


def validation_failure(kind: str, name: str | None, exc: msgspec.ValidationError) -> AdminFailure:
    """Turn msgspec's "Expected `int`, got `str` - at `$.fields.age`" into an AdminFailure."""
    text = str(exc)
    m = _VALIDATION_PATH.search(text)
    field = m.group("path").lstrip(".") if m else None
    message = _VALIDATION_PATH.sub("", text)
    return AdminFailure("invalid", message, kind=kind, name=name, field=field or None)


def diff(before: Any, after: Any, path: str = "") -> list[Change]:
    """Field-by-field differences between two specs (as builtins), with dotted paths."""
    if isinstance(before, dict) and isinstance(after, dict):
        out: list[Change] = []
        for key in sorted(set(before) | set(after), key=str):
            sub = f"{path}.{key}" if path else str(key)
            out += diff(before.get(key), after.get(key), sub)
        return out
    return [] if before == after else [Change(path or "(all)", before, after)]


def apply_result(
    kind: str, name: str, current: msgspec.Struct | None, new: msgspec.Struct
) -> ApplyResult:
    """What applying `new` over `current` (None: nothing yet) does."""
    after = msgspec.to_builtins(new)
    if current is None:
        return ApplyResult(kind, name, "created", diff({}, after))
    changes = diff(msgspec.to_builtins(current), after)
    return ApplyResult(kind, name, "updated" if changes else "unchanged", changes)


S = TypeVar("S", bound=msgspec.Struct)


def decode_object(obj: ConfigObject, kind: str, owner: str, spec_type: type[S]) -> S:
    """A configuration object of `kind`, decoded strictly; errors name object and field.

    `owner` (the service answering) refuses objects of any other kind."""
    got = PLURALS.get(obj.kind, obj.kind)
    if got != kind:
        raise AdminFailure("unknown_kind", f"the {owner} service does not own {got!r}", kind=got)
    try:
        return msgspec.convert(obj.spec, spec_type)
    except msgspec.ValidationError as exc:
        raise validation_failure(kind, spec_name(obj.spec), exc) from None


def spec_name(spec: dict[str, Any]) -> str | None:
    value = spec.get("name", spec.get("symbol"))
    return value if isinstance(value, str) else None


def object_name(kind: str, spec: dict[str, Any]) -> str | None:
    """The key of an object of `kind`: a namespace's symbol, any other object's name."""
    value = spec.get("symbol" if kind == "namespace" else "name")
    return value if isinstance(value, str) else None


# -- server side -----------------------------------------------------------------------
_reply_encoder = msgspec.json.Encoder()

REPLY_ROOTS: tuple[str, ...] = ("_INBOX.", "_INBOX_", "_R_.")
"""Where an answer may go: a connection's inbox (`_INBOX.` or a key's own `_INBOX_<name>.`)
or the response subject nats-server maps an application's request to (`_R_.`)."""

refused_replies = 0
"""Requests dropped unanswered because their reply subject was not an inbox."""


def answerable(msg: Msg, log: Any = None) -> bool:
    """Whether a request may be answered: it has a reply subject, and that subject is an
    inbox or a cross-account response subject. Any other reply subject (an internal
    stream's, a membership subject) is a trick to make a service publish there: the
    request is dropped, logged and counted, and never answered."""
    global refused_replies  # noqa: PLW0603 - one process-wide count, read by /metrics
    reply = msg.reply
    if not reply:
        return False
    if reply.startswith(REPLY_ROOTS) and " " not in reply:
        return True
    refused_replies += 1
    (log or structlog.get_logger()).warning(
        "request dropped: reply subject is not an inbox", subject=msg.subject, reply=reply[:80]
    )
    return False


async def serve(
    nc: Client,
    subject: str,
    request_type: type[R],
    handler: Callable[[R], Awaitable[Any]],
    *,
    queue: str = "",
) -> Subscription:
    """Answer requests on `subject`: decode `request_type`, run `handler`, reply."""
    decoder = msgspec.json.Decoder(request_type)
    log = structlog.get_logger(admin=subject)

    async def on_msg(msg: Msg) -> None:
        if not answerable(msg, log):
            return
        try:
            request = decoder.decode(msg.data)
            result = await handler(request)
            reply = AdminReply(ok=True, result=result)
        except msgspec.ValidationError as exc:
            reply = AdminReply(ok=False, error=validation_failure("request", None, exc).to_error())
        except msgspec.DecodeError as exc:
            reply = AdminReply(ok=False, error=AdminError("malformed", f"malformed request: {exc}"))
        except AdminFailure as exc:
            reply = AdminReply(ok=False, error=exc.to_error())
        except Exception as exc:
            log.exception("admin request failed")
            reply = AdminReply(
                ok=False, error=AdminError("internal", f"{type(exc).__name__}: {exc}")
            )
        await msg.respond(_reply_encoder.encode(reply))

    return await nc.subscribe(subject, queue=queue or subject, cb=on_msg)


Endpoint = tuple[str, type[msgspec.Struct], Callable[[Any], Awaitable[Any]]]


async def serve_all(nc: Client, endpoints: list[Endpoint]) -> list[Subscription]:
    """Answer several admin subjects: (subject, request type, handler) each."""
    return [await serve(nc, subject, rtype, handler) for subject, rtype, handler in endpoints]


async def unsubscribe_all(subs: list[Subscription]) -> None:
    """Stop answering; a connection already draining or closed is fine."""
    for sub in subs:
        try:
            await sub.unsubscribe()
        except Exception as exc:
            structlog.get_logger().debug("unsubscribe failed", error=repr(exc))
    subs.clear()


# -- client side -------------------------------------------------------------------------
async def request(
    nc: Client, subject: str, payload: msgspec.Struct, result_type: type[T], timeout: float = 10.0
) -> T:
    """Send an admin request; return the typed result or raise AdminFailure."""
    msg = await nc.request(subject, _reply_encoder.encode(payload), timeout=timeout)
    reply = msgspec.json.decode(msg.data, type=AdminReply)
    if not reply.ok:
        raise AdminFailure.from_error(reply.error or AdminError("internal", "no error given"))
    return msgspec.convert(reply.result, result_type)


# -- configuration (cdp apply / cdp get) --------------------------------------------------
class ConfigObject(msgspec.Struct):
    kind: str
    spec: dict[str, Any]


class ApplyMany(msgspec.Struct):
    """Objects owned by one service, applied in order, all or none."""

    objects: list[ConfigObject]
    dry_run: bool = False
    context: list[ConfigObject] = []
    """Dry runs only: the objects of the same file that come before these (owned by other
    services, sent to them first). A dry run stores nothing, so the owner counts their
    names as known when it checks references (`known`). A real apply ignores them: by then
    they are stored."""

    def known(self, kind: str) -> set[str]:
        """Names of the objects of `kind` in `context` (none unless this is a dry run)."""
        if not self.dry_run:
            return set()
        names = (
            object_name(kind, o.spec) for o in self.context if PLURALS.get(o.kind, o.kind) == kind
        )
        return {n for n in names if n is not None}


class ApplyManyResult(msgspec.Struct):
    results: list[ApplyResult]


# -- batch ingestion (cdp ingest / cdp batches / cdp errors) ----------------------------------
class BatchStart(msgspec.Struct):
    batch_id: str
    dataset: str
    file_name: str
    format: str


class BatchInfo(msgspec.Struct, kw_only=True):
    batch_id: str
    dataset: str
    file_name: str
    format: str
    status: str
    """queued, validating, ingesting, success, partial, failed"""
    input_rows: int = 0
    accepted: int = 0
    failed: int = 0
    threshold: float = 0.05
    error: str | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    progress: float = 0.0
    """Fraction of the current phase done, 0..1."""

    @property
    def finished(self) -> bool:
        return self.status in ("success", "partial", "failed")


class ListRequest(msgspec.Struct):
    limit: int = 50


class BatchListResult(msgspec.Struct):
    batches: list[BatchInfo]


class ErrorsQuery(msgspec.Struct):
    target: str
    """A dataset name or a batch id."""
    limit: int = 100


class RejectedRecord(msgspec.Struct, kw_only=True):
    record_id: str
    dataset: str
    batch_id: str | None
    row_number: int | None
    source: str
    reason: str
    path: str
    expected: str
    got: str
    problems: list[dict[str, str]]
    payload: str
    rejected_at: float


class ErrorsResult(msgspec.Struct):
    target: str
    total: int
    records: list[RejectedRecord]
    dropped: int = 0
    """Rejected records (of every dataset) the error store dropped by its retention."""


# -- segments and jobs (cdp segments / cdp jobs) ----------------------------------------------
class SegmentInfo(msgspec.Struct, kw_only=True):
    name: str
    description: str
    expression: str
    method: str
    reason: str
    members: int
    last_evaluation: float | None
    json: dict[str, Any]
    """The canonical JSON form of the expression."""
    realized: int = 0
    existing: int = 0
    exited: int = 0
    """Memberships by status now (`members` is realized + existing): realized, a member
    since an evaluation that found it qualified; existing, confirmed by a batch job since;
    exited, left and not back, kept 30 days after leaving."""
    entered_24h: list[int] = []
    exited_24h: list[int] = []
    """Memberships that entered and that exited in each of the last 24 clock hours, oldest
    first, the last one the current hour. Counted from the memberships as they are now: a
    profile that entered and left within the day counts as one exit only, one that left
    and came back as one entry only."""


class SegmentList(msgspec.Struct):
    segments: list[SegmentInfo]


class PublishedSegment(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A segment as its owner (segmentation) publishes it on `cdp.config.segment.<name>`
    (JSON, through its outbox), so that other services (destination) learn segment names,
    methods and merge policies from the stream instead of asking. The latest message per
    subject is the segment's state; `deleted` marks a removed segment."""

    name: str
    expression: str = ""
    description: str = ""
    merge_policy: str | None = None
    method: str = ""
    """streaming or batch"""
    reason: str = ""
    deleted: bool = False


class EstimateRequest(msgspec.Struct):
    expression: str
    sample: int = 2000


class EstimateResult(msgspec.Struct, kw_only=True):
    expression: str
    method: str
    estimate: int
    matched: int
    sample: int
    profiles: int
    seconds: float


class JobRun(msgspec.Struct):
    kind: str = "segmentation"
    trigger: str = "manual"
    job_id: str | None = None
    """Chosen by whoever asks on `cdp.jobs.segmentation.run` (the scheduler: from the
    schedule and the due time), so that a request delivered twice runs one job; none: the
    service makes one."""


class JobInfo(msgspec.Struct, kw_only=True):
    job_id: str
    kind: str
    trigger: str
    status: str
    """queued, running, succeeded, failed"""
    started_at: float
    finished_at: float | None = None
    total: int = 0
    scanned: int = 0
    counts: dict[str, dict[str, int]] = {}
    """Per segment: members, realized, exited (changes this job made)."""
    error: str | None = None


class JobList(msgspec.Struct):
    jobs: list[JobInfo]


_job_decoder = msgspec.json.Decoder(JobInfo)


def finished_segmentation_job(data: bytes) -> JobInfo | None:
    """The job a `cdp.jobs.segmentation.done` message reports, if it is one: a decoded
    JobInfo of a segmentation job that succeeded. Anything else (a stray payload under the
    subject) is None: a consumer acts on what a message says, never on its subject alone."""
    try:
        info = _job_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if info.kind != "segmentation" or info.status != "succeeded" or not info.job_id:
        return None
    return info


# -- destinations (cdp destinations) ------------------------------------------------------------
class ExportFile(msgspec.Struct, kw_only=True):
    """A file an export wrote (a remote copy uploaded over SFTP has the same name)."""

    name: str
    rows: int
    bytes: int
    created_at: float


class DestinationInfo(msgspec.Struct, kw_only=True):
    name: str
    type: str
    segments: list[str]
    status: str
    """active, retrying (deliveries waiting after a failure), or failing (dead letters)"""
    queued: int
    delivered: int
    failed: int
    skipped: int
    dead_letters: int
    last_delivery: float | None
    last_error: str | None
    export_schedule: str | None = None
    excluded: dict[str, int] = {}
    """Profiles not activated, by reason: `missing_identity` (no identity the destination
    needs or its connector can address), `no_consent` (the consent attribute does not allow
    it), `unrecorded` (skipped before reasons were kept). A streaming destination's counts
    add up since it was created (their sum is `skipped`); a file destination's are those
    of its latest export that succeeded."""
    files: list[ExportFile] = []
    """A file destination's export files, newest first, at most 20."""


class DestinationList(msgspec.Struct):
    destinations: list[DestinationInfo]


class DestinationQuery(msgspec.Struct):
    name: str
    limit: int = 100


class DeadLetter(msgspec.Struct, kw_only=True):
    id: int
    segment: str
    profile_id: str
    attempts: int
    error: str
    failed_at: float


class DeadLetters(msgspec.Struct):
    destination: str
    items: list[DeadLetter]


class ReplayResult(msgspec.Struct):
    destination: str
    requeued: int


class ExportRun(msgspec.Struct):
    destination: str
    trigger: str = "manual"
    job_id: str | None = None
    """As JobRun.job_id, for `cdp.jobs.export.<destination>.run`."""


class ExportResult(msgspec.Struct, kw_only=True):
    destination: str
    trigger: str
    status: str
    """succeeded or failed"""
    started_at: float
    finished_at: float
    mode: str
    files: list[str]
    """Local paths, and remote paths when uploaded."""
    rows: int
    counts: dict[str, dict[str, int]] = {}
    """Per segment: rows by membership status."""
    skipped: int = 0
    error: str | None = None
    job_id: str | None = None
    """The job id of the ExportRun it answers (`cdp.jobs.export.<destination>.done`)."""
    excluded: dict[str, int] = {}
    """Rows left out, by reason (`skipped` is their sum): see DestinationInfo.excluded."""


# -- landing and backlog (cdp ingest --wait, cdp status) ------------------------------------
LANDING_STAGES: tuple[str, ...] = (
    "identity",
    "profile",
    "segmentation",
    "profile-memberships",
    "destination-profiles",
    "destination",
)
"""The stages a probe passes: identity once, every other one once per partition."""


class LandedRequest(msgspec.Struct, kw_only=True):
    """Wait until everything published to `cdp.ingest.>` before this request (and every
    batch file that finished before it) is reflected in profiles and memberships."""

    timeout: float = 60.0
    stages: list[str] | None = None
    """The stages to wait for (default: all of `LANDING_STAGES`)."""


class LandedResult(msgspec.Struct, kw_only=True):
    probe_id: str
    landed: bool
    waited_s: float
    partitions: int
    missing: list[str] = []
    """Stage/partition pairs not reported in time ("profile/3"), when `landed` is false."""


class StatusRequest(msgspec.Struct):
    pass


class ConsumerStatus(msgspec.Struct, kw_only=True):
    name: str
    stream: str
    pending: int
    """Messages in the stream this consumer has not been given yet."""
    ack_pending: int
    """Messages given to it and not yet acknowledged (being worked on)."""
    offset: int
    """The stream sequence of the last message applied (committed with its effects)."""
    error: str | None = None


class PartitionStatus(msgspec.Struct, kw_only=True):
    """A partition held by the instance that answers."""

    partition: int
    owner: str
    """The instance that holds it."""
    token: int
    """The fencing token (lease revision) it is held under."""
    applied_seq: int
    """The stream sequence of the last message applied."""
    pending: int
    """Messages of its subject not applied yet (its consumer's pending count)."""
    snapshot_seq: int | None = None
    snapshot_age_s: float | None = None
    error: str | None = None


class ServiceStatus(msgspec.Struct, kw_only=True):
    service: str
    ready: bool
    reason: str | None = None
    consumers: list[ConsumerStatus] = []
    outbox: int = 0
    """Committed messages not yet published."""
    failed: int = 0
    """Messages that failed and were set aside (rt_failed)."""
    instance: str | None = None
    """The instance that answered (a partitioned service runs several)."""
    partitions: list[PartitionStatus] = []
    role: str | None = None
    """Its role among its service's instances (`writer`, `standby`, `active`), if it has one."""
