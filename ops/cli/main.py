"""The `cdp` command."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import aiohttp
import msgspec
import nats.errors
import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from ops.cli import console as console_serve
from ops.cli import people
from ops.cli.apply import apply_objects, load_files
from ops.cli.check import CheckReport, wait_landed
from ops.cli.check import check as run_check
from ops.cli.client import ClientError, connect
from ops.cli.ingest import file_format, run_batch
from ops.cli.up import placement_table, run_up
from ops.natsd import Placement, server_config, stream_placement
from ops.platform import health_urls, readiness
from ops.security import (
    CONSOLE,
    activation_subjects,
    app_names,
    ensure_credentials,
    seed_path,
    server_authorization,
)
from shared import admin, subjects
from shared.admin import (
    AdminFailure,
    BatchInfo,
    BatchListResult,
    DeadLetters,
    DestinationList,
    DestinationQuery,
    ErrorsQuery,
    ErrorsResult,
    EstimateRequest,
    EstimateResult,
    ExportResult,
    ExportRun,
    GetRequest,
    GetResult,
    JobInfo,
    JobList,
    JobRun,
    LandedResult,
    ListRequest,
    ReplayResult,
    SegmentList,
    ServiceStatus,
    StatusRequest,
)
from shared.config import SERVICES, ConfigError
from shared.config import replicas as replicas_setting
from shared.log import configure_logging
from shared.resources import KINDS, OWNERS, PLURALS
from shared.runtime.coordination import bucket_ttls, ensure_buckets
from shared.runtime.snapshots import ensure_snapshot_buckets
from shared.streams import ensure_streams

app = typer.Typer(help="An open-source real-time Customer Data Platform.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)
T = TypeVar("T")

NatsOption = Annotated[
    str | None, typer.Option("--nats-url", help="NATS server (default: $CDP_NATS_URL or local).")
]


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run an async command; print a ClientError or AdminFailure as one clear line."""
    try:
        return asyncio.run(coro_fn())  # type: ignore[arg-type]
    except (ClientError, AdminFailure) as exc:
        where = exc.where() if isinstance(exc, AdminFailure) else ""
        err_console.print(f"[red]error:[/] {where + ': ' if where else ''}{exc.message}")
        raise typer.Exit(1) from None


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


# -- platform -----------------------------------------------------------------------------
@app.command()
def up(
    data_dir: Annotated[
        Path, typer.Option("--data-dir", help="Where SQLite files, JetStream data and logs live.")
    ] = Path("var"),
    nats_port: Annotated[
        int, typer.Option(help="Port of the embedded nats-server (a cluster's: from it up).")
    ] = 4222,
    cluster: Annotated[
        int,
        typer.Option(
            min=1,
            help="Start this many nats-server nodes routed to each other (a JetStream "
            "cluster; streams kept by CDP_REPLICAS of them, default 3 at most).",
        ),
    ] = 1,
    cluster_port: Annotated[
        int, typer.Option(help="Route port of a cluster's first node (the others: from it up).")
    ] = 6222,
) -> None:
    """Start nats-server (unless CDP_NATS_URL is set) and the six services; Ctrl-C stops all."""
    configure_logging("warning", "console")
    raise typer.Exit(
        asyncio.run(
            run_up(data_dir, nats_port, console, cluster=cluster, cluster_port=cluster_port)
        )
    )


@app.command()
def secrets(
    folder: Annotated[
        Path, typer.Option("--dir", help="Where the NKey seeds are (created if missing).")
    ] = Path("var/secrets"),
    nats_config: Annotated[
        Path | None,
        typer.Option(help="Also write nats-server's configuration file (public keys only)."),
    ] = None,
    per_service: Annotated[
        bool, typer.Option(help="Also copy each service's seed into a folder of its own.")
    ] = False,
) -> None:
    """Create the NATS credentials of every key (kept if they exist): one per service,
    `admin`, `console`, `client` and each application named in CDP_APPS; with
    --nats-config, the server configuration that admits them; with --per-service, a copy
    of each service's seed (and the console's) alone in `<dir>/<name>/` (what compose
    mounts into that container).
    `cdp up` does this itself; compose.yaml runs it once before nats-server starts."""
    keys = ensure_credentials(folder, app_names())
    table = Table()
    table.add_column("account")
    table.add_column("seed file")
    table.add_column("public key")
    for account, key in keys.items():
        table.add_row(account, str(seed_path(folder, account)), key)
    console.print(table)
    if per_service:
        for name in (*SERVICES, CONSOLE):
            own = folder / name
            own.mkdir(mode=0o700, exist_ok=True)
            copy = seed_path(own, name)
            tmp = copy.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(seed_path(folder, name).read_bytes())
            tmp.replace(copy)
        console.print(f"each service's seed alone in {folder}/<service>/")
    if nats_config is not None:
        nats_config.parent.mkdir(parents=True, exist_ok=True)
        tmp = nats_config.with_suffix(".tmp")
        tmp.write_text(server_config(server_authorization(keys, activation_subjects())))
        tmp.chmod(0o644)  # public keys and permissions only; nats-server may run as another user
        tmp.replace(nats_config)
        console.print(f"wrote {nats_config}")


