"""Who may see the console: everyone on a loopback address, else only who knows its token.

The token (`CDP_CONSOLE_TOKEN`, else `<data dir>/secrets/console.token`, written at first
start) is typed once on /login and compared in constant time. The browser then holds a
cookie (HttpOnly, SameSite=Strict) with an HMAC of a fixed label under the token, never the
token itself; every request checks it in constant time. Forms that change something also
carry a form token, an HMAC of the cookie (CSRF: a cross-site page can neither send the
cookie nor read the form token)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Middleware

from ops.security import token_file

TOKEN_FILE = "console.token"
COOKIE = "cdp_console"
_LABEL = b"cdp-console-session-v1"
_OPEN_PATHS = ("/login", "/static/", "/healthz")


def console_token(secrets_dir: Path, env: dict[str, str] | None = None) -> tuple[str, Path | None]:
    """CDP_CONSOLE_TOKEN when given, else the one in `<secrets>/console.token`, written
    (0600) the first time it is asked for."""
    return token_file(secrets_dir, TOKEN_FILE, "CDP_CONSOLE_TOKEN", env)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Auth:
    """Session cookies and form tokens under one login token (none: no login needed)."""

    def __init__(self, token: str | None) -> None:
        self.required = token is not None
        self._key = hashlib.sha256((token or "").encode()).digest()
        self._token = (token or "").encode()

    def session_value(self) -> str:
        return hmac.new(self._key, _LABEL, hashlib.sha256).hexdigest()

    def token_ok(self, given: str) -> bool:
        return self.required and hmac.compare_digest(given.encode(), self._token)

    def authenticated(self, request: web.Request) -> bool:
        if not self.required:
            return True
        cookie = request.cookies.get(COOKIE, "")
        return hmac.compare_digest(cookie.encode(), self.session_value().encode())

    def form_token(self) -> str:
        """The CSRF token of forms that change something."""
        return hmac.new(self._key, b"form:" + self.session_value().encode(), "sha256").hexdigest()

    def form_ok(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.form_token().encode())

    def set_cookie(self, response: web.StreamResponse, secure: bool) -> None:
        response.set_cookie(
            COOKIE,
            self.session_value(),
            httponly=True,
            samesite="Strict",
            secure=secure,
            path="/",
            max_age=12 * 3600,
        )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def middleware(auth: Auth) -> Middleware:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if auth.authenticated(request) or request.path.startswith(_OPEN_PATHS):
            return await handler(request)
        if request.headers.get("HX-Request"):
            return web.Response(status=401, headers={"HX-Redirect": "/login"})
        raise web.HTTPSeeOther("/login")

    return check
