"""Destination reads the changes stream for the profiles' views only (`view_batch_decoder`):
what it decodes from a change envelope is what the full decoder finds, item by item."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.messages import (
    ChangeEnvelope,
    ChangeItem,
    ExperienceEvent,
    Identity,
    PrivacyDelete,
    Probe,
    ProfileChanged,
    ProfileDeleted,
    ProfileMerged,
    ProfileView,
    Recheck,
    change_batch_decoder,
    msgpack_encoder,
    view_batch_decoder,
)

_ids = st.text("abc", min_size=1, max_size=3)
_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=6,
)
_changed = st.builds(
    lambda pid, attrs, views, n: ProfileChanged(
        pid,
        [f"r{n}"],
        1_700_000_000.0 + n,
        attributes=attrs,
        changed=sorted(attrs),
        events=[
            ExperienceEvent(
                record_id=f"e{n}",
                dataset="web",
                event_type="web.pageview",
                timestamp=1.0,
                payload={"page": {"url": "/"}},
            )
        ],
        identities=[Identity("email", f"{pid}@example.com")],
        views=views,
        removed_events=[f"old{n}"],
    ),
    _ids,
    st.dictionaries(st.text(max_size=4), _values, max_size=4),
    st.dictionaries(st.just("crm-first"), st.dictionaries(st.text(max_size=3), _values)),
    st.integers(0, 100),
)
_items = st.lists(
    st.one_of(
        _changed,
        st.builds(lambda pid, f: ProfileMerged(pid, [f], 1.0), _ids, _ids),
        st.builds(
            lambda pid: ProfileDeleted(
                [pid],
                PrivacyDelete(request_id="req", identity=Identity("email", "x"), requested_at=1.0),
            ),
            _ids,
        ),
        st.builds(lambda pid: Recheck([pid], 1.0), _ids),
        st.builds(lambda n: Probe(f"probe{n}", partition=n), st.integers(0, 9)),
    ),
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(_items)
def test_the_view_decoder_reads_what_the_full_decoder_reads(items: list[ChangeItem]) -> None:
    payload = msgpack_encoder.encode(ChangeEnvelope(items))
    full = change_batch_decoder.decode(payload).items
    lean = view_batch_decoder.decode(payload).items
    assert len(lean) == len(full)
    for a, b in zip(full, lean, strict=True):
        if isinstance(a, ProfileChanged):
            assert isinstance(b, ProfileView)
            assert (b.profile_id, b.at, b.attributes, b.identities) == (
                a.profile_id,
                a.at,
                a.attributes,
                a.identities,
            )
        else:
            assert b == a