@app.command()
def setup(nats_url: NatsOption = None) -> None:
    """Create or update the JetStream streams and the batch-file bucket, with the admin
    key, each kept by CDP_REPLICAS servers of a cluster (1 by default; a stream kept by
    another number is changed in place). `cdp up` does this itself; compose.yaml runs it
    once after nats-server is healthy. Services never create streams: without them they
    wait, not ready."""
    try:
        copies = replicas_setting()
    except ConfigError as exc:
        err_console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None

    async def go() -> None:
        async with connect(nats_url) as nc:
            await ensure_streams(nc.jetstream(), replicas=copies)
            await ensure_buckets(nc.jetstream(), *bucket_ttls(os.environ), replicas=copies)
            await ensure_snapshot_buckets(nc.jetstream(), replicas=copies)

    run(go)
    console.print(f"streams ready ({copies} {'copy' if copies == 1 else 'copies'} of each)")


@app.command()
def health() -> None:
    """Show every service's readiness."""

    async def probe() -> dict[str, tuple[bool, str]]:
        urls = health_urls()
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(*(readiness(session, u) for u in urls.values()))
        return dict(zip(urls, results, strict=True))

    urls = health_urls()
    states = asyncio.run(probe())
    table = Table()
    table.add_column("service")
    table.add_column("endpoint")
    table.add_column("ready")
    for name, (ok, why) in states.items():
        table.add_row(name, f"{urls[name]}/readyz", "[green]yes[/]" if ok else f"[red]no: {why}[/]")
    console.print(table)
    raise typer.Exit(0 if all(ok for ok, _ in states.values()) else 1)


@app.command("console")
def console_cmd(
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="The platform's data folder (secrets; default var)."),
    ] = None,
    as_admin: Annotated[
        bool,
        typer.Option("--admin", help="Connect with the admin key: allows replaying dead letters."),
    ] = False,
    bind: Annotated[
        str | None, typer.Option(help="Address to listen on (default $CDP_BIND or 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port (default $CDP_CONSOLE_PORT or 8080).")
    ] = None,
    nats_url: NatsOption = None,
) -> None:
    """Serve the web console: overview, audiences, profiles, destinations, batches.
    Off a loopback address every page needs the login token (CDP_CONSOLE_TOKEN, else
    <data dir>/secrets/console.token)."""
    configure_logging("warning", "console")
    folder = data_dir or console_serve.data_dir_default()
    raise typer.Exit(
        asyncio.run(
            console_serve.serve(
                nats_url, folder, as_admin=as_admin, bind=bind, port=port, terminal=console
            )
        )
    )


# -- configuration ----------------------------------------------------------------------------
@app.command()
def apply(
    file: Annotated[
        list[Path],
        typer.Option(
            "-f", "--file", help="Configuration file (YAML); repeat it to apply several as one."
        ),
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show the changes, apply nothing.")
    ] = False,
    nats_url: NatsOption = None,
) -> None:
    """Create or update namespaces, schemas and datasets from a file (idempotent)."""

    async def go() -> None:
        objects, sources = load_files(file)
        label = ", ".join(str(f) for f in file)
        async with connect(nats_url) as nc:
            results = await apply_objects(nc, objects, dry_run, label, sources)
        verbs = {"created": "would create", "updated": "would update", "unchanged": "unchanged"}
        for r in results:
            verb = verbs[r.action] if dry_run else r.action
            colour = {"created": "green", "updated": "yellow"}.get(r.action, "dim")
            console.print(f"[{colour}]{verb}[/] {r.kind} {r.name}")
            if r.action == "updated" or (dry_run and r.action != "unchanged"):
                for c in r.changes:
                    console.print(f"    {c.path}: {_short(c.before)} -> {_short(c.after)}")
        changed = sum(r.action != "unchanged" for r in results)
        tail = "to change" if dry_run else "changed"
        console.print(f"{len(results)} objects, {changed} {tail}")

    run(go)


