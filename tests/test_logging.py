"""Logs: JSON lines off a terminal, per-message context bound, no raw email or phone."""

from __future__ import annotations

import json

import pytest
import structlog

from shared.log import configure_logging, redact_text


def test_redact_text_masks_emails_and_phones_but_not_dates() -> None:
    text = "user Jane.Doe@Example.com called +33 6 12 34 56 78 on 2026-11-29 08:53:41 seq 42"
    out = redact_text(text)
    assert "Jane.Doe" not in out
    assert "12 34 56" not in out
    assert "[email]" in out
    assert "[phone]" in out
    assert "2026-11-29 08:53:41" in out
    assert "seq 42" in out


def test_log_lines_are_json_with_bound_context_and_redacted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("info", "json")
    try:
        log = structlog.get_logger().bind(subject="cdp.ingest.crm", msg_id="m-1")
        log.info("record rejected", email="a@b.co", detail="from a@b.co / 415-555-0100 x")
        line = capsys.readouterr().err.strip().splitlines()[-1]
        entry = json.loads(line)
        assert entry["subject"] == "cdp.ingest.crm"
        assert entry["msg_id"] == "m-1"
        assert entry["email"] == "[redacted]"
        assert "a@b.co" not in line
        assert "415-555-0100" not in line
        assert entry["level"] == "info"
    finally:
        configure_logging("warning", "json")
