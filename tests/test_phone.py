"""Phone numbers: one normaliser, in the region of CDP_PHONE_REGION, for ingest, identity,
profile lookups and destinations. A number that is not valid is rejected with its reason,
never guessed into another country."""

from __future__ import annotations

import pytest

from shared.config import ConfigError, load_settings
from shared.normalize import Unusable, normalize, normalize_phone, phone_e164
from shared.resources import Namespace

FRENCH_MOBILE = "0662992312"


# -- the normaliser ------------------------------------------------------------------------------


def test_a_national_number_is_read_in_the_region() -> None:
    assert phone_e164("06 62 99 23 12", "FR") == "+33662992312"
    assert phone_e164(" 0662992312 ", "FR") == "+33662992312"
    assert phone_e164("(201) 555-0123", "US") == "+12015550123"
    assert phone_e164("020 7946 0958", "GB") == "+442079460958"


def test_an_international_number_ignores_the_region() -> None:
    for region in ("US", "FR", "JP"):
        assert phone_e164("+33 6 62 99 23 12", region) == "+33662992312"
        assert phone_e164("+1 201 555 0123", region) == "+12015550123"


def test_a_number_not_valid_in_the_region_is_refused_with_its_reason() -> None:
    # A possible length for region US (it would become +10662992312), but no such number.
    out = phone_e164(FRENCH_MOBILE, "US")
    assert isinstance(out, Unusable)
    assert "region US" in out.reason
    assert normalize_phone(FRENCH_MOBILE, "US") is None
    assert normalize(None, "phone", FRENCH_MOBILE, "US") is None
    assert normalize(None, "phone", FRENCH_MOBILE, "FR") == "+33662992312"
    # Valid-looking digits under a country code that has no such number.
    assert isinstance(phone_e164("+1 011 555 0123", "US"), Unusable)


@pytest.mark.parametrize(
    "garbage", ["", "   ", "not a number", "12", "+", "+999 123", "1" * 40, "0662992312x" * 30]
)
def test_garbage_is_refused(garbage: str) -> None:
    out = phone_e164(garbage, "US")
    assert isinstance(out, Unusable) and out.reason


def test_an_unknown_region_reads_no_national_number() -> None:
    out = phone_e164(FRENCH_MOBILE, "XX")
    assert isinstance(out, Unusable) and "'XX'" in out.reason
    assert phone_e164("+33662992312", "XX") == "+33662992312"


def test_other_namespaces_are_normalised_as_before() -> None:
    hashed = Namespace("partner_sha", "person", hashed=True)
    digest = "AB" * 32
    assert normalize(hashed, "partner_sha", f" {digest} ", "FR") == digest.lower()
    assert normalize(None, "email", " Ann@Example.COM ", "FR") == "ann@example.com"
    assert normalize(None, "crm_id", "  ", "FR") is None


# -- the setting -----------------------------------------------------------------------------------


def test_phone_region_setting() -> None:
    assert load_settings("identity", {}).phone_region == "US"
    assert load_settings("identity", {"CDP_PHONE_REGION": ""}).phone_region == "US"
    assert load_settings("profile", {"CDP_PHONE_REGION": "fr"}).phone_region == "FR"
    assert load_settings("ingest", {"CDP_PHONE_REGION": " gb "}).phone_region == "GB"


@pytest.mark.parametrize("bad", ["XX", "France", "F", "001", "US,FR", "../etc", "u\ns"])
def test_a_bad_phone_region_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings("ingest", {"CDP_PHONE_REGION": bad})
    assert err.value.variable == "CDP_PHONE_REGION"
    assert "region code" in str(err.value)
