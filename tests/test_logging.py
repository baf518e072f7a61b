"""Logs: JSON lines off a terminal, per-message context bound, no raw email or phone."""

from __future__ import annotations

import ipaddress
import json
import string

import phonenumbers
import pytest
import structlog
from hypothesis import assume, example, given
from hypothesis import strategies as st

from shared.log import configure_logging, redact_text


def test_redact_text_masks_emails_and_phones_but_not_dates() -> None:
    text = "user Jane.Doe@Example.com called +33 6 12 34 56 78 on 2026-11-29 08:53:41 seq 42"
    out = redact_text(text)
    for spelled in (
        "john@exämple.com",
        "o'brien@example.com",
        "+1  415  555  0123",
        "415/555/0123",
    ):
        assert redact_text(f"from {spelled} ok") in ("from [email] ok", "from [phone] ok"), spelled
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


# -- the masking rule, over generated addresses and numbers -----------------------------------

_LOCAL_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~" + "éüøßçñ名字антон"
_LABEL = st.text(alphabet=string.ascii_lowercase + string.digits + "äöüéñ日本пример", min_size=1)
_unicode_emails = st.builds(
    lambda local, labels, tld: f"{local}@{'.'.join(labels)}.{tld}",
    st.text(alphabet=_LOCAL_CHARS, min_size=1, max_size=20).filter(lambda s: "." not in s),
    st.lists(_LABEL.map(lambda s: s[:20]), min_size=1, max_size=3),
    st.sampled_from(["com", "de", "fr", "co.uk", "xn--p1ai", "рф", "中国"]),
)
_WRAPPERS = ["{}", "mail {} now", "<{}>", "({})", "'{}'", '"{}"', "to: {}, cc", "[{}]"]


@given(st.one_of(st.emails(), _unicode_emails), st.sampled_from(_WRAPPERS))
def test_no_generated_email_survives_masking(email: str, wrapper: str) -> None:
    out = redact_text(wrapper.format(email))
    assert "@" not in out
    # Nothing of the address is left: what remains is the wrapper's own text.
    assert set(out.replace("[email]", "", 1)) <= set(wrapper.replace("{}", "")), out


_SEPARATORS = [" ", "  ", "   ", "-", ".", "/", " - ", " / ", "\u2011"]


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


@st.composite
def _spelled_phones(draw: st.DrawFn) -> str:
    """A number as people write it: optional +country, groups of 2 to 4 digits, any of the
    usual separators (mixed), the area code sometimes in brackets."""
    digits = draw(st.text("0123456789", min_size=9, max_size=12))
    groups: list[str] = []
    while digits:
        size = draw(st.integers(2, 4)) if len(digits) > 4 else len(digits)
        groups.append(digits[:size])
        digits = digits[size:]
    seps = [draw(st.sampled_from(_SEPARATORS)) for _ in groups[1:]]
    if draw(st.booleans()):
        groups[0] = f"({groups[0]})"
        seps[0] = draw(st.sampled_from([" ", "", "-"]))
    text = groups[0] + "".join(s + g for s, g in zip(seps, groups[1:], strict=True))
    assume(not _is_ipv4(text))  # left readable: four dotted groups that form an address
    if draw(st.booleans()):
        text = f"+{draw(st.integers(1, 999))}{draw(st.sampled_from(['', ' ', '  ', '-']))}{text}"
    return text


@st.composite
def _formatted_phones(draw: st.DrawFn) -> str:
    """Real numbering plans, in the formats the phone library writes."""
    region = draw(st.sampled_from(sorted(phonenumbers.SUPPORTED_REGIONS)))
    number = phonenumbers.example_number(region)
    assume(number is not None)
    assert number is not None
    fmt = draw(
        st.sampled_from(
            [
                phonenumbers.PhoneNumberFormat.E164,
                phonenumbers.PhoneNumberFormat.INTERNATIONAL,
                phonenumbers.PhoneNumberFormat.RFC3966,
            ]
        )
    )
    return phonenumbers.format_number(number, fmt)


@given(st.one_of(_spelled_phones(), _formatted_phones()), st.sampled_from(_WRAPPERS))
def test_no_generated_phone_survives_masking(phone: str, wrapper: str) -> None:
    out = redact_text(wrapper.format(phone))
    assert "[phone]" in out
    assert not any(ch.isdigit() for ch in out), out


@given(
    st.one_of(
        st.integers(0, 99_999_999).map(str),
        st.datetimes().map(lambda d: d.isoformat()),
        st.datetimes().map(lambda d: d.strftime("%Y-%m-%d %H:%M:%S")),
        st.floats(1e9, 2e9).map(lambda f: f"{f:.6f}"),
        st.uuids().map(str),
        st.ip_addresses(v=4).map(str),
        st.integers(0, 99_999_999).map(lambda n: f"CRM{n:08d}"),
    )
)
@example("30433819-7096-d20f-5b9f-ff555504a5dd")  # a UUID whose first groups are digits
def test_ordinary_numbers_stay_readable(value: str) -> None:
    for text in (value, f"seq {value} done", f"at={value}"):
        assert redact_text(text) == text
