"""Normalisation of identity values before they are linked.

Two spellings of one identity must give one key: emails are trimmed and lower-cased, phones
are written in E.164, SHA-256 digests are lower-cased hex. Anything else is only trimmed.
Ingest, identity, profile lookups and destinations all read identities through these
functions, with the region of `CDP_PHONE_REGION` passed in explicitly. Pure functions, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import phonenumbers

from shared.resources import Namespace

HEX_DIGEST_RE = re.compile(r"[0-9a-fA-F]{64}")
"""A SHA-256 digest written in hex (either case)."""

PHONE = "phone"
"""The namespace whose values are phone numbers."""


@dataclass(frozen=True, slots=True)
class Unusable:
    """Why an identity value cannot be used (for a phone: why it is not a number)."""

    reason: str


_PARSE_REASONS: dict[int, str] = {
    phonenumbers.NumberParseException.INVALID_COUNTRY_CODE: "no known country code",
    phonenumbers.NumberParseException.NOT_A_NUMBER: "not a phone number",
    phonenumbers.NumberParseException.TOO_SHORT_AFTER_IDD: "too short",
    phonenumbers.NumberParseException.TOO_SHORT_NSN: "too short",
    phonenumbers.NumberParseException.TOO_LONG: "too long",
}
_LENGTH_REASONS: dict[int, str] = {
    phonenumbers.ValidationResult.INVALID_COUNTRY_CODE: "no known country code",
    phonenumbers.ValidationResult.TOO_SHORT: "too short",
    phonenumbers.ValidationResult.TOO_LONG: "too long",
    phonenumbers.ValidationResult.INVALID_LENGTH: "a length no number of its country has",
}


def phone_e164(value: str, region: str) -> str | Unusable:
    """The E.164 form of a phone number (`+33662992312`), or why it cannot be read.

    A value with a leading "+" is read as an international number; any other as a national
    number of `region` (an ISO 3166 code such as US or FR). The number must be valid, that
    is assigned in its country's numbering plan, not merely of a possible length.
    """
    text = value.strip()
    if not text:
        return Unusable("empty")
    international = text.startswith("+")
    if not international and region not in phonenumbers.SUPPORTED_REGIONS:
        return Unusable(f"no numbering plan known for region {region!r}")
    where = "" if international else f" in region {region}"
    try:
        number = phonenumbers.parse(text, None if international else region)
    except phonenumbers.NumberParseException as exc:
        return Unusable(_PARSE_REASONS.get(exc.error_type, "not a phone number") + where)
    if phonenumbers.is_valid_number(number):
        return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))
    length = phonenumbers.is_possible_number_with_reason(number)
    if length in _LENGTH_REASONS:
        return Unusable(_LENGTH_REASONS[length] + where)
    return Unusable("not a valid number" + where)


def normalize_phone(value: str, default_region: str) -> str | None:
    """E.164 form of a phone number, or None when it is not a valid number (`phone_e164`)."""
    out = phone_e164(value, default_region)
    return out if isinstance(out, str) else None


def normalize_email(value: str) -> str | None:
    """An email trimmed and lower-cased, or None when nothing is left."""
    return value.strip().lower() or None


def normalized(
    namespace: Namespace | None, symbol: str, value: str, default_region: str
) -> str | Unusable:
    """The value of identity `symbol:value` as it is linked, or why it cannot be used.

    `namespace` is the namespace's configuration (None when the symbol is not configured).
    Hashed namespaces are left as they come, except that a hex SHA-256 digest is trimmed and
    lower-cased (a digest is case-insensitive); other hashed values are only trimmed.
    Phones are read with `phone_e164` in `default_region`.
    """
    text = value.strip()
    if namespace is not None and namespace.hashed:
        out = text.lower() if HEX_DIGEST_RE.fullmatch(text) else text
    elif symbol == "email":
        out = normalize_email(text) or ""
    elif symbol == PHONE:
        return phone_e164(text, default_region)
    else:
        out = text
    return out or Unusable("empty")


def normalize(
    namespace: Namespace | None, symbol: str, value: str, default_region: str
) -> str | None:
    """The value of identity `symbol:value` as it is linked, or None if nothing usable is left
    (`normalized`, without the reason)."""
    out = normalized(namespace, symbol, value, default_region)
    return out if isinstance(out, str) else None
