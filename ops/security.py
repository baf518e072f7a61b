"""Who may use which NATS subjects: two NATS accounts, a key per service, per application
and for the admin.

The embedded default (`cdp up`, and compose.yaml) runs nats-server with NKey
authentication. Each key has an Ed25519 key pair; its seed is written at first start to
`<data dir>/secrets/<name>.nk` (mode 0600, never logged), and the server's configuration
holds only the public keys, in two accounts:

- `CDP`, the platform (JetStream enabled): every service and `admin`. Each service may
  publish and subscribe only to the subjects it uses: its outputs, the admin and lookup
  requests it serves (and the replies to them), the admin requests it makes of other
  services, its own reply inbox (`_INBOX_<service>.>`), and in JetStream only its own
  durable consumers by their exact names (create, info, fetch, acknowledge) and stream
  info: creating or changing streams is the admin's alone. `admin`, for operators, the
  `cdp` CLI and `cdp up`: everything; replies on `_INBOX_admin.>`.
  `console`, the web console's key: read-only, in the platform account: only the read
  admin requests it shows (`CONSOLE_READS`) and `cdp.profile.lookup`; it listens to
  `cdp.membership.>` and its own `_INBOX_console.>`.
- `APP`, the applications (`client` and each name in `CDP_APPS`): no JetStream of its
  own; it imports the service `cdp.ingest.>` (JetStream publishes, their PubAck returned
  to the application only), the stream `cdp.membership.>` and the service
  `cdp.profile.lookup`. Each application replies on its own `_INBOX_<name>.>`. Any other
  subject an application names, a reply subject included, lives in `APP` and reaches
  nothing of the platform.

Everything here is pure: generating keys and writing the server's configuration text.
"""

from __future__ import annotations

import json
import os
import re
import secrets as token_source
from collections.abc import Iterable, Mapping
from pathlib import Path

import msgspec
import nkeys
from nacl.signing import SigningKey

from shared import subjects as s
from shared.config import SERVICES
from shared.errors import CdpError
from shared.subjects import inbox_prefix

CLIENT = "client"
ADMIN = "admin"
CONSOLE = "console"
ACCOUNTS: tuple[str, ...] = (*SERVICES, CLIENT, ADMIN, CONSOLE)

CONSOLE_READS: tuple[str, ...] = (
    *(s.admin(service, "status") for service in SERVICES),
    s.admin("*", "get"),
    s.admin("segmentation", "list"),
    s.admin("segmentation", "estimate"),
    s.admin("segmentation", "jobs"),
    s.admin("destination", "jobs"),
    s.admin("destination", "list"),
    s.admin("destination", "dlq"),
    s.admin("ingest", "batch.list"),
    s.admin("ingest", "errors"),
    s.admin("identity", "lookup"),
    s.PROFILE_LOOKUP,
)
"""The requests the web console's own key may make: reads only. What changes something
(replaying dead letters, running a job, applying configuration) needs the admin key
(`cdp console --admin`)."""

DEFAULT_ACTIVATION_SUBJECTS: tuple[str, ...] = ("activation.>",)
"""Where the destination service's NATS connector may publish unless configured otherwise
(`CDP_ACTIVATION_SUBJECTS`): subjects outside the platform's own `cdp.` space."""


