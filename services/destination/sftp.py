"""Upload export files to an SFTP server (asyncssh).

Each file is written under a hidden temporary name in the remote folder and renamed to its
final name once complete, so a reader polling the folder never picks up a partial file.
The connection uses only what is passed here: no ssh-agent, no default keys from the home
folder, no OpenSSH client configuration.
"""

from __future__ import annotations

import contextlib
import posixpath
import secrets
from collections.abc import Sequence
from pathlib import Path

import asyncssh

from services.destination.errors import DestinationError

DEFAULT_CONNECT_TIMEOUT = 30.0


class SftpError(DestinationError):
    """An SFTP upload failed. `retryable` is False when retrying cannot help without a
    configuration change (authentication refused, host key not trusted, bad client key,
    local file missing)."""

    code = "sftp_failed"

    def __init__(self, host: str, port: int, reason: str, *, retryable: bool = True) -> None:
        super().__init__(f"sftp upload to {host}:{port} failed: {reason}")
        self.host = host
        self.port = port
        self.reason = reason
        self.retryable = retryable


async def upload(
    files: Sequence[Path],
    *,
    host: str,
    port: int,
    username: str,
    password: str | None = None,
    client_key: str | None = None,
    remote_dir: str,
    known_hosts: str | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> list[str]:
    """Upload `files` into `remote_dir` (created if missing); return the remote paths.

    Authenticates with `password` and/or the private key file `client_key`. `known_hosts`
    is the path of an OpenSSH known_hosts file to verify the server's host key against;
    None accepts any host key, which is only safe for tests and trusted networks.
    Raises SftpError (with host and reason) on any failure; a temporary remote file left by
    a failed upload is removed when the connection still allows it.
    """
    names = [path.name for path in files]
    if len(set(names)) != len(names):
        raise SftpError(host, port, "two local files share a name", retryable=False)
    for path in files:
        if not path.is_file():
            raise SftpError(host, port, f"local file {path.name!r} not found", retryable=False)
    try:
        async with (
            asyncssh.connect(
                host,
                port,
                username=username,
                password=password,
                client_keys=[client_key] if client_key else None,
                known_hosts=known_hosts,
                agent_path=None,
                config=None,
                connect_timeout=connect_timeout,
            ) as conn,
            conn.start_sftp_client() as sftp,
        ):
            await sftp.makedirs(remote_dir, exist_ok=True)
            return [await _put(sftp, path, remote_dir) for path in files]
    except (asyncssh.PermissionDenied, asyncssh.HostKeyNotVerifiable) as exc:
        raise SftpError(host, port, _reason(exc), retryable=False) from exc
    except asyncssh.KeyImportError as exc:
        raise SftpError(host, port, f"client key: {exc}", retryable=False) from exc
    except (asyncssh.Error, OSError) as exc:
        raise SftpError(host, port, _reason(exc)) from exc


async def _put(sftp: asyncssh.SFTPClient, path: Path, remote_dir: str) -> str:
    final = posixpath.join(remote_dir, path.name)
    temp = posixpath.join(remote_dir, f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        await sftp.put(str(path), temp)
        await _replace(sftp, temp, final)
    except BaseException:
        with contextlib.suppress(asyncssh.Error, OSError):
            await sftp.remove(temp)
        raise
    return final


async def _replace(sftp: asyncssh.SFTPClient, temp: str, final: str) -> None:
    """Rename `temp` to `final`, replacing it: atomically where the server supports the
    posix-rename extension (OpenSSH, asyncssh), else remove then rename."""
    try:
        await sftp.posix_rename(temp, final)
    except asyncssh.SFTPOpUnsupported:
        if await sftp.exists(final):
            await sftp.remove(final)
        await sftp.rename(temp, final)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncssh.DisconnectError | asyncssh.SFTPError):
        return f"{type(exc).__name__}: {exc.reason}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
