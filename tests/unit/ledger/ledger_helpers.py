"""Shared by the Ledger tests: the entries they append (the ``url`` fixture is in conftest.py)."""

from __future__ import annotations

import hashlib

from ledger.log import LedgerEntry


def make_entry(i: int, org: str = "org-a", offset: int | None = None) -> LedgerEntry:
    return LedgerEntry(
        bundle_sha256=hashlib.sha256(f"bundle-{i}".encode()).hexdigest(),
        source_org=org,
        adapter="hl7v2",
        adapter_version="1.0.0",
        topic="fhir.bundles",
        partition=i % 3,
        offset=i if offset is None else offset,
        ingested_at="2024-05-01T12:00:00Z",
        message_id=f"msg-{i}",
    )
