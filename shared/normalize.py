"""Normalisation of identity values before they are linked.

Two spellings of one identity must give one key: emails are trimmed and lower-cased, phones
are written in E.164, SHA-256 digests are lower-cased hex. Anything else is only trimmed.
Pure functions, no I/O.
"""

from __future__ import annotations

import re

import phonenumbers

from shared.resources import Namespace

HEX_DIGEST_RE = re.compile(r"[0-9a-fA-F]{64}")
"""A SHA-256 digest written in hex (either case)."""


def normalize_phone(value: str, default_region: str = "US") -> str | None:
    """E.164 form of a phone number, or None when it is not a possible number.

    A number without a leading "+" is read as a national number of `default_region`.
    """
    text = value.strip()
    if not text:
        return None
    region = None if text.startswith("+") else default_region
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(number):
        return None
    out = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return str(out)


def normalize(
    namespace: Namespace | None, symbol: str, value: str, default_region: str = "US"
) -> str | None:
    """The value of identity `symbol:value` as it is linked, or None if nothing usable is left.

    `namespace` is the namespace's configuration (None when the symbol is not configured).
    Hashed namespaces are left as they come, except that a hex SHA-256 digest is trimmed and
    lower-cased (a digest is case-insensitive); other hashed values are only trimmed.
    """
    text = value.strip()
    if namespace is not None and namespace.hashed:
        out = text.lower() if HEX_DIGEST_RE.fullmatch(text) else text
    elif symbol == "email":
        out = text.lower()
    elif symbol == "phone":
        return normalize_phone(text, default_region)
    else:
        out = text
    return out or None