def activation_subjects(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """`CDP_ACTIVATION_SUBJECTS` (comma-separated), else the default."""
    raw = (os.environ if env is None else env).get("CDP_ACTIVATION_SUBJECTS", "")
    given = tuple(x.strip() for x in raw.split(",") if x.strip())
    return given or DEFAULT_ACTIVATION_SUBJECTS


def cli_credentials(env: Mapping[str, str] | None = None) -> tuple[Path | None, str]:
    """The NKey seed file and reply-inbox root a command-line client connects with:
    `CDP_NATS_NKEY` if set, else the admin seed of the local data folder
    (`$CDP_DATA_DIR/secrets/admin.nk`, `var/` by default) if there is one, else none.

    The inbox follows the key, not the file's name: a seed whose public key is an
    application's in the local secrets folder gets that application's inbox, any other
    seed the admin inbox (`CDP_NATS_INBOX_PREFIX` overrides both). Never the shared
    `_INBOX`: a wrong guess is a permissions error from the server, not a leak."""
    env = os.environ if env is None else env
    secrets = Path(env.get("CDP_DATA_DIR") or "var") / "secrets"
    given = env.get("CDP_NATS_NKEY")
    if given:
        seed: Path | None = Path(given)
    else:
        local = seed_path(secrets, ADMIN)
        seed = local if local.exists() else None
    account = (_account_of(seed, secrets) if seed is not None else None) or ADMIN
    return seed, env.get("CDP_NATS_INBOX_PREFIX") or inbox_prefix(account)


def _account_of(seed: Path, secrets: Path) -> str | None:
    """The name of the local seed file holding the same key as `seed`, if any."""
    try:
        key = public_key(seed.read_bytes())
    except (OSError, nkeys.NkeysError, ValueError):
        return None
    try:
        candidates = sorted(secrets.glob("*.nk"))
    except OSError:
        return None
    for path in candidates:
        try:
            if public_key(path.read_bytes()) == key:
                return path.stem
        except (OSError, nkeys.NkeysError, ValueError):
            continue
    return None


def token_file(
    secrets_dir: Path, name: str, variable: str, env: Mapping[str, str] | None = None
) -> tuple[str, Path | None]:
    """A bearer or login token: `variable` when set (no file), else the one in
    `<secrets>/<name>`, written (0600, in a 0700 folder) the first time it is asked for; a
    second process asking at the same moment reads the first one's."""
    given = (os.environ if env is None else env).get(variable)
    if given:
        return given, None
    path = secrets_dir / name
    if not path.exists():
        secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_text().strip(), path
        with os.fdopen(fd, "w") as f:
            f.write(token_source.token_urlsafe(32) + "\n")
    return path.read_text().strip(), path


class SecurityError(CdpError):
    code = "security"


class Permissions(msgspec.Struct, frozen=True, kw_only=True):
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    publish_deny: tuple[str, ...] = ()
    allow_responses: bool = False
    """May answer the requests it receives (publish once to each request's reply subject)."""


_APP_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def is_app(account: str) -> bool:
    """An application key: `client` or one named in `CDP_APPS`, never a service, admin or
    the console."""
    return account not in (*SERVICES, ADMIN, CONSOLE)


def app_names(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The application keys: `client` and those named in `CDP_APPS` (comma-separated,
    lower-case letters, digits and `_`)."""
    raw = (os.environ if env is None else env).get("CDP_APPS", "")
    names = [x.strip() for x in raw.split(",") if x.strip()]
    for name in names:
        if not _APP_NAME.match(name) or not is_app(name):
            raise SecurityError(
                f"CDP_APPS: {name!r} is not an application name (lower-case letters, "
                "digits and _, not a service or admin)"
            )
    return tuple(dict.fromkeys((CLIENT, *names)))


# -- what each service uses ----------------------------------------------------------
class _Uses(msgspec.Struct, frozen=True, kw_only=True):
    consumes: tuple[tuple[s.StreamSpec, str], ...] = ()
    """Its durable consumers: (stream, durable name)."""
    publishes: tuple[str, ...] = ()
    serves: tuple[str, ...] = ()
    requests: tuple[str, ...] = ()
    reads_last: tuple[s.StreamSpec, ...] = ()
    """Streams it reads single messages from (by subject), not through a consumer."""
    object_store: str | None = None


def _report(service: str) -> str:
    return s.privacy_report("*", service)


_PROBE_REPORTS = s.probe_report("*")


def _uses(activation: Iterable[str]) -> dict[str, _Uses]:
    return {
        "ingest": _Uses(
            consumes=((s.STREAM_INGEST, "ingest"),),
            publishes=(
                s.RECORDS,
                s.CONFIG_ALL,
                s.INGEST_ALL,  # the HTTP door publishes what it accepts to the stream
                s.batch_progress("*"),
                _report("ingest"),
            ),
            serves=(s.admin("ingest", ">"), _PROBE_REPORTS),
            object_store=s.BATCH_BUCKET,
        ),
        "identity": _Uses(
            consumes=((s.STREAM_CONFIG, "identity-namespaces"), (s.STREAM_RECORDS, "identity")),
            publishes=(f"{s.PROFILES_PREFIX}.*", _report("identity"), _PROBE_REPORTS),
            serves=(s.admin("identity", ">"),),
            reads_last=(s.STREAM_PROFILES,),  # where a rebuild or a standby starts
        ),
        "profile": _Uses(
            consumes=(
                (s.STREAM_CONFIG, "profile-datasets"),
                (s.STREAM_CONFIG, "profile-namespaces"),
                (s.STREAM_CONFIG, "profile-policies"),
                (s.STREAM_MEMBERS, "profile-members"),
                (s.STREAM_PROFILES, "profile"),
            ),
            publishes=(
                f"{s.CHANGES_PREFIX}.*",
                _report("profile"),
                _PROBE_REPORTS,
                s.config("merge_policy", "*"),  # its merge policies, on the config stream
            ),
            serves=(s.admin("profile", ">"), s.PROFILE_LOOKUP),
            reads_last=(s.STREAM_CONFIG,),
        ),
        "segmentation": _Uses(
            consumes=(
                (s.STREAM_CHANGES, "segmentation"),
                (s.STREAM_CONFIG, "segmentation-policies"),  # merge policy names
                (s.STREAM_JOBS, "segmentation-jobs"),  # job requests
            ),
            publishes=(
                s.config("segment", "*"),
                s.MEMBERSHIP_ALL,  # the public events, one JSON per change
                f"{s.MEMBERS_PREFIX}.*",  # the same changes in batches, for profile, destination
                f"{s.CHANGES_PREFIX}.*",  # re-checks (time-based exits, batch jobs) go to its input
                s.JOBS_ALL,
                _report("segmentation"),
                _PROBE_REPORTS,
            ),
            serves=(s.admin("segmentation", ">"),),
        ),
        "scheduler": _Uses(
            consumes=((s.STREAM_JOBS, "scheduler"),),  # the done events of jobs
            publishes=(s.JOBS_ALL, s.config("schedule", "*")),  # job requests, its schedules
            serves=(s.admin("scheduler", ">"),),
            reads_last=(s.STREAM_CONFIG,),  # the schedules, when a standby takes over
        ),
        "destination": _Uses(
            consumes=(
                (s.STREAM_CHANGES, "destination-profiles"),
                (s.STREAM_JOBS, "destination-jobs"),
                (s.STREAM_MEMBERS, "destination-members"),
                (s.STREAM_CONFIG, "destination-segments"),  # segment names and methods
            ),
            publishes=(
                _report("destination"),
                s.JOBS_ALL,
                _PROBE_REPORTS,
                s.config("destination", "*"),
                *activation,
            ),
            serves=(s.admin("destination", ">"),),
            reads_last=(s.STREAM_CONFIG,),  # a segment applied but not read yet
        ),
    }


def granted_consumers(
    activation: Iterable[str] = DEFAULT_ACTIVATION_SUBJECTS,
) -> dict[str, set[tuple[str, str]]]:
    """Each service's durable consumers, as the table grants them: (stream, durable)."""
    return {
        service: {(spec.name, durable) for spec, durable in uses.consumes}
        for service, uses in _uses(activation).items()
    }


def _jetstream(service: str, uses: _Uses) -> list[str]:
    api = "$JS.API"
    out = [f"{api}.INFO"]
    for spec in s.ALL_STREAMS:  # a service checks that the streams exist; only admin makes them
        out.append(f"{api}.STREAM.INFO.{spec.name}")
    for spec, durable in uses.consumes:
        # Only its own durable, by its exact name: created (again, from its committed
        # offset: the old one is deleted first), read, fetched from and acknowledged.
        own = f"{spec.name}.{durable}"
        out += [
            f"{api}.CONSUMER.CREATE.{own}",
            f"{api}.CONSUMER.CREATE.{own}.>",  # with a filter subject
            f"{api}.CONSUMER.DURABLE.CREATE.{own}",
            f"{api}.CONSUMER.INFO.{own}",
            f"{api}.CONSUMER.DELETE.{own}",
            f"{api}.CONSUMER.MSG.NEXT.{own}",
            f"$JS.ACK.{own}.>",
        ]
    for bucket in (s.INSTANCES_BUCKET, s.LEASES_BUCKET):
        # The coordination buckets (created by the admin): read all of it, write only the
        # keys under its own name (`<service>.<instance>`, `<service>.<lease>`).
        stream = f"KV_{bucket}"
        out += [
            f"{api}.STREAM.INFO.{stream}",
            f"{api}.STREAM.MSG.GET.{stream}",
            f"{api}.DIRECT.GET.{stream}.>",
            f"$KV.{bucket}.{service}.>",
        ]
    for spec in uses.reads_last:
        out += [f"{api}.STREAM.MSG.GET.{spec.name}", f"{api}.DIRECT.GET.{spec.name}.>"]
        out.append(f"{api}.DIRECT.GET.{spec.name}")
    if uses.object_store is not None:
        stream = f"OBJ_{uses.object_store}"
        out += [
            f"{api}.STREAM.NAMES",  # finding the stream of an object's subject
            f"{api}.STREAM.INFO.{stream}",  # the bucket is created by `cdp up` / `cdp setup`
            f"{api}.STREAM.MSG.GET.{stream}",
            f"{api}.DIRECT.GET.{stream}.>",
            f"{api}.STREAM.PURGE.{stream}",  # an ingested file's chunks are removed
            f"{api}.CONSUMER.CREATE.{stream}",
            f"{api}.CONSUMER.CREATE.{stream}.>",
            f"{api}.CONSUMER.DELETE.{stream}.>",
            f"$JS.FC.{stream}.>",
            f"$O.{uses.object_store}.>",
        ]
    return out


def permissions(
    account: str, activation_subjects: Iterable[str] = DEFAULT_ACTIVATION_SUBJECTS
) -> Permissions:
    """What `account` may do on NATS."""
    if account == ADMIN:
        return Permissions(publish=(">",), subscribe=(">",), allow_responses=True)
    if account == CONSOLE:
        return Permissions(
            publish=CONSOLE_READS,
            subscribe=(s.MEMBERSHIP_ALL, f"{inbox_prefix(CONSOLE)}.>"),
        )
    uses = _uses(activation_subjects).get(account)
    if uses is None:
        if not _APP_NAME.match(account):
            raise SecurityError(f"no such account: {account!r} (one of {', '.join(ACCOUNTS)})")
        return Permissions(
            publish=(s.INGEST_ALL, s.PROFILE_LOOKUP),
            publish_deny=(s.PRIVACY_DELETE, s.PROBE),
            subscribe=(s.MEMBERSHIP_ALL, f"{inbox_prefix(account)}.>"),
        )
    publish = [*uses.publishes, *uses.requests, *_jetstream(account, uses)]
    subscribe = [*uses.serves, f"{inbox_prefix(account)}.>"]
    return Permissions(
        publish=tuple(dict.fromkeys(publish)),
        subscribe=tuple(dict.fromkeys(subscribe)),
        allow_responses=bool(uses.serves),
    )


# -- keys and the server's configuration ----------------------------------------------
def seed_path(secrets_dir: Path, account: str) -> Path:
    return secrets_dir / f"{account}.nk"


def new_seed() -> bytes:
    """A fresh user NKey seed (`SU...`), from 32 random bytes."""
    raw = bytes(SigningKey.generate())
    return bytes(nkeys.encode_seed(raw, nkeys.PREFIX_BYTE_USER))


def public_key(seed: bytes) -> str:
    return str(nkeys.from_seed(bytearray(seed.strip())).public_key.decode())


def ensure_credentials(secrets_dir: Path, apps: Iterable[str] = ()) -> dict[str, str]:
    """Create a seed file for every account that has none (0600, in a 0700 folder); return
    each account's public key. Existing seeds are kept, so credentials survive restarts."""
    secrets_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(secrets_dir, 0o700)
    keys: dict[str, str] = {}
    for account in dict.fromkeys((*ACCOUNTS, *apps)):
        path = seed_path(secrets_dir, account)
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(new_seed() + b"\n")
            tmp.replace(path)
        try:
            keys[account] = public_key(path.read_bytes())
        except (nkeys.NkeysError, ValueError) as exc:
            raise SecurityError(f"{path}: not an NKey seed ({type(exc).__name__})") from None
    return keys


_SUBJECT = re.compile(r"^[^\s\"]+$")


def _list(items: Iterable[str]) -> str:
    values = list(items)
    for v in values:
        if not _SUBJECT.match(v):
            raise SecurityError(f"not a subject: {v!r}")
    return json.dumps(values)


PLATFORM_ACCOUNT = "CDP"
"""The NATS account of the services and the admin: the streams and every internal subject."""
APP_ACCOUNT = "APP"
"""The NATS account of applications: it sees only what the platform exports to it."""

EXPORTS: tuple[tuple[str, str], ...] = (
    ("service", s.INGEST_ALL),  # JetStream publishes; each PubAck returns to the app only
    ("stream", s.MEMBERSHIP_ALL),
    ("service", s.PROFILE_LOOKUP),
)
"""What the platform account offers applications (kind, subject)."""


def _user(account: str, key: str, activation: tuple[str, ...]) -> str:
    p = permissions(account, activation)
    publish = f"allow: {_list(p.publish)}"
    if p.publish_deny:
        publish += f", deny: {_list(p.publish_deny)}"
    parts = [f"publish: {{{publish}}}", f"subscribe: {{allow: {_list(p.subscribe)}}}"]
    if p.allow_responses:
        parts.append("allow_responses: true")
    return (
        f"      # {account}\n      {{nkey: {json.dumps(key)}, permissions: {{{', '.join(parts)}}}}}"
    )


def server_authorization(
    public_keys: Mapping[str, str],
    activation_subjects: Iterable[str] = DEFAULT_ACTIVATION_SUBJECTS,
) -> str:
    """The `accounts {...}` block of nats-server's configuration: the services and the
    admin in the platform account (with JetStream), applications in their own account,
    which imports only the ingest subjects, membership announcements and the lookup
    service. A subject an application names (a reply subject included) lives in the
    application account and reaches nothing internal."""
    activation = tuple(activation_subjects)
    platform = [_user(a, k, activation) for a, k in public_keys.items() if not is_app(a)]
    apps = [_user(a, k, activation) for a, k in public_keys.items() if is_app(a)]
    exports = ", ".join(f"{{{kind}: {json.dumps(subj)}}}" for kind, subj in EXPORTS)
    imports = ", ".join(
        f"{{{kind}: {{account: {PLATFORM_ACCOUNT}, subject: {json.dumps(subj)}}}}}"
        for kind, subj in EXPORTS
    )
    return (
        "accounts {\n"
        f"  {PLATFORM_ACCOUNT}: {{\n    jetstream: enabled\n"
        "    users = [\n" + ",\n".join(platform) + "\n    ]\n"
        f"    exports = [{exports}]\n  }}\n"
        f"  {APP_ACCOUNT}: {{\n"
        "    users = [\n" + ",\n".join(apps) + "\n    ]\n"
        f"    imports = [{imports}]\n  }}\n"
        "}\n"
    )
