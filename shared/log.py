"""structlog set-up shared by every process.

JSON lines when stderr is not a terminal, readable console output when it is. A redaction
processor masks anything that looks like an email address or a phone number in every log
line, so no raw personal identifier reaches a log file.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog

# The masking rule (see README "Logs"):
# - an email address is any run of non-space characters on both sides of an "@": local
#   parts with apostrophes, plus signs or any script, international domains;
# - a phone number is 9 to 15 digits (7 to 15 after a "+") written with phone punctuation
#   between them: up to three spaces, dots, dashes, slashes or brackets between digits;
# - left readable: numbers logged as numbers, anything under 9 digits (counts, ids, dates),
#   times (digits next to ":"), decimals (one "." between two digit runs, as in epoch
#   seconds), IPv4 addresses, and digits inside words (ids such as CRM00000001).
EMAIL_RE = re.compile(r"""[^\s@<>()\[\],;:"\\]+@[^\s@<>()\[\],;:"'\\/]*\w[^\s@<>()\[\],;:"'\\/]*""")
_PHONE_SEP = r"[\s().\-/\u2010-\u2015]{0,3}"
PHONE_RE = re.compile(
    r"(?<![\w+.])(?<!\d:)(?<!\d[\-/])"  # not inside a word, a time, a decimal or a date
    rf"\+?\(?\d(?:{_PHONE_SEP}\d){{6,14}}"
    r"(?![\w:]|[.,\-/]\d)"  # not followed by more of a word, time, decimal or date
)
_DIGIT = re.compile(r"\d")
_IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
_DECIMAL = re.compile(r"\d+\.\d+")
_UUID = re.compile(r"(?<![\w-])[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}(?![\w-])")
"""Ids such as record and request ids: their digit runs are no phone number."""
SENSITIVE_KEYS = frozenset({"email", "phone", "password", "token", "secret"})
REDACTED = "[redacted]"


def _phone(match: re.Match[str]) -> str:
    text = match.group()
    digits = len(_DIGIT.findall(text))
    if digits < (7 if text.startswith("+") else 9):
        return text
    if _DECIMAL.fullmatch(text):
        return text
    if _IPV4.fullmatch(text):
        try:
            ipaddress.IPv4Address(text)
        except ValueError:
            pass  # 4 dotted groups that are no address (e.g. "06.12.345.678")
        else:
            return text
    return "[phone]"


def redact_text(text: str) -> str:
    """Mask email addresses and phone numbers inside a string."""
    if "@" in text:
        text = EMAIL_RE.sub("[email]", text)
    if "-" in text and _UUID.search(text):
        out: list[str] = []
        at = 0
        for m in _UUID.finditer(text):
            out += [PHONE_RE.sub(_phone, text[at : m.start()]), m.group()]
            at = m.end()
        out.append(PHONE_RE.sub(_phone, text[at:]))
        return "".join(out)
    return PHONE_RE.sub(_phone, text)


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
