"""LedgerEntry: canonical JSON, validation, size limit."""

from __future__ import annotations

import re

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.entry import LedgerEntry
from ledger.errors import EntryTooLarge, InvalidEntry

GOOD = LedgerEntry("ab" * 32, "org-1", "hl7v2", "1.0", "fhir.bundles", 2, 17, "2024-05-01T12:00:00Z", "m-1")


def test_canonical_is_sorted_compact_json_with_every_field() -> None:
    assert GOOD.canonical() == (
        b'{"adapter":"hl7v2","adapter_version":"1.0","bundle_sha256":"' + b"ab" * 32 + b'",'
        b'"ingested_at":"2024-05-01T12:00:00Z","message_id":"m-1","offset":17,"partition":2,'
        b'"source_org":"org-1","topic":"fhir.bundles"}'
    )


def test_canonical_roundtrip() -> None:
    assert LedgerEntry.from_canonical(GOOD.canonical()) == GOOD
    no_id = LedgerEntry("cd" * 32, "o", "a", "1", "t", 0, 0, "2024-05-01T12:00:00.5+00:00")
    assert LedgerEntry.from_canonical(no_id.canonical()) == no_id


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("bundle_sha256", "AB" * 32),
        ("bundle_sha256", "ab" * 31),
        ("source_org", ""),
        ("adapter", None),
        ("partition", -1),
        ("offset", True),
        ("offset", 1.0),
        ("ingested_at", "2024-05-01 12:00:00"),
        ("ingested_at", "2024-05-01T12:00:00+02:00"),
        ("message_id", 5),
    ],
)
def test_invalid_fields_are_named(field: str, value: object) -> None:
    bad = LedgerEntry(**{**GOOD.to_dict(), field: value})
    with pytest.raises(InvalidEntry, match=field):
        bad.canonical()


def test_entries_over_64_kb_are_refused() -> None:
    with pytest.raises(EntryTooLarge):
        LedgerEntry(**{**GOOD.to_dict(), "topic": "t" * 65_536}).canonical()
    LedgerEntry(**{**GOOD.to_dict(), "topic": "t" * 60_000}).canonical()


@pytest.mark.parametrize(
    "data", [b"not json", b"[]", b'{"bundle_sha256": "x"}', orjson.dumps({**GOOD.to_dict(), "x": 1})]
)
def test_from_canonical_rejects_non_entries(data: bytes) -> None:
    with pytest.raises(InvalidEntry):
        LedgerEntry.from_canonical(data)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789abcdefABG \n", min_size=60, max_size=66))
def test_property_bundle_check_equals_the_spec_regex(bundle: str) -> None:
    entry = LedgerEntry(**{**GOOD.to_dict(), "bundle_sha256": bundle})
    if re.fullmatch(r"[0-9a-f]{64}", bundle):
        entry.canonical()
    else:
        with pytest.raises(InvalidEntry):
            entry.canonical()
