"""Phone numbers: one normaliser, in the region of CDP_PHONE_REGION, for ingest, identity,
profile lookups and destinations. A number that is not valid is rejected with its reason,
never guessed into another country."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from ops.cli import people
from ops.natsd import NatsServer
from services.identity.service import IdentityService
from services.ingest.service import IngestService
from services.profile.service import ProfileService
from services.segmentation.service import SegmentationService
from shared import admin, subjects
from shared.admin import (
    AdminFailure,
    ApplyMany,
    ApplyManyResult,
    ConfigObject,
    ErrorsQuery,
    ErrorsResult,
)
from shared.config import ConfigError, load_settings
from shared.normalize import Unusable, normalize, normalize_phone, phone_e164
from shared.resources import Namespace
from shared.runtime import Service
from tests.helpers import eventually, running, settings_for

CLASSES: tuple[type[Service], ...] = (
    IngestService,
    IdentityService,
    ProfileService,
    SegmentationService,
)
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


# -- end to end ------------------------------------------------------------------------------------


async def send(nc: Client, dataset: str, record: Mapping[str, Any]) -> None:
    await nc.jetstream().publish(f"cdp.ingest.{dataset}", json.dumps(record).encode())


async def found(nc: Client, identity: str) -> dict[str, Any] | None:
    """The profile holding `identity`, as `cdp profile` shows it, or None."""
    try:
        return await people.profile(nc, identity, None, 20)
    except AdminFailure as exc:
        assert exc.code == "not_found", exc.message
        return None


async def crm_errors(nc: Client) -> ErrorsResult:
    return await admin.request(
        nc, subjects.admin("ingest", "errors"), ErrorsQuery("crm"), ErrorsResult
    )


@pytest.mark.asyncio
async def test_national_numbers_follow_the_region_in_ingest_identity_and_lookups(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    async with running(CLASSES, nats_server.url, tmp_path, nc, phone_region="FR"):
        await send(nc, "crm", {"crm_id": "FR1", "phone": FRENCH_MOBILE})

        async def profiled() -> bool:
            return await found(nc, f"phone:{FRENCH_MOBILE}") is not None

        await eventually(profiled)
        for spelling in (FRENCH_MOBILE, "+33662992312", "06 62 99 23 12", "+33 6 62 99 23 12"):
            profile = await people.profile(nc, f"phone:{spelling}", None, 20)
            graph = await people.identity_graph(nc, f"phone:{spelling}")
            assert profile["profile_id"] == graph["profile_id"], spelling
            assert {"namespace": "phone", "value": "+33662992312"} in profile["identities"]
            assert any(
                n["namespace"] == "phone" and n["value"] == "+33662992312"
                for n in graph["identities"]
            )
        assert (await crm_errors(nc)).total == 0


@pytest.mark.asyncio
async def test_a_number_not_valid_in_the_region_is_rejected_with_its_reason(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    async with running(CLASSES, nats_server.url, tmp_path, nc):  # region US, the default
        await send(nc, "crm", {"crm_id": "US1", "email": "us1@example.com", "phone": FRENCH_MOBILE})
        await send(nc, "crm", {"crm_id": "US2", "phone": "+1 201 555 0123"})

        async def second_profiled() -> bool:
            return await found(nc, "crm_id:US2") is not None

        await eventually(second_profiled)  # records are taken in order: the first is done too
        errors = await crm_errors(nc)
        assert errors.total == 1
        (rejected,) = errors.records
        assert (rejected.reason, rejected.path, rejected.expected, rejected.got) == (
            "invalid identity",
            "phone",
            "a valid phone number (E.164, or national in region US)",
            f"'{FRENCH_MOBILE}'",
        )
        assert "US1" in rejected.payload
        # Nothing of that record was linked, not even its valid identities.
        for identity in ("crm_id:US1", "email:us1@example.com", "phone:+10662992312"):
            assert await found(nc, identity) is None
            with pytest.raises(AdminFailure):
                await people.identity_graph(nc, identity)
        with pytest.raises(AdminFailure) as unusable:
            await people.profile(nc, f"phone:{FRENCH_MOBILE}", None, 20)
        assert "region US" in unusable.value.message
        second = await people.profile(nc, "phone:(201) 555-0123", None, 20)
        assert {"namespace": "phone", "value": "+12015550123"} in second["identities"]


@pytest.mark.asyncio
async def test_lookups_read_a_custom_hashed_namespace_as_identity_links_it(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    digest = hashlib.sha256(b"partner-42").hexdigest()
    async with running(CLASSES, nats_server.url, tmp_path, nc) as services:
        objects = [
            ConfigObject("namespace", {"symbol": "partner_sha", "type": "person", "hashed": True}),
            ConfigObject(
                "schema",
                {
                    "name": "partner",
                    "class": "profile",
                    "fields": {"key": {"type": "string", "identity": "partner_sha"}},
                },
            ),
            ConfigObject(
                "dataset", {"name": "partner", "schema": "partner", "profile_enabled": True}
            ),
        ]
        await admin.request(
            nc, subjects.admin("ingest", "apply"), ApplyMany(objects), ApplyManyResult
        )
        await send(nc, "partner", {"key": digest.upper()})

        async def profiled() -> bool:
            return await found(nc, f"partner_sha:{digest.upper()}") is not None

        await eventually(profiled)
        graph = await people.identity_graph(nc, f"partner_sha:{digest.upper()}")
        profile = await people.profile(nc, f"partner_sha: {digest.upper()} ", None, 20)
        assert profile["profile_id"] == graph["profile_id"]
        assert profile["identities"] == [{"namespace": "partner_sha", "value": digest}]
        # After a restart the profile service still knows the namespace.
        await services["profile"].stop()
        again = ProfileService(settings_for("profile", nats_server.url, tmp_path))
        await again.start()
        try:
            after = await people.profile(nc, f"partner_sha:{digest.upper()}", None, 20)
            assert after["profile_id"] == graph["profile_id"]
        finally:
            await again.stop()
