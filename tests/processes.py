"""The platform as tests bring it up (ops.platform), with reads of the services' SQLite
files; and `cdp up` itself in a subprocess, its output collected."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import aiohttp

from ops import platform
from ops.natsd import free_port
from shared.config import SERVICES, port_variable
from tests.helpers import all_ready

ROOT = Path(__file__).resolve().parent.parent


class Platform(platform.Platform):
    """The six services as OS processes under the supervisor, as `cdp up` runs them,
    against a test's nats-server (free ports, one data folder, a log file each, quiet
    logs, quick restarts):

        async with Platform(data_dir, nats_url=url, env={...}) as p: ...

    `p.codes` holds the exit statuses afterwards."""

    def __init__(
        self,
        data_dir: Path,
        *,
        nats_url: str,
        env: Mapping[str, str] | None = None,
        services: Sequence[str] = SERVICES,
    ) -> None:
        super().__init__(
            data_dir,
            nats_url=nats_url,
            services=services,
            env={"CDP_LOG_LEVEL": "warning", "PYTHONPATH": str(ROOT), **(env or {})},
            backoff_initial=0.2,
        )

    def query(
        self, service: str, sql: str, args: tuple[object, ...] = ()
    ) -> list[tuple[object, ...]]:
        """Rows of `sql` on the service's SQLite file (read-only; [] while a table is missing)."""
        db = self.db(service)
        if not db.exists():
            return []
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
                return [tuple(r) for r in conn.execute(sql, args).fetchall()]
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise

    def scalar(self, service: str, sql: str, args: tuple[object, ...] = ()) -> int:
        rows = self.query(service, sql, args)
        return int(rows[0][0] or 0) if rows else 0  # type: ignore[call-overload]


class CdpUp:
    """`cdp up` in a subprocess on the given ports, its output collected line by line:

        up = CdpUp(tmp_path / "var", ports, nats_port, env={...})
        await up.start()
        await up.wait_ready()
        ...
        assert await up.interrupt() == 0, up.text

    `close()` (always, in a `finally`) kills it if it still runs. Every process it starts
    carries `CDP_TEST_RUN=<data dir>` in its environment (`up.marker`), so a test can find
    what is left running."""

    def __init__(
        self,
        data_dir: Path,
        ports: dict[str, int],
        nats_port: int,
        env: dict[str, str] | None = None,
        without: tuple[str, ...] = (),
        *,
        args: tuple[str, ...] = (),
    ) -> None:
        """`env` is added to this process's environment, less `without` (and less the
        NATS address and key: `cdp up` starts its own server); `args` are more options
        of `cdp up`."""
        self.data_dir = data_dir
        self.args = args
        self.ports = ports
        self.nats_port = nats_port
        self.marker = f"CDP_TEST_RUN={data_dir}"
        self.env = {
            **{
                k: v
                for k, v in os.environ.items()
                if k not in ("CDP_NATS_URL", "CDP_NATS_NKEY", *without)
            },
            "CDP_CONSOLE_PORT": str(free_port()),  # never the default 8080 of a person's console
            **(env or {}),
            **{port_variable(n): str(p) for n, p in ports.items()},
            "CDP_TEST_RUN": str(data_dir),
        }
        self.lines: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def text(self) -> str:
        return "".join(self.lines)

    async def printed(self, text: str) -> bool:
        """Whether `cdp up` has printed `text` (for `eventually`)."""
        return text in self.text

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    async def start(self) -> None:
        cdp = Path(sys.executable).parent / "cdp"
        self.proc = await asyncio.create_subprocess_exec(
            str(cdp),
            "up",
            "--data-dir",
            str(self.data_dir),
            "--nats-port",
            str(self.nats_port),
            *self.args,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        self._reader = asyncio.create_task(self._read(self.proc))

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            self.lines.append(raw.decode(errors="replace"))

    async def wait_ready(self, timeout: float = 40.0) -> None:
        """Until every service answers 200 on /readyz; fails if `cdp up` exits first."""
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while not await all_ready(session, self.ports):
                assert self.returncode is None, "cdp up exited early:\n" + self.text
                assert time.monotonic() < deadline, f"not ready in {timeout} s:\n{self.text}"
                await asyncio.sleep(0.1)

    async def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        if self._reader is not None:
            await self._reader
        return code

    async def interrupt(self, timeout: float = 30.0) -> int:
        """Ctrl-C (SIGINT), as a user stops it; its exit status."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)
        return await self.wait_exit(timeout)

    async def close(self) -> None:
        """Kill it if it still runs. Idempotent."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await self._reader
