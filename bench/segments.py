"""The 50 segments the platform section adds to the retail example's own five.

A mix, as a retailer would write them: attribute conditions (streaming), event conditions
with windows of at most a day (streaming), and longer windows, no window, `between` dates
and aggregates (batch only). Selectivities on the data `scripts/gen` makes run from none
(loyalty tiers: the section loads no loyalty file) to about a tenth of the profiles, so
that the memberships they make stay a realistic share of profiles x segments.

Two of them are the section's probes (see `bench/platform.py`): `bench-probe` (any event
in the last hour: every event the latency measure sends realises it for a profile that
had none) and `bench-logged-in` (a login in the last day: the throughput measure counts
its members exactly).
"""

from __future__ import annotations

PROBE = "bench-probe"
LOGGED_IN = "bench-logged-in"

ATTRIBUTE: tuple[tuple[str, str], ...] = (
    ("london-optin", 'homeAddress.city = "London" and consents.marketing.email = "y"'),
    ("seattle", 'homeAddress.city = "Seattle"'),
    ("denver-women", 'homeAddress.city = "Denver" and person.gender = "female"'),
    ("sms-optin", 'consents.marketing.sms = "y" and phone exists'),
    ("first-name-j", 'person.name.first startsWith "J"'),
    ("born-before-1950", 'person.birth_date < "1950-01-01"'),
    ("born-2000s", 'person.birth_date >= "2000-01-01"'),
    ("non-binary", 'person.gender = "non_binary"'),
    ("gb-undisclosed", 'person.gender = "undisclosed" and homeAddress.country = "GB"'),
    ("crm-updated-november", 'updated_at >= "2026-11-01"'),
    (
        "org-email-gb-any",
        'email endsWith "@example.org" and homeAddress.country = "GB" '
        'and consents.marketing.any = "y"',
    ),
    ("austin-dallas", 'homeAddress.city in ["Austin", "Dallas"]'),
    (
        "us-men-no-consent",
        'consents.marketing.any = "n" and homeAddress.country = "US" and person.gender = "male"',
    ),
    ("gold-bench", 'loyalty.tier in ["gold", "platinum"]'),
    ("postal-9", 'homeAddress.country = "US" and homeAddress.postal_code startsWith "9"'),
    ("last-name-mc", 'person.name.last matchesIgnoreCase "^(mc|mac)"'),
    ("boston-optout", 'homeAddress.city = "Boston" and consents.marketing.email = "n"'),
    ("no-gender", "not person.gender exists"),
    ("oak-street", 'homeAddress.street contains "Oak"'),
    ("miami-sms", 'homeAddress.city = "Miami" and consents.marketing.sms = "y"'),
)

EVENT_STREAMING: tuple[tuple[str, str], ...] = (
    (PROBE, "event() within 1 hour"),
    (LOGGED_IN, 'event(type = "app.login") within 1 day'),
    ("cart-today", 'event(type = "cart.add") within 1 day'),
    (
        "cart-no-buy-today",
        'event(type = "cart.add") within 1 day and not event(type = "commerce.purchase") '
        "within 1 day",
    ),
    ("browsers-today", 'count(event(type = "web.pageview") within 1 day) >= 3'),
    (
        "shoe-viewers",
        'event(type = "web.productview" and product.category = "shoes") within 12 hours',
    ),
    ("searchers", 'event(type = "web.search") within 6 hours'),
    ("mobile-today", 'event(device.type = "mobile") within 1 day'),
    (
        "viewed-then-carted",
        'event(type = "web.productview") then event(type = "cart.add") within 1 day',
    ),
    (
        "added-then-removed",
        'event(type = "cart.add") then event(type = "cart.remove") within 2 hours',
    ),
    ("app-regulars", 'count(event(type = "app.open") within 1 day) >= 2'),
    ("pricey-cart", 'event(type = "cart.add" and product.price > 100) within 1 day'),
    ("cart-page-hour", 'event(page.url contains "/cart") within 1 hour'),
    ("us-cart", 'homeAddress.country = "US" and event(type = "cart.add") within 1 day'),
    ("optin-active", f'inSegment("email-optin") and inSegment("{LOGGED_IN}")'),
)

BATCH: tuple[tuple[str, str], ...] = (
    ("buyers-90d", 'event(type = "commerce.purchase") within 90 days'),
    ("frequent-90d", 'count(event(type = "commerce.purchase") within 90 days) >= 3'),
    (
        "big-spenders",
        'sum(commerce.order.total of event(type = "commerce.purchase") within 365 days) > 1000',
    ),
    ("big-baskets", 'avg(commerce.order.total of event(type = "commerce.purchase")) > 200'),
    (
        "lapsed",
        'event(type = "commerce.purchase") within 365 days and '
        'not event(type = "commerce.purchase") within 90 days',
    ),
    ("returners", 'event(type = "commerce.return")'),
    ("winter-buyers", 'event(type = "commerce.purchase") between 2025-12-01 and 2026-02-28'),
    ("visitors-30d", 'event(type = "web.pageview") within 30 days'),
    ("engaged-week", "count(event() within 7 days) >= 5"),
    ("gold-buyers", 'inSegment("gold-bench") and event(type = "commerce.purchase") within 30 days'),
    (
        "top-order",
        'max(commerce.order.total of event(type = "commerce.purchase") within 104 weeks) > 500',
    ),
    (
        "london-no-purchase",
        'homeAddress.city = "London" and not event(type = "commerce.purchase") within 30 days',
    ),
    (
        "searched-then-bought",
        'event(type = "web.search") then event(type = "commerce.purchase") within 7 days',
    ),
    (
        "optin-viewers-week",
        'consents.marketing.email = "y" and event(type = "web.productview") within 7 days',
    ),
    (
        "bargain-hunters",
        'min(product.price of event(type = "web.productview") within 30 days) < 10',
    ),
)

ALL: tuple[tuple[str, str], ...] = ATTRIBUTE + EVENT_STREAMING + BATCH
STREAMING_NAMES = frozenset(n for n, _ in ATTRIBUTE + EVENT_STREAMING)
BATCH_NAMES = frozenset(n for n, _ in BATCH)


def objects() -> list[dict[str, str]]:
    """The segments as `cdp apply` objects (kind segment)."""
    return [
        {"name": name, "description": "benchmark segment", "expression": expression}
        for name, expression in ALL
    ]