def _short(value: Any) -> str:
    text = json.dumps(value) if value is not None else "(none)"
    return text if len(text) <= 80 else text[:77] + "..."


@app.command()
def get(
    kind: Annotated[str, typer.Argument(help="namespaces, schemas or datasets")],
    name: Annotated[str | None, typer.Argument(help="One object by name.")] = None,
    nats_url: NatsOption = None,
) -> None:
    """Show what is configured, as YAML that `cdp apply` accepts."""
    singular = PLURALS.get(kind, kind)
    if singular not in KINDS:
        err_console.print(f"[red]error:[/] unknown kind {kind!r} (one of {', '.join(PLURALS)})")
        raise typer.Exit(1)

    async def go() -> GetResult:
        async with connect(nats_url) as nc:
            return await admin.request(
                nc, subjects.admin(OWNERS[singular], "get"), GetRequest(singular, name), GetResult
            )

    result = run(go)
    plural = next(p for p, s in PLURALS.items() if s == singular)
    sys.stdout.write(yaml.safe_dump({plural: result.items}, sort_keys=False))


# -- batch ingestion --------------------------------------------------------------------------
@app.command()
def ingest(  # noqa: PLR0917 - typer options are declared as parameters
    dataset: Annotated[str, typer.Argument(help="Dataset the file's rows belong to.")],
    file: Annotated[Path, typer.Argument(help="CSV (with a header), JSON Lines or Parquet file.")],
    fmt: Annotated[str | None, typer.Option("--format", help="csv, jsonl or parquet")] = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            help="Return only when the batch is reflected in profiles and memberships.",
        ),
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits at most.")] = 600.0,
    nats_url: NatsOption = None,
) -> None:
    """Ingest a file as one batch: validate every row, then ingest it (or fail it as a whole)."""

    async def go() -> BatchInfo:
        fmt_ = file_format(file, fmt)
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rows]} rows, {task.fields[bad]} bad"),
            TimeElapsedColumn(),
            console=err_console,
            transient=True,
        ) as progress:
            task = progress.add_task("uploading", total=1.0, rows=0, bad=0)

            def on_progress(info: BatchInfo) -> None:
                progress.update(
                    task,
                    description=info.status,
                    completed=info.progress,
                    rows=info.input_rows,
                    bad=info.failed,
                )

            async with connect(nats_url) as nc:
                info = await run_batch(nc, dataset, file, fmt_, on_progress)
                if wait and info.status != "failed":
                    progress.update(task, description="landing")
                    result = await wait_landed(nc, timeout)
                    if not result.landed:
                        raise ClientError(
                            f"batch {info.batch_id} was ingested but not reflected everywhere "
                            f"within {timeout:.0f}s: waiting for {', '.join(result.missing[:8])}"
                        )
                return info

    info = run(go)
    _print_batch_summary(info)
    raise typer.Exit(1 if info.status == "failed" else 0)


