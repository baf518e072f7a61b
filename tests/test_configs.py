"""Reading the config stream: every service takes an object only as its owner published it."""

from __future__ import annotations

import msgspec
import structlog
from structlog.testing import capture_logs

from shared import subjects
from shared.admin import PublishedSegment
from shared.resources import MergePolicy
from shared.runtime.actor import Delivery
from shared.runtime.configs import published

_policies = msgspec.json.Decoder(MergePolicy)
_segments = msgspec.json.Decoder(PublishedSegment)


def _at(subject: str, obj: object, seq: int) -> Delivery:
    return Delivery(subject, msgspec.json.encode(obj), seq)


def test_objects_on_their_own_subjects_are_taken_in_order() -> None:
    a = MergePolicy(name="a", type="timestamp")
    b = MergePolicy(name="b", type="timestamp")
    got = published(
        [
            _at(subjects.config("merge_policy", "b"), b, 1),
            _at(subjects.config("merge_policy", "a"), a, 2),
        ],
        "merge_policy",
        _policies,
        structlog.get_logger(),
    )
    assert [(d.seq, p.name) for d, p in got] == [(1, "b"), (2, "a")]


def test_an_object_on_another_names_subject_or_undecodable_is_skipped_and_logged() -> None:
    good = PublishedSegment(name="buyers", method="streaming")
    with capture_logs() as logs:
        got = published(
            [
                _at(subjects.config("segment", "vip"), good, 1),  # names another segment
                Delivery(subjects.config("segment", "x"), b"{not json", 2),
                Delivery(subjects.config("segment", "y"), b'{"name": 5}', 3),
                _at(subjects.config("segment", "buyers"), good, 4),
            ],
            "segment",
            _segments,
            structlog.get_logger(),
        )
    assert [d.seq for d, _ in got] == [4]
    assert [e["event"] for e in logs] == [
        "configuration on another name's subject",
        "undecodable configuration",
        "undecodable configuration",
    ]
