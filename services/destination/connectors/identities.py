"""Identity values as destinations want them: normalised, or SHA-256 hashed.

Hashing follows the platform rule: normalise (trim and lower-case an email, E.164 for a
phone), then SHA-256, lower-case hex, no salt. Already-hashed namespaces (`email_sha256`,
`phone_sha256`) are taken as they come, lower-cased, and only when they are hex digests, so
a raw value filed under a hashed namespace by mistake never leaves.
"""

from __future__ import annotations

import hashlib

from services.destination.model import Activation
from shared.normalize import HEX_DIGEST_RE, normalize_email, normalize_phone

EMAIL = "email"
PHONE = "phone"
EMAIL_SHA256 = "email_sha256"
PHONE_SHA256 = "phone_sha256"
MOBILE_IDS = ("gaid", "idfa")


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def _unique(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


def emails(a: Activation) -> list[str]:
    """The activation's emails, trimmed and lower-cased, in order, without repeats."""
    out = [normalize_email(v) for v in a.identities.get(EMAIL, ())]
    return _unique([v for v in out if v])


def phones(a: Activation, default_region: str) -> list[str]:
    """The activation's phones in E.164, in order, without repeats (numbers that are not valid
    dropped); national numbers are read in `default_region`."""
    out = [normalize_phone(v, default_region) for v in a.identities.get(PHONE, ())]
    return _unique([v for v in out if v])


def _digests(a: Activation, namespace: str) -> list[str]:
    values = (v.strip() for v in a.identities.get(namespace, ()))
    return [v.lower() for v in values if HEX_DIGEST_RE.fullmatch(v)]


def email_hashes(a: Activation) -> list[str]:
    """SHA-256 of each normalised email, then the `email_sha256` digests."""
    return _unique([sha256_hex(v) for v in emails(a)] + _digests(a, EMAIL_SHA256))


def phone_hashes(a: Activation, default_region: str) -> list[str]:
    """SHA-256 of each E.164 phone, then the `phone_sha256` digests."""
    return _unique([sha256_hex(v) for v in phones(a, default_region)] + _digests(a, PHONE_SHA256))


def mobile_ids(a: Activation) -> list[str]:
    """Advertising ids (gaid, then idfa) as they come, trimmed."""
    out: list[str] = []
    for ns in MOBILE_IDS:
        out.extend(v.strip() for v in a.identities.get(ns, ()) if v.strip())
    return _unique(out)