@app.command()
def wait(
    timeout: Annotated[float, typer.Option(help="Seconds to wait at most.")] = 600.0,
    nats_url: NatsOption = None,
) -> None:
    """Wait until everything published so far is reflected in profiles and memberships."""

    async def go() -> LandedResult:
        async with connect(nats_url) as nc:
            return await wait_landed(nc, timeout)

    result = run(go)
    if not result.landed:
        err_console.print(
            f"[red]not landed[/] within {timeout:.0f}s: waiting for "
            f"{', '.join(result.missing[:12])}"
        )
        raise typer.Exit(1)
    console.print(f"landed ({result.waited_s:.3f} s, {result.partitions} partitions)")


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    nats_url: NatsOption = None,
) -> None:
    """Each service's backlog: what its consumers have not applied, its unpublished outbox."""

    placements: list[Placement] = []

    async def go() -> list[ServiceStatus | str]:
        out: list[ServiceStatus | str] = []
        async with connect(nats_url) as nc:
            # Where streams live is extra: the services' state is what status shows.
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                names = [s.name for s in subjects.ALL_STREAMS]
                placements.extend(await stream_placement(nc.jetstream(), names))
            for name in SERVICES:
                try:
                    out.append(
                        await admin.request(
                            nc,
                            subjects.admin(name, "status"),
                            StatusRequest(),
                            ServiceStatus,
                            timeout=5.0,
                        )
                    )
                except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                    out.append(name)
        return out

    found = run(go)
    if as_json:
        console.print_json(
            json.dumps(
                [
                    msgspec.to_builtins(s)
                    if isinstance(s, ServiceStatus)
                    else {"service": s, "ready": False, "reason": "not running"}
                    for s in found
                ]
            )
        )
        return
    table = Table()
    for col in ("service", "ready", "consumer", "stream", "pending", "in flight", "applied up to"):
        table.add_column(col)
    down = False
    for s in found:
        if isinstance(s, str):
            table.add_row(s, "[red]not running[/]", "", "", "", "", "")
            down = True
            continue
        ready = "[green]yes[/]" if s.ready else f"[red]no[/] {s.reason or ''}"
        extra = []
        if s.outbox:
            extra.append(f"outbox {s.outbox}")
        if s.failed:
            extra.append(f"{s.failed} failed")
        name = s.service + (f" ({', '.join(extra)})" if extra else "")
        if not s.consumers:
            table.add_row(name, ready, "", "", "", "", "")
        for i, c in enumerate(s.consumers):
            table.add_row(
                name if i == 0 else "",
                ready if i == 0 else "",
                c.name,
                c.stream,
                str(c.pending),
                str(c.ack_pending),
                str(c.offset) if c.error is None else f"[red]{c.error}[/]",
            )
    console.print(table)
    if placements:  # on a cluster: which node leads each stream
        console.print(placement_table(placements))
    raise typer.Exit(1 if down else 0)


@app.command("check")
def check_cmd(
    events: Annotated[bool, typer.Option(help="Also check where every event sits.")] = True,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Do not wait for published data to land first.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    nats_url: NatsOption = None,
) -> None:
    """Check the platform's invariants across services: live profiles only, identities and
    events where the identity graph says."""

    async def go() -> CheckReport:
        async with connect(nats_url) as nc:
            if not no_wait:
                result = await wait_landed(nc, 600.0)
                if not result.landed:
                    raise ClientError(
                        "published data has not landed; check it with --no-wait, or later"
                    )
            return await run_check(nc, events=events)

    report = run(go)
    if as_json:
        console.print_json(json.dumps(msgspec.to_builtins(report)))
    else:
        table = Table(title="what was checked")
        table.add_column("state")
        table.add_column("rows", justify="right")
        for what, n in report.counts.items():
            table.add_row(what, str(n))
        console.print(table)
        if report.ok:
            console.print("[green]no violation[/]")
        else:
            console.print(
                f"[red]{report.total} violation(s)[/], the first {len(report.violations)}:"
            )
            for v in report.violations:
                console.print(f"  {v}")
    raise typer.Exit(0 if report.ok else 1)


def _print_batch_summary(info: BatchInfo) -> None:
    colour = {"success": "green", "partial": "yellow", "failed": "red"}.get(info.status, "white")
    table = Table(title=f"batch {info.batch_id}: [{colour}]{info.status}[/]")
    for col in ("dataset", "file", "input rows", "accepted", "failed", "threshold"):
        table.add_column(col)
    table.add_row(
        info.dataset,
        info.file_name,
        str(info.input_rows),
        str(info.accepted),
        str(info.failed),
        f"{info.threshold:.1%}",
    )
    console.print(table)
    if info.error:
        console.print(f"[{colour}]{info.error}[/]")
    if info.failed:
        console.print(f"see the bad rows with: cdp errors {info.batch_id}")


@app.command()
def batches(
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 50,
    nats_url: NatsOption = None,
) -> None:
    """List batches with their status and counts."""

    async def go() -> BatchListResult:
        async with connect(nats_url) as nc:
            return await admin.request(
                nc, subjects.admin("ingest", "batch.list"), ListRequest(limit), BatchListResult
            )

    result = run(go)
    table = Table()
    for col in ("batch", "dataset", "file", "status", "input", "accepted", "failed", "created"):
        table.add_column(col)
    for b in result.batches:
        table.add_row(
            b.batch_id,
            b.dataset,
            b.file_name,
            b.status,
            str(b.input_rows),
            str(b.accepted),
            str(b.failed),
            _when(b.created_at),
        )
    console.print(table)


