"""The six services as separate OS processes under the supervisor, as `cdp up` runs them,
against a test's nats-server: free ports, one data folder, one log file per service."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path

import aiohttp
import nats

from ops.cli.supervisor import ProcessSpec, Supervisor
from ops.cli.up import readiness, wait_ready
from ops.natsd import free_port
from shared.config import SERVICES, port_variable
from shared.streams import ensure_streams
from tests.helpers import all_ready

ROOT = Path(__file__).resolve().parent.parent


class Platform:
    """`async with Platform(nats_url, data_dir, env) as p:` starts the six services, waits
    until every /readyz answers 200, and stops them afterwards (`p.codes`: exit statuses)."""

    def __init__(
        self,
        nats_url: str,
        data_dir: Path,
        env: dict[str, str] | None = None,
        services: tuple[str, ...] = SERVICES,
    ) -> None:
        self.nats_url = nats_url
        self.data_dir = data_dir
        self.ports = {name: free_port() for name in services}
        self.urls = {name: f"http://127.0.0.1:{port}" for name, port in self.ports.items()}
        common = {
            "CDP_NATS_URL": nats_url,
            "CDP_DATA_DIR": str(data_dir),
            "CDP_LOG_FORMAT": "json",
            "CDP_LOG_LEVEL": "warning",
            "PYTHONPATH": str(ROOT),
            **{port_variable(n): str(p) for n, p in self.ports.items()},
            **(env or {}),
        }
        self.specs = [
            ProcessSpec(
                name,
                [sys.executable, "-m", f"services.{name}"],
                env=common,
                log_file=data_dir / "logs" / f"{name}.log",
            )
            for name in services
        ]
        self.supervisor = Supervisor(self.specs, backoff_initial=0.2)
        self.codes: dict[str, int | None] = {}

    def db(self, service: str) -> Path:
        return self.data_dir / f"{service}.db"

    def log_tail(self, service: str, chars: int = 3000) -> str:
        path = self.data_dir / "logs" / f"{service}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    async def start(self, timeout: float = 60.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        nc = await nats.connect(self.nats_url, connect_timeout=5)
        try:
            await ensure_streams(nc.jetstream())
        finally:
            await nc.close()
        await self.supervisor.start()
        states = await wait_ready(self.urls, timeout)
        not_ready = {n: why for n, (ok, why) in states.items() if not ok}
        if not_ready:
            await self.stop()
            raise AssertionError(f"services not ready: {not_ready}")

    async def stop(self) -> dict[str, int | None]:
        self.codes = await self.supervisor.stop()
        return self.codes

    async def __aenter__(self) -> Platform:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def ready(self, service: str) -> bool:
        """Whether `service` answers 200 on /readyz now."""
        async with aiohttp.ClientSession() as session:
            ok, _why = await readiness(session, self.urls[service])
        return ok

    async def all_ready(self) -> dict[str, str]:
        """The services that do not answer 200 on /readyz, with why (empty: all ready)."""
        async with aiohttp.ClientSession() as session:
            out = {}
            for name, url in self.urls.items():
                ok, why = await readiness(session, url)
                if not ok:
                    out[name] = why
            return out

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
    ) -> None:
        """`env` is added to this process's environment, less `without` (and less the
        NATS address and key: `cdp up` starts its own server)."""
        self.data_dir = data_dir
        self.ports = ports
        self.nats_port = nats_port
        self.marker = f"CDP_TEST_RUN={data_dir}"
        self.env = {
            **{
                k: v
                for k, v in os.environ.items()
                if k not in ("CDP_NATS_URL", "CDP_NATS_NKEY", *without)
            },
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
