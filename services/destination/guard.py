"""Where a destination may send or write, checked when it is applied and again when it is
used (DNS may answer differently by then, a symlink may have appeared).

- URLs of HTTP connectors: `http` or `https` with a host. Public addresses and loopback
  (a receiver on the same machine: local setups, tests) are allowed. Link-local addresses
  (169.254.0.0/16, fe80::/10, where cloud metadata services answer), known metadata
  addresses, private networks (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7) and
  unspecified, multicast or reserved addresses are refused unless the destination service
  runs with `CDP_ALLOW_PRIVATE_DESTINATIONS=true`. A host name is checked by every address
  it resolves to.
- Export folders: inside the export root (`CDP_EXPORT_ROOT`, default `<data dir>/exports`),
  after symlinks are resolved; relative folders are read from the data folder; `..` is
  refused.
- Secrets: only environment variables named `CDP_SECRET_*` can be named, so no destination
  can send the service's own credentials (such as `CDP_INGEST_TOKEN`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from pathlib import Path, PurePath
from typing import Final
from urllib.parse import urlsplit

from services.destination.errors import DestinationError

SECRET_PREFIX: Final = "CDP_SECRET_"
ALLOW_PRIVATE_SETTING: Final = "_allow_private"
"""Put in every connector's settings by the destination service (never from configuration)."""

RESOLVE_TIMEOUT: Final = 3.0
"""Seconds a host name may take to resolve before the check leaves it to the delivery."""

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_METADATA: Final = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
_PRIVATE: Final = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
)


class UnsafeDestination(DestinationError):
    """A destination names a place it may not send to or write in."""

    code = "unsafe_destination"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def refused_address(address: IpAddress, allow_private: bool) -> str | None:
    """Why nothing is sent to `address` (None: it may be)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return None
    if allow_private:
        return None
    if address in _METADATA:
        return f"{address} is a cloud metadata address"
    if address.is_link_local:
        return f"{address} is link-local"
    if address.is_unspecified or address.is_multicast or address.is_reserved:
        return f"{address} is not a unicast address"
    if any(address in net for net in _PRIVATE) or address.is_private:
        return f"{address} is in a private network"
    return None


def _allowed_hint() -> str:
    return " (set CDP_ALLOW_PRIVATE_DESTINATIONS=true to allow private and link-local addresses)"


def check_url(url: str, allow_private: bool) -> str:
    """The URL's host, when its scheme is http(s) and a literal address is allowed; else
    UnsafeDestination with the reason."""
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a port out of range
    except ValueError as exc:
        raise UnsafeDestination("connection.url", f"not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise UnsafeDestination(
            "connection.url", f"only http and https URLs are allowed, not {parts.scheme!r}"
        )
    if not host:
        raise UnsafeDestination("connection.url", "the URL names no host")
    try:
        literal: IpAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        reason = refused_address(literal, allow_private)
        if reason is not None:
            raise UnsafeDestination("connection.url", f"refused: {reason}{_allowed_hint()}")
    return host


async def check_resolved(url: str, allow_private: bool) -> None:
    """`check_url`, and every address the host resolves to is allowed. A name that does
    not resolve (or not within RESOLVE_TIMEOUT) is left to the delivery, which checks
    again before each request."""
    host = check_url(url, allow_private)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return
    try:
        infos = await asyncio.wait_for(
            asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM),
            RESOLVE_TIMEOUT,
        )
    except (OSError, TimeoutError):
        return
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        reason = refused_address(address, allow_private)
        if reason is not None:
            raise UnsafeDestination(
                "connection.url", f"refused: {host} resolves to {reason}{_allowed_hint()}"
            )


def export_folder(folder: str, data_dir: Path, root: Path) -> Path:
    """Where an export writes: `folder` (relative to the data folder) resolved, symlinks
    followed, inside `root`; else UnsafeDestination with the reason."""
    if not folder.strip():
        raise UnsafeDestination("export.folder", "name a folder")
    if "\0" in folder:
        raise UnsafeDestination("export.folder", "a folder name cannot hold a NUL character")
    if ".." in PurePath(folder).parts:
        raise UnsafeDestination("export.folder", "`..` is not allowed in an export folder")
    path = Path(folder)
    if not path.is_absolute():
        path = data_dir / path
    resolved = path.resolve()
    real_root = root.resolve()
    if not resolved.is_relative_to(real_root):
        raise UnsafeDestination(
            "export.folder",
            f"{folder!r} is outside the export root {root} (CDP_EXPORT_ROOT): "
            "exports are written only there",
        )
    return resolved


def check_secret_variable(variable: str) -> None:
    if not variable.startswith(SECRET_PREFIX) or not variable[len(SECRET_PREFIX) :]:
        raise UnsafeDestination(
            "secrets",
            f"{variable!r}: secrets are read only from environment variables named "
            f"{SECRET_PREFIX}*",
        )
    if not variable.replace("_", "").isalnum():
        raise UnsafeDestination("secrets", "name an environment variable, not a secret value")