@app.command()
def errors(
    target: Annotated[str, typer.Argument(help="A dataset name or a batch id.")],
    limit: Annotated[int, typer.Option(help="How many rejected records to show.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Full records as JSON lines.")] = False,
    nats_url: NatsOption = None,
) -> None:
    """List rejected records with their reason, field, what was expected and what came."""

    async def go() -> ErrorsResult:
        async with connect(nats_url) as nc:
            return await admin.request(
                nc, subjects.admin("ingest", "errors"), ErrorsQuery(target, limit), ErrorsResult
            )

    result = run(go)
    if as_json:
        for r in result.records:
            sys.stdout.write(msgspec.json.encode(r).decode() + "\n")
        return
    table = Table(title=f"{result.total} rejected records for {target}")
    for col in ("record", "row", "reason", "field", "expected", "got"):
        table.add_column(col, overflow="fold")
    for r in result.records:
        table.add_row(
            r.record_id, str(r.row_number or "-"), r.reason, r.path or "-", r.expected, r.got
        )
    console.print(table)
    if result.dropped:
        console.print(
            f"{result.dropped} older rejected records (all datasets) were dropped by the error "
            "store's retention (CDP_ERRORS_MAX_AGE_DAYS, CDP_ERRORS_MAX_BYTES)"
        )


# -- segments and jobs ---------------------------------------------------------------------------
segments_app = typer.Typer(help="Audiences: list them, estimate an expression.")
jobs_app = typer.Typer(help="Batch jobs: list them, run one now.")
app.add_typer(segments_app, name="segments")
app.add_typer(jobs_app, name="jobs")


@segments_app.callback(invoke_without_command=True)
def segments(ctx: typer.Context, nats_url: NatsOption = None) -> None:
    """List segments: name, evaluation method, members (realized, existing, exited), last
    evaluation."""
    if ctx.invoked_subcommand is not None:
        return

    async def go() -> SegmentList:
        async with connect(nats_url) as nc:
            return await admin.request(
                nc, subjects.admin("segmentation", "list"), ListRequest(), SegmentList
            )

    result = run(go)
    table = Table()
    for col in (
        "segment",
        "method",
        "members",
        "realized",
        "existing",
        "exited",
        "last evaluation",
        "why",
    ):
        table.add_column(col, overflow="fold")
    for seg in result.segments:
        table.add_row(
            seg.name,
            seg.method,
            str(seg.members),
            str(seg.realized),
            str(seg.existing),
            str(seg.exited),
            _when(seg.last_evaluation),
            seg.reason,
        )
    console.print(table)


@segments_app.command("estimate")
def segments_estimate(
    expression: Annotated[str, typer.Argument(help="A segment expression.")],
    sample: Annotated[int, typer.Option(help="Profiles to sample.")] = 2000,
    nats_url: NatsOption = None,
) -> None:
    """Estimate how many profiles an expression selects, from a sample, creating nothing."""

    async def go() -> EstimateResult:
        async with connect(nats_url) as nc:
            return await admin.request(
                nc,
                subjects.admin("segmentation", "estimate"),
                EstimateRequest(expression, sample),
                EstimateResult,
            )

    r = run(go)
    console.print(
        f"about [bold]{r.estimate}[/] of {r.profiles} profiles ({r.matched} of a sample of "
        f"{r.sample}, {r.seconds * 1000:.0f} ms); evaluated in {r.method}"
    )


@jobs_app.callback(invoke_without_command=True)
def jobs(ctx: typer.Context, nats_url: NatsOption = None) -> None:
    """List jobs with their status and counts."""
    if ctx.invoked_subcommand is not None:
        return

    async def go() -> JobList:
        async with connect(nats_url) as nc:
            segmentation = await admin.request(
                nc, subjects.admin("segmentation", "jobs"), ListRequest(), JobList
            )
            try:
                exports = await admin.request(
                    nc, subjects.admin("destination", "jobs"), ListRequest(), JobList
                )
            except nats.errors.NoRespondersError:
                exports = JobList([])
            jobs = sorted([*segmentation.jobs, *exports.jobs], key=lambda j: -j.started_at)
            return JobList(jobs)

    result = run(go)
    table = Table()
    for col in ("job", "kind", "trigger", "status", "profiles", "started", "finished"):
        table.add_column(col)
    for j in result.jobs:
        table.add_row(
            j.job_id,
            j.kind,
            j.trigger,
            j.status,
            f"{j.scanned}/{j.total}",
            _when(j.started_at),
            _when(j.finished_at),
        )
    console.print(table)


