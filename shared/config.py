"""Settings read from the environment. Every variable is documented in the README."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import msgspec
import phonenumbers

SERVICES: tuple[str, ...] = (
    "ingest",
    "identity",
    "profile",
    "segmentation",
    "scheduler",
    "destination",
)

DEFAULT_PORTS: dict[str, int] = {
    "ingest": 8081,
    "identity": 8082,
    "profile": 8083,
    "segmentation": 8084,
    "scheduler": 8085,
    "destination": 8086,
}

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"

MAX_REPLICAS = 5
"""The most copies JetStream keeps of a stream."""


def nats_servers(url: str) -> list[str]:
    """The servers of `CDP_NATS_URL`: one URL, or several separated by commas (the nodes
    of a cluster: a client connects to one and moves to another when it goes)."""
    servers = [u.strip() for u in url.split(",") if u.strip()]
    return servers or [DEFAULT_NATS_URL]


class ConfigError(ValueError):
    """An environment variable holds a value the platform cannot use."""

    def __init__(self, variable: str, value: str, expected: str) -> None:
        super().__init__(f"{variable}={value!r}: expected {expected}")
        self.variable = variable
        self.value = value
        self.expected = expected


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """What one service process needs to know about its environment."""

    service: str
    nats_url: str = DEFAULT_NATS_URL
    data_dir: Path = Path("var")
    bind: str = "127.0.0.1"
    port: int = 0
    log_level: str = "info"
    log_format: str = "auto"
    fetch_batch: int = 256
    step_max_bytes: int = 4 * 1024 * 1024
    """Most payload bytes a consumer's step takes from a fetch: a fetch of many messages
    of many records each is applied in several steps (bounded memory), in order."""
    partitions: int = 8
    replicas: int = 1
    """Copies of each stream and bucket on a JetStream cluster (`CDP_REPLICAS`)."""
    snapshot_interval: float = 60.0
    """Seconds between two snapshots of a partition that has applied something."""
    snapshot_every: int = 10_000
    """A partition is also snapshotted once it has applied this many messages since."""
    ack_wait: float = 30.0
    nats_nkey: Path | None = None
    """The NKey seed file this service authenticates with (none: no authentication)."""
    ingest_token: str | None = None
    """When set, the ingest HTTP door requires `Authorization: Bearer <token>`."""
    profile_token: str | None = None
    """`GET /v1/profiles` (personal data) requires `Authorization: Bearer <token>`; without a
    token configured it answers 401 to everyone."""
    phone_region: str = "US"
    """Region (ISO 3166 code) of phone numbers written without a country code."""
    errors_max_age_days: float = 30.0
    """Ingest's error store drops rejected records older than this."""
    errors_max_bytes: int = 256 * 1024 * 1024
    """Ingest's error store drops its oldest rejected records past this size."""
    export_root: Path | None = None
    """File destinations write only inside this folder (none: `<data_dir>/exports`)."""
    allow_private_destinations: bool = False
    """HTTP destinations may reach private and link-local addresses (loopback always)."""
    instance: str = ""
    """This process's instance id among the instances of its service (none: the service's
    name, a single instance). Two instances never share one."""
    lease_margin: float = 1.0
    """Seconds before a lease's expiry on the server at which its holder stops trusting it
    (a holder that was paused and missed its renewals acts on no stale lease)."""

    def __repr__(self) -> str:  # the token is a secret: never in a log line or a traceback
        shown = msgspec.structs.replace(
            self,
            ingest_token="***" if self.ingest_token else None,
            profile_token="***" if self.profile_token else None,
        )
        fields = ", ".join(f"{f}={getattr(shown, f)!r}" for f in self.__struct_fields__)
        return f"Settings({fields})"

    @property
    def exports_root(self) -> Path:
        return self.export_root if self.export_root is not None else self.data_dir / "exports"

    @property
    def instance_id(self) -> str:
        return self.instance or self.service

    @property
    def db_path(self) -> Path:
        return self.data_dir / f"{self.service}.db"


