"""The web console: `make_app` builds the aiohttp application, `Console` runs it.

    console = Console(nats_url, data_dir)          # 127.0.0.1:8080 unless configured
    await console.start()                          # connects to NATS, listens
    ...
    await console.stop()

Bound to a loopback address it needs no login; bound anywhere else every page needs the
login token (see ops.console.auth)."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

import aiohttp_jinja2
import jinja2
import structlog
from aiohttp import web

from ops.console import views
from ops.console.auth import Auth, Handler, console_token, is_loopback, middleware
from ops.console.source import Source, credentials
from ops.platform import probe_host
from shared.log import redact_text

HERE = Path(__file__).resolve().parent
DEFAULT_PORT = 8080
log = structlog.get_logger(component="console")


def console_address(env: Mapping[str, str] | None = None) -> tuple[str, int]:
    """(`CDP_BIND`, `CDP_CONSOLE_PORT`), 127.0.0.1:8080 by default."""
    env = os.environ if env is None else env
    raw = env.get("CDP_CONSOLE_PORT", "")
    try:
        port = int(raw) if raw else DEFAULT_PORT
    except ValueError:
        raise ValueError(f"CDP_CONSOLE_PORT: not a port: {raw!r}") from None
    return env.get("CDP_BIND", "127.0.0.1") or "127.0.0.1", port


async def login_form(request: web.Request) -> web.StreamResponse:
    return aiohttp_jinja2.render_template(
        "login.html", request, {"page": "login", "error": None, "login_required": True}
    )


async def login(request: web.Request) -> web.StreamResponse:
    auth = request.app[views.AUTH]
    form = await request.post()
    if not auth.required:
        raise web.HTTPSeeOther("/")
    if not auth.token_ok(str(form.get("token", ""))):
        log.warning("console login refused", peer=request.remote)
        response = aiohttp_jinja2.render_template(
            "login.html",
            request,
            {"page": "login", "error": "wrong token", "login_required": True},
            status=401,
        )
        return response
    response = web.HTTPSeeOther("/")
    auth.set_cookie(response, secure=request.secure)
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    response = web.HTTPSeeOther("/login")
    response.del_cookie("cdp_console", path="/")
    raise response


async def healthz(_request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok"})


@web.middleware
async def logged(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One line per request, with emails and phones in the path masked (aiohttp's own
    access log is off: it would write the query as it came)."""
    started = time.monotonic()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        structlog.get_logger(component="console").info(
            "request",
            method=request.method,
            path=redact_text(request.path_qs)[:300],
            status=status,
            ms=round((time.monotonic() - started) * 1000, 1),
        )


@web.middleware
async def headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault(
        "Content-Security-Policy",
        "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "frame-ancestors 'none'",
    )
    if request.path != "/healthz" and not request.path.startswith("/static/"):
        response.headers.setdefault("Cache-Control", "no-store")
    return response


def make_app(source: Source, token: str | None) -> web.Application:
    """The console over `source`; `token` None: no login (a loopback address)."""
    auth = Auth(token)
    app = web.Application(
        middlewares=[logged, headers, middleware(auth)], client_max_size=64 * 1024
    )
    app[views.SOURCE] = source
    app[views.AUTH] = auth
    app[views.RATE] = views.IngestRate()
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=jinja2.select_autoescape(("html",)),
        undefined=jinja2.StrictUndefined,
    )
    app.router.add_get("/", views.overview)
    app.router.add_get("/fragments/overview", views.overview_fragment)
    app.router.add_get("/audiences", views.audiences)
    app.router.add_post("/audiences/estimate", views.estimate)
    app.router.add_get("/audiences/live", views.audiences_live)
    app.router.add_get("/profiles", views.profiles)
    app.router.add_get("/destinations", views.destinations)
    app.router.add_post("/destinations/{name}/replay", views.replay)
    app.router.add_get("/batches", views.batches)
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/healthz", healthz)
    app.router.add_static("/static/", HERE / "static")
    return app


class Console:
    """The console's NATS connection and HTTP listener, from `start()` to `stop()`."""

    def __init__(
        self,
        nats_url: str,
        data_dir: Path,
        *,
        as_admin: bool = False,
        bind: str | None = None,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        env = os.environ if env is None else env
        default_bind, default_port = console_address(env)
        self.bind = bind or default_bind
        self.port = default_port if port is None else port
        self.token_file: Path | None = None
        token: str | None = None
        if not is_loopback(self.bind):
            token, self.token_file = console_token(data_dir / "secrets", dict(env))
        seed, prefix = credentials(data_dir, as_admin=as_admin, env=env)
        self.source = Source(nats_url, seed, prefix, can_write=as_admin)
        self.app = make_app(self.source, token)
        self._runner: web.AppRunner | None = None

    @property
    def login_required(self) -> bool:
        return self.app[views.AUTH].required

    @property
    def url(self) -> str:
        return f"http://{probe_host(self.bind)}:{self.port}"

    async def start(self) -> None:
        await self.source.start()
        self._runner = web.AppRunner(self.app, access_log=None)  # `logged` logs, masked
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.bind, self.port)
        try:
            await site.start()
        except OSError:
            await self.stop()
            raise
        if self.port == 0:
            server = site._server  # the port chosen by the system
            sockets = getattr(server, "sockets", None) or []
            if sockets:
                self.port = int(sockets[0].getsockname()[1])
        log.info("console listening", url=self.url, admin=self.source.can_write)

    async def stop(self) -> None:
        await self.source.stop()  # ends the live streams first: the runner waits for them
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