@jobs_app.command("run")
def jobs_run(
    kind: Annotated[str, typer.Argument(help="segmentation")] = "segmentation",
    wait: Annotated[bool, typer.Option(help="Follow the job until it ends.")] = True,
    nats_url: NatsOption = None,
) -> None:
    """Run a batch job now (the daily segmentation job, on demand)."""

    async def go() -> JobInfo:
        async with connect(nats_url) as nc:
            job = await admin.request(
                nc, subjects.admin("segmentation", "job.run"), JobRun(kind), JobInfo
            )
            with Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                TimeElapsedColumn(),
                console=err_console,
                transient=True,
            ) as progress:
                task = progress.add_task(job.job_id, total=max(job.total, 1))
                while wait and job.status in ("queued", "running"):
                    await asyncio.sleep(0.25)
                    listed = await admin.request(
                        nc, subjects.admin("segmentation", "jobs"), ListRequest(), JobList
                    )
                    job = next((j for j in listed.jobs if j.job_id == job.job_id), job)
                    progress.update(task, completed=job.scanned)
            return job

    job = run(go)
    console.print(f"job {job.job_id}: {job.status}, {job.scanned} of {job.total} profiles")
    for seg, c in sorted(job.counts.items()):
        console.print(
            f"  {seg}: {c.get('members', 0)} members, +{c.get('realized', 0)} -{c.get('exited', 0)}"
        )
    raise typer.Exit(1 if job.status == "failed" else 0)


# -- destinations ------------------------------------------------------------------------------
destinations_app = typer.Typer(help="Destinations: status, dead letters, replay.")
app.add_typer(destinations_app, name="destinations")


@destinations_app.callback(invoke_without_command=True)
def destinations(ctx: typer.Context, nats_url: NatsOption = None) -> None:
    """Each destination's status, last delivery, counts delivered, failed and skipped (with
    the reasons profiles were left out), and a file destination's latest export file."""
    if ctx.invoked_subcommand is not None:
        return

    async def go() -> DestinationList:
        async with connect(nats_url) as nc:
            return await admin.request(
                nc, subjects.admin("destination", "list"), ListRequest(), DestinationList
            )

    result = run(go)
    table = Table()
    for col in (
        "destination",
        "type",
        "status",
        "queued",
        "delivered",
        "failed",
        "skipped",
        "dead letters",
        "last delivery",
    ):
        table.add_column(col)
    for d in result.destinations:
        table.add_row(
            d.name,
            d.type,
            d.status,
            str(d.queued),
            str(d.delivered),
            str(d.failed),
            _skipped(d.skipped, d.excluded),
            str(d.dead_letters),
            _when(d.last_delivery),
        )
    console.print(table)
    for d in result.destinations:
        if d.files:
            f = d.files[0]
            console.print(
                f"{d.name}: latest file {f.name} ({f.rows:,} rows, {f.bytes:,} bytes, "
                f"{_when(f.created_at)}), {len(d.files)} listed"
            )


def _skipped(total: int, by_reason: dict[str, int]) -> str:
    """`3 (missing identity 2, no consent 1)`: profiles left out, and why."""
    reasons = ", ".join(
        f"{reason.replace('_', ' ')} {n}" for reason, n in sorted(by_reason.items()) if n
    )
    return f"{total} ({reasons})" if reasons else str(total)


@destinations_app.command("dlq")
def destinations_dlq(
    name: Annotated[str, typer.Argument(help="A destination.")],
    limit: Annotated[int, typer.Option(help="How many.")] = 100,
    nats_url: NatsOption = None,
) -> None:
    """List a destination's dead letters: deliveries that failed for good."""

    async def go() -> DeadLetters:
        async with connect(nats_url) as nc:
            return await admin.request(
                nc, subjects.admin("destination", "dlq"), DestinationQuery(name, limit), DeadLetters
            )

    result = run(go)
    table = Table(title=f"{len(result.items)} dead letters for {name}")
    for col in ("id", "segment", "profile", "attempts", "error", "failed"):
        table.add_column(col, overflow="fold")
    for d in result.items:
        table.add_row(
            str(d.id), d.segment, d.profile_id, str(d.attempts), d.error, _when(d.failed_at)
        )
    console.print(table)