def port_variable(service: str) -> str:
    return f"CDP_{service.upper()}_PORT"


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, raw, "an integer") from None
    if value < minimum:
        raise ConfigError(name, raw, f"an integer >= {minimum}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(name, raw, "a number of seconds") from None
    if value <= 0:
        raise ConfigError(name, raw, "a positive number of seconds")
    return value


def _phone_region(env: Mapping[str, str]) -> str:
    raw = env.get("CDP_PHONE_REGION", "")
    if raw == "":
        return "US"
    region = raw.strip().upper()
    if region not in phonenumbers.SUPPORTED_REGIONS:
        raise ConfigError(
            "CDP_PHONE_REGION", raw, "a region code with a known numbering plan, e.g. US, GB, FR"
        )
    return region


def _bool(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise ConfigError(name, raw, "true or false")


def replicas(env: Mapping[str, str] | None = None) -> int:
    """`CDP_REPLICAS`: how many servers of a JetStream cluster keep a copy of each stream
    and bucket (1, the default: a single server; 3 on a three-node cluster)."""
    env = os.environ if env is None else env
    value = _int(env, "CDP_REPLICAS", 1, minimum=1)
    if value > MAX_REPLICAS:
        raise ConfigError("CDP_REPLICAS", env["CDP_REPLICAS"], f"at most {MAX_REPLICAS}")
    return value


def load_settings(service: str, env: Mapping[str, str] | None = None) -> Settings:
    """Read the settings of `service` from `env` (the process environment by default)."""
    env = os.environ if env is None else env
    log_format = env.get("CDP_LOG_FORMAT", "auto")
    if log_format not in ("auto", "json", "console"):
        raise ConfigError("CDP_LOG_FORMAT", log_format, "one of auto, json, console")
    return Settings(
        service=service,
        nats_url=env.get("CDP_NATS_URL", DEFAULT_NATS_URL),
        data_dir=Path(env.get("CDP_DATA_DIR", "var")),
        bind=env.get("CDP_BIND", "127.0.0.1"),
        port=_int(env, port_variable(service), DEFAULT_PORTS.get(service, 0)),
        log_level=env.get("CDP_LOG_LEVEL", "info").lower(),
        log_format=log_format,
        fetch_batch=_int(env, "CDP_FETCH_BATCH", 256, minimum=1),
        step_max_bytes=_int(env, "CDP_STEP_MAX_BYTES", 4 * 1024 * 1024, minimum=1),
        partitions=_int(env, "CDP_PARTITIONS", 8, minimum=1),
        replicas=replicas(env),
        snapshot_interval=_float(env, "CDP_SNAPSHOT_INTERVAL", 60.0),
        snapshot_every=_int(env, "CDP_SNAPSHOT_EVERY", 10_000, minimum=1),
        ack_wait=_float(env, "CDP_ACK_WAIT", 30.0),
        nats_nkey=Path(env["CDP_NATS_NKEY"]) if env.get("CDP_NATS_NKEY") else None,
        ingest_token=env.get("CDP_INGEST_TOKEN") or None,
        profile_token=env.get("CDP_PROFILE_TOKEN") or None,
        phone_region=_phone_region(env),
        errors_max_age_days=_float(env, "CDP_ERRORS_MAX_AGE_DAYS", 30.0),
        errors_max_bytes=_int(env, "CDP_ERRORS_MAX_BYTES", 256 * 1024 * 1024, minimum=1),
        export_root=Path(env["CDP_EXPORT_ROOT"]) if env.get("CDP_EXPORT_ROOT") else None,
        allow_private_destinations=_bool(env, "CDP_ALLOW_PRIVATE_DESTINATIONS"),
        instance=_instance(env, service),
        lease_margin=_float(env, "CDP_LEASE_MARGIN", 1.0),
    )


_INSTANCE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _instance(env: Mapping[str, str], service: str) -> str:
    raw = env.get("CDP_INSTANCE", "")
    if raw == "":
        return service
    if not _INSTANCE.match(raw):
        raise ConfigError("CDP_INSTANCE", raw, "letters, digits, - and _ (at most 64)")
    return raw
