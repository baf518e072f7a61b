"""structlog set-up shared by every process.

JSON lines when stderr is not a terminal, readable console output when it is. A redaction
processor masks anything that looks like an email address or a phone number in every log
line, so no raw personal identifier reaches a log file.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog

EMAIL_RE = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+")
# 9 to 15 digits, optionally after "+", with single spaces, dots, dashes or brackets between.
# Dates (8 digits) and times (digits next to ':') are left alone.
PHONE_RE = re.compile(r"(?<![\w:+])\+?\(?\d(?:[\s().\-]?\d){8,14}(?![\w:])")
SENSITIVE_KEYS = frozenset({"email", "phone", "password", "token", "secret"})
REDACTED = "[redacted]"


def redact_text(text: str) -> str:
    """Mask email addresses and phone numbers inside a string."""
    if "@" in text:
        text = EMAIL_RE.sub("[email]", text)
    return PHONE_RE.sub("[phone]", text)


def _redact(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if depth >= 4:
        return value
    if isinstance(value, Mapping):
        return {
            k: (
                REDACTED
                if isinstance(k, str) and k.lower() in SENSITIVE_KEYS
                else _redact(v, depth + 1)
            )
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redact(v, depth + 1) for v in value]
    return value


def redact_processor(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in list(event_dict.items()):
        if key.lower() in SENSITIVE_KEYS:
            event_dict[key] = REDACTED
        elif key == "exc_info":
            continue
        else:
            event_dict[key] = _redact(value)
    return event_dict


class _RedactExceptions:
    """Render exceptions first, then redact the rendered text too."""

    def __call__(
        self, logger: Any, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        exc = event_dict.get("exception")
        if isinstance(exc, str):
            event_dict["exception"] = redact_text(exc)
        return event_dict


class _StderrLogger:
    """Writes each line to whatever `sys.stderr` is at the time (tests swap it)."""

    def msg(self, message: str) -> None:
        stream = sys.stderr
        try:
            stream.write(message + "\n")
            stream.flush()
        except (ValueError, OSError):
            pass  # a closed or broken stream must never break the caller

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


_STDERR_LOGGER = _StderrLogger()


def _stderr_logger_factory(*_args: Any) -> _StderrLogger:
    return _STDERR_LOGGER


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog for this process. `fmt` is auto, json or console."""
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        redact_processor,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if use_console:
        renderer = structlog.dev.ConsoleRenderer()
    else:
        shared += [structlog.processors.format_exc_info, _RedactExceptions()]
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=_stderr_logger_factory,
        cache_logger_on_first_use=True,
    )