@destinations_app.command("export")
def destinations_export(
    name: Annotated[str, typer.Argument(help="A file destination.")],
    nats_url: NatsOption = None,
) -> None:
    """Run a file destination's export now."""

    async def go() -> ExportResult:
        async with connect(nats_url) as nc:
            return await admin.request(
                nc,
                subjects.admin("destination", "export.run"),
                ExportRun(name),
                ExportResult,
                timeout=600,
            )

    r = run(go)
    console.print(
        f"export of {r.destination}: {r.status} ({r.mode}), {r.rows} rows, {r.skipped} skipped"
    )
    for f in r.files:
        console.print(f"  {f}")
    if r.error:
        console.print(f"[red]{r.error}[/]")
    raise typer.Exit(0 if r.status == "succeeded" else 1)


@destinations_app.command("replay")
def destinations_replay(
    name: Annotated[str, typer.Argument(help="A destination.")],
    nats_url: NatsOption = None,
) -> None:
    """Send a destination's dead letters again."""

    async def go() -> ReplayResult:
        async with connect(nats_url) as nc:
            return await admin.request(
                nc, subjects.admin("destination", "replay"), DestinationQuery(name), ReplayResult
            )

    result = run(go)
    console.print(f"{result.requeued} deliveries queued again for {result.destination}")


# -- people ----------------------------------------------------------------------------------
@app.command()
def identity(
    identity: Annotated[str, typer.Argument(help="<namespace>:<value>, e.g. email:a@example.com")],
    nats_url: NatsOption = None,
) -> None:
    """Show the identity graph holding an identity: profile id, identities, links, refusals."""

    async def go() -> dict[str, Any]:
        async with connect(nats_url) as nc:
            return await people.identity_graph(nc, identity)

    graph = run(go)
    console.print(f"profile [bold]{graph['profile_id']}[/]")
    table = Table(title="identities")
    for col in ("namespace", "value", "first seen", "last seen"):
        table.add_column(col)
    for n in graph["identities"]:
        table.add_row(n["namespace"], n["value"], _when(n["first_seen"]), _when(n["last_seen"]))
    console.print(table)
    links = Table(title="links")
    for col in ("from", "to", "made", "dataset", "record"):
        links.add_column(col)
    for e in graph["links"]:
        links.add_row(e["a"], e["b"], _when(e["created_at"]), e["dataset"], e["record_id"])
    console.print(links)
    for r in graph["refused"]:
        console.print(f"[yellow]refused[/] {r['a']} - {r['b']}: {r['reason']} ({r['dataset']})")


@app.command()
def profile(
    identity: Annotated[str, typer.Argument(help="<namespace>:<value>, or a profile id with --id")],
    by_id: Annotated[
        bool, typer.Option("--id", help="IDENTITY is a profile id (a folded one is followed).")
    ] = False,
    merge_policy: Annotated[str | None, typer.Option(help="A configured merge policy.")] = None,
    events: Annotated[int, typer.Option(help="How many recent events to show.")] = 20,
    nats_url: NatsOption = None,
) -> None:
    """Show the unified profile of the person holding an identity, as JSON."""

    async def go() -> dict[str, Any]:
        async with connect(nats_url) as nc:
            if by_id:
                return await people.profile(nc, "", merge_policy, events, profile_id=identity)
            return await people.profile(nc, identity, merge_policy, events)

    console.print_json(data=run(go))


@app.command()
def delete(
    identity: Annotated[str, typer.Argument(help="<namespace>:<value>")],
    timeout: Annotated[float, typer.Option(help="Seconds to wait for every service.")] = 60.0,
    nats_url: NatsOption = None,
) -> None:
    """Privacy delete: remove the person from every service's store; report per service."""

    async def go() -> dict[str, Any]:
        async with connect(nats_url) as nc:

            def show(report: Any) -> None:
                removed = ", ".join(f"{v} {k}" for k, v in report.removed.items()) or "nothing"
                console.print(f"[green]{report.service}[/]: removed {removed}")

            return await people.delete(nc, identity, show, timeout)

    run(go)
    console.print("deleted everywhere")


def main() -> None:
    os.umask(0o077)  # data, logs, secrets and exports are the owner's alone
    app()
