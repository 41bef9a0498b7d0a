"""LedgerEntry: canonical JSON, validation, size limit."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.entry import LedgerEntry, canonical_many
from ledger.entry import _canonical_fast as _fast
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


# -- canonical_many: the batch path must give exactly the bytes and errors of canonical() --------------

_any_text = st.text(
    alphabet=st.characters(codec="utf-8", categories=("L", "N", "P", "S", "Z", "Cc"))
    | st.sampled_from('"\\}{,[]'),
    max_size=12,
)
_field_values: dict[str, st.SearchStrategy[Any]] = {
    "bundle_sha256": st.sampled_from(["ab" * 32, "0f" * 32, "AB" * 32, "ab" * 31, "", "zz" * 32])
    | st.text(alphabet="0123456789abcdef", min_size=63, max_size=65),
    "source_org": st.sampled_from(["org-1", "O", ""]) | _any_text,
    "adapter": st.sampled_from(["hl7v2", ""]) | _any_text | st.none(),
    "adapter_version": st.sampled_from(["1.0", "2"]) | _any_text | st.integers(0, 3),
    "topic": st.sampled_from(["fhir.bundles", "t"]) | _any_text,
    "partition": st.sampled_from([0, 1, 2**64 - 1, 2**64, -1, True, 1.0]) | st.integers(0, 10**6),
    "offset": st.sampled_from([0, 7, 2**63, 2**64, -5, False]) | st.integers(0, 10**12),
    "ingested_at": st.sampled_from(
        [
            "2024-05-01T12:00:00Z",
            "2024-05-01T12:00:00.123456789+00:00",
            "2024-05-01T12:00:00.1234567890Z",
            "2024-05-01 12:00:00Z",
            "2024-05-01T12:00:00Z\n2024-05-01T12:00:00Z",
            "٢٠٢٤-05-01T12:00:00Z",
            "",
        ]
    ),
    "message_id": st.none() | st.sampled_from(["", "m-1"]) | _any_text | st.integers(0, 3),
}
_good_values = GOOD.to_dict()


@st.composite
def _entries(draw: st.DrawFn) -> LedgerEntry:
    """Mostly-valid entries: each field is the good value or, sometimes, an arbitrary (often bad) one."""
    fields = {
        name: draw(strategy) if draw(st.integers(0, 3)) == 0 else _good_values[name]
        for name, strategy in _field_values.items()
    }
    return LedgerEntry(**fields)


def _outcome(fn: Any) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except (InvalidEntry, EntryTooLarge) as exc:
        return type(exc).__name__, str(exc)


@settings(max_examples=400, deadline=None)
@given(st.lists(_entries(), min_size=1, max_size=6))
def test_property_canonical_many_equals_canonical_per_entry(entries: list[LedgerEntry]) -> None:
    def one_by_one() -> list[bytes]:
        return [e.canonical() for e in entries]

    assert _outcome(lambda: canonical_many(entries)) == _outcome(one_by_one)


def test_canonical_many_fast_path_gives_the_canonical_bytes() -> None:
    batch = [
        LedgerEntry(f"{i:064x}", f"org {i}", "hl7v2", "1.0", "t", i, 2**64 - 1 - i, "2024-05-01T12:00:00Z", m)
        for i, m in enumerate([None, "", "m-2", "a/b'c<d>"])
    ]
    assert _fast(batch) is not None  # this batch takes the fast path ...
    assert canonical_many(batch) == [e.canonical() for e in batch]  # ... and gives the same bytes
    for e, data in zip(batch, canonical_many(batch), strict=True):
        assert LedgerEntry.from_canonical(data) == e


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("source_org", 'org "quoted"'),
        ("topic", "back\\slash"),
        ("adapter", "é"),
        ("adapter_version", "tab\t"),
        ("message_id", "line\nbreak"),
        ("ingested_at", "٢٠٢٤-05-01T12:00:00Z"),  # non-ASCII digits: valid for \d, not fast
    ],
)
def test_canonical_many_falls_back_for_strings_that_need_escaping(field: str, value: str) -> None:
    batch = [GOOD, LedgerEntry(**{**GOOD.to_dict(), field: value})]
    assert _fast(batch) is None
    assert canonical_many(batch) == [e.canonical() for e in batch]


def test_canonical_many_reports_the_first_bad_entry_like_canonical() -> None:
    batch = [
        GOOD,
        LedgerEntry(**{**GOOD.to_dict(), "partition": -1}),
        LedgerEntry(**{**GOOD.to_dict(), "topic": ""}),
    ]
    with pytest.raises(InvalidEntry, match="partition"):
        canonical_many(batch)
    with pytest.raises(EntryTooLarge):
        canonical_many([GOOD, LedgerEntry(**{**GOOD.to_dict(), "topic": "t" * 65_536})])
    with pytest.raises(InvalidEntry):
        canonical_many([GOOD, {"bundle_sha256": "x"}])  # type: ignore[list-item]
    assert canonical_many([]) == []
