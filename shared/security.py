"""Who may use which NATS subjects: one account per service, a client account, an admin.

The embedded default (`cdp up`, and compose.yaml) runs nats-server with NKey
authentication. Each account has an Ed25519 key pair; its seed is written at first start
to `<data dir>/secrets/<account>.nk` (mode 0600, never logged), and the server's
configuration holds only the public keys, each with the permissions below:

- each service may publish and subscribe only to the subjects it uses: its inputs
  (JetStream consumers on its input streams: create, fetch, acknowledge), its outputs,
  the admin and lookup requests it serves (and the replies to them), the admin requests
  it makes to other services, and its own reply inbox (`_INBOX_<service>.>`);
- `client`, for users and applications: publish records to `cdp.ingest.>` (not the
  privacy subject `cdp.ingest._delete`), subscribe to `cdp.membership.>`, request
  `cdp.profile.lookup`; replies come on the standard `_INBOX.>`;
- `admin`, for operators and the `cdp` CLI: everything (configuration, jobs, privacy
  deletes, batch file uploads, stream management). Its replies come on `_INBOX_admin.>`,
  which no other account may read.

Everything here is pure: generating keys and writing the server's configuration text.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import msgspec
import nkeys
from nacl.signing import SigningKey

from shared import subjects as s
from shared.config import SERVICES
from shared.errors import CdpError

CLIENT = "client"
ADMIN = "admin"
ACCOUNTS: tuple[str, ...] = (*SERVICES, CLIENT, ADMIN)

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
    Admin seeds get the admin inbox; `CDP_NATS_INBOX_PREFIX` overrides it."""
    env = os.environ if env is None else env
    given = env.get("CDP_NATS_NKEY")
    if given:
        seed: Path | None = Path(given)
    else:
        local = seed_path(Path(env.get("CDP_DATA_DIR") or "var") / "secrets", ADMIN)
        seed = local if local.exists() else None
    account = ADMIN if seed is not None and seed.stem == ADMIN else CLIENT
    return seed, env.get("CDP_NATS_INBOX_PREFIX") or inbox_prefix(account)


class SecurityError(CdpError):
    code = "security"


class Permissions(msgspec.Struct, frozen=True, kw_only=True):
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    publish_deny: tuple[str, ...] = ()
    allow_responses: bool = False
    """May answer the requests it receives (publish once to each request's reply subject)."""


def inbox_prefix(account: str) -> str:
    """The reply-subject root of an account's connections. Users' clients keep the NATS
    default `_INBOX`; services and admin have roots of their own, so no client can read
    the replies they receive (admin answers, JetStream API replies)."""
    return "_INBOX" if account == CLIENT else f"_INBOX_{account}"


# -- what each service uses ----------------------------------------------------------
class _Uses(msgspec.Struct, frozen=True, kw_only=True):
    consumes: tuple[s.StreamSpec, ...] = ()
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
            consumes=(s.STREAM_INGEST,),
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
            consumes=(s.STREAM_CONFIG, s.STREAM_RECORDS),
            publishes=(f"{s.PROFILES_PREFIX}.*", _report("identity"), _PROBE_REPORTS),
            serves=(s.admin("identity", ">"),),
            reads_last=(s.STREAM_PROFILES,),  # where a rebuild of its graph may start announcing
        ),
        "profile": _Uses(
            consumes=(s.STREAM_CONFIG, s.STREAM_MEMBERSHIP, s.STREAM_PROFILES),
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
            consumes=(s.STREAM_CHANGES,),
            publishes=(
                s.MEMBERSHIP_ALL,
                f"{s.CHANGES_PREFIX}.*",  # re-checks (time-based exits, batch jobs) go to its input
                s.JOBS_ALL,
                _report("segmentation"),
                _PROBE_REPORTS,
            ),
            serves=(s.admin("segmentation", ">"),),
            requests=(s.admin("profile", "get"),),
        ),
        "scheduler": _Uses(
            consumes=(s.STREAM_JOBS,),
            publishes=(s.JOBS_ALL,),
            serves=(s.admin("scheduler", ">"),),
            requests=(
                s.admin("segmentation", "job.run"),
                s.admin("destination", "export.run"),
                s.admin("destination", "list"),
            ),
        ),
        "destination": _Uses(
            consumes=(s.STREAM_CHANGES, s.STREAM_JOBS, s.STREAM_MEMBERSHIP),
            publishes=(_report("destination"), s.JOBS_ALL, _PROBE_REPORTS, *activation),
            serves=(s.admin("destination", ">"),),
            requests=(s.admin("segmentation", "list"),),
        ),
    }


def _jetstream(uses: _Uses) -> list[str]:
    api = "$JS.API"
    out = [f"{api}.INFO"]
    for spec in s.ALL_STREAMS:  # every service makes sure the streams exist (idempotent)
        out += [f"{api}.STREAM.INFO.{spec.name}", f"{api}.STREAM.CREATE.{spec.name}"]
        out.append(f"{api}.STREAM.UPDATE.{spec.name}")
    for spec in uses.consumes:
        out += [
            f"{api}.CONSUMER.CREATE.{spec.name}.>",
            f"{api}.CONSUMER.DURABLE.CREATE.{spec.name}.>",
            f"{api}.CONSUMER.INFO.{spec.name}.>",
            f"{api}.CONSUMER.DELETE.{spec.name}.>",
            f"{api}.CONSUMER.MSG.NEXT.{spec.name}.>",
            f"$JS.ACK.{spec.name}.>",
        ]
    for spec in uses.reads_last:
        out += [f"{api}.STREAM.MSG.GET.{spec.name}", f"{api}.DIRECT.GET.{spec.name}.>"]
        out.append(f"{api}.DIRECT.GET.{spec.name}")
    if uses.object_store is not None:
        stream = f"OBJ_{uses.object_store}"
        out += [
            f"{api}.STREAM.NAMES",  # finding the stream of an object's subject
            f"{api}.STREAM.INFO.{stream}",
            f"{api}.STREAM.CREATE.{stream}",
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
    if account == CLIENT:
        return Permissions(
            publish=(s.INGEST_ALL, s.PROFILE_LOOKUP),
            publish_deny=(s.PRIVACY_DELETE, s.PROBE),
            subscribe=(s.MEMBERSHIP_ALL, f"{inbox_prefix(CLIENT)}.>"),
        )
    uses = _uses(activation_subjects).get(account)
    if uses is None:
        raise SecurityError(f"no such account: {account!r} (one of {', '.join(ACCOUNTS)})")
    publish = [*uses.publishes, *uses.requests, *_jetstream(uses)]
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


def ensure_credentials(secrets_dir: Path) -> dict[str, str]:
    """Create a seed file for every account that has none (0600, in a 0700 folder); return
    each account's public key. Existing seeds are kept, so credentials survive restarts."""
    secrets_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(secrets_dir, 0o700)
    keys: dict[str, str] = {}
    for account in ACCOUNTS:
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


def server_authorization(
    public_keys: Mapping[str, str],
    activation_subjects: Iterable[str] = DEFAULT_ACTIVATION_SUBJECTS,
) -> str:
    """The `authorization { users = [...] }` block of nats-server's configuration."""
    activation = tuple(activation_subjects)
    users = []
    for account, key in public_keys.items():
        p = permissions(account, activation)
        publish = f"allow: {_list(p.publish)}"
        if p.publish_deny:
            publish += f", deny: {_list(p.publish_deny)}"
        parts = [f"publish: {{{publish}}}", f"subscribe: {{allow: {_list(p.subscribe)}}}"]
        if p.allow_responses:
            parts.append("allow_responses: true")
        users.append(
            f"    # {account}\n    {{nkey: {json.dumps(key)}, permissions: {{{', '.join(parts)}}}}}"
        )
    return "authorization {\n  users = [\n" + ",\n".join(users) + "\n  ]\n}\n"
